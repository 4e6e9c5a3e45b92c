"""Score explanation files offline: the ``xrec-pl evaluate`` command and paired system comparisons.

Inputs: our predict JSONL (one object per line with ``prediction`` and ``reference``), the reference code's
pickled lists of strings (``tst_pred.pkl`` / ``tst_ref.pkl``, read with the restricted unpickler), a records
table (pickle / parquet DataFrame: its ``explanation`` column serves as references) or plain text (one per line).

Empty texts: an empty (whitespace-only) *prediction* is a model failure and is scored as it is (BERTScore gives
it 0 -- bert_score's intent, which it cannot apply itself under transformers 5; USR counts it as one sequence);
the report counts them in ``empty_predictions``.
An empty *reference* means broken data: ``DataError``. Different lengths, non-text entries, missing files or
checkpoints are ``DataError``s naming the file.

Per-metric options go in as ``<metric>={...}`` or flat ``<metric>_<option>=...`` keywords (``None`` values are
ignored), so a CLI passes its flags straight through::

    evaluate_files(args.predictions, args.references, metrics=args.metrics, output=args.output,
                   bleurt_checkpoint=args.bleurt_checkpoint)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xrec_pl.errors import DataError
from xrec_pl.outputs import check_output_file
from xrec_pl.utils import dump_json

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("usr", "bertscore")
_DEVICE_METRICS = ("bertscore", "bleurt", "bartscore")


# -- reading -------------------------------------------------------------------------------------------------
def _check_text(path: Path | str, where: str, value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{path}: {where}: {field} is {type(value).__name__}, expected text")
    return value


def load_texts(path: str | os.PathLike, field: str = "prediction") -> list[str]:
    """Read a list of texts from a JSONL / pickle / parquet / text file.

    Args:
        path: ``.jsonl`` (objects with ``field``), ``.pkl``/``.pickle`` (list of str, or a DataFrame with a
            ``field`` column, or ``explanation`` when ``field == "reference"``), ``.parquet`` (DataFrame, same
            columns) or ``.txt`` (one text per line).
        field: ``"prediction"`` or ``"reference"`` (the JSONL field / DataFrame column).

    Raises:
        DataError: missing file, unknown format, malformed line, missing field, or a non-text entry.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        texts = []
        for lineno, line in enumerate(_utf8_lines(path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict) or field not in row:
                found = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}: line {lineno}: missing field {field!r} (found: {found})")
            texts.append(_check_text(path, f"line {lineno}", row[field], field))
        return texts
    if suffix in (".pkl", ".pickle", ".parquet"):
        if suffix == ".parquet":
            import pandas as pd

            try:
                obj: Any = pd.read_parquet(path)
            except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
                raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0][:160]})") from None
        else:
            from xrec_pl.data.io import safe_load_pickle

            obj = safe_load_pickle(path)
        return _texts_from_object(path, obj, field)
    if suffix == ".txt":
        return _utf8_lines(path)
    raise DataError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .pkl, .pickle, .parquet or .txt)")


def _utf8_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); is it a binary file?") from None


def _texts_from_object(path: Path, obj: Any, field: str) -> list[str]:
    import numpy as np
    import pandas as pd

    if isinstance(obj, pd.DataFrame):
        column = field if field in obj.columns else ("explanation" if field == "reference" else None)
        if column not in obj.columns:
            raise DataError(f"{path}: missing column {field!r} (found: {', '.join(map(str, obj.columns))})")
        obj = obj[column]
    if isinstance(obj, (pd.Series, np.ndarray)):
        obj = list(obj)
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{path}: expected a list of texts, got {type(obj).__name__}")
    return [_check_text(path, f"entry {i}", value, field) for i, value in enumerate(obj)]


# -- metric options ------------------------------------------------------------------------------------------
def split_metric_kwargs(metrics: Sequence[str], kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Route ``<metric>={...}`` / ``<metric>_<option>=value`` / ``device=`` keywords to each metric.

    ``None`` values are dropped. Options for metrics not selected are ignored with a log message.
    """
    from xrec_pl.metrics import METRICS

    names = sorted(METRICS, key=len, reverse=True)  # "llm_judge" before any shorter prefix
    routed: dict[str, dict[str, Any]] = {name: {} for name in METRICS}
    device = kwargs.pop("device", None)
    for key, value in kwargs.items():
        if value is None:
            continue
        if key in METRICS:
            if not isinstance(value, dict):
                raise TypeError(f"{key}= must be a dict of {key} options, got {type(value).__name__}")
            routed[key].update({k: v for k, v in value.items() if v is not None})
            continue
        name = next((n for n in names if key.startswith(n + "_")), None)
        if name is None:
            raise TypeError(f"unknown evaluate option {key!r} (use <metric>_<option>, e.g. bleurt_checkpoint)")
        routed[name][key[len(name) + 1 :]] = value
    selected = {m.lower().replace("-", "_") for m in metrics}
    for name, opts in routed.items():
        if opts and name not in selected:
            log.info("ignoring options for metric %s (not selected): %s", name, ", ".join(opts))
        if device is not None and name in _DEVICE_METRICS:
            opts.setdefault("device", device)
    return {name: routed[name] for name in selected if name in routed}


# -- scoring -------------------------------------------------------------------------------------------------
def _validate_pairs(predictions: Sequence[str], references: Sequence[str], sources: dict[str, str]) -> int:
    pred_src = sources.get("predictions", "predictions")
    ref_src = sources.get("references", "references")
    if len(predictions) != len(references):
        raise DataError(f"{pred_src}: {len(predictions)} predictions but {len(references)} references in {ref_src}")
    if not predictions:
        raise DataError(f"{pred_src}: no predictions to evaluate")
    for src, name, texts in ((pred_src, "prediction", predictions), (ref_src, "reference", references)):
        for i, text in enumerate(texts):
            _check_text(src, f"entry {i}", text, name)
    empty_refs = [i for i, r in enumerate(references) if not r.strip()]
    if empty_refs:
        shown = ", ".join(map(str, empty_refs[:10])) + (" ..." if len(empty_refs) > 10 else "")
        raise DataError(f"{ref_src}: {len(empty_refs)} empty reference(s) at entries {shown}")
    return sum(1 for p in predictions if not p.strip())


def _run_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str],
    ids: Sequence[int] | None,
    chunk_size: int | None,
    options: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Run each metric over all pairs; returns (scores, backbones, per-sample scores)."""
    from xrec_pl.metrics import build_metric
    from xrec_pl.progress import progress_bar

    predictions, references = list(predictions), list(references)
    n = len(predictions)
    ids = list(range(n)) if ids is None else list(ids)
    if len(ids) != n or len(set(ids)) != n:
        raise DataError(f"ids: expected {n} distinct sample ids, got {len(ids)} ({len(set(ids))} distinct)")
    step = chunk_size or n
    scores: dict[str, Any] = {}
    backbones: dict[str, Any] = {}
    per_sample: dict[str, Any] = {}
    for position, name in enumerate(metrics, start=1):
        key = name.lower().replace("-", "_")
        opts = dict(options.get(key, {}))
        if key == "bertscore" and opts.get("idf") and opts.get("idf_sents") is None:
            opts["idf_sents"] = references  # as bert_score.score(idf=True): idf from the references
        metric = build_metric(key, **opts)
        with progress_bar(n, f"{key} ({position}/{len(metrics)})", unit="pair") as bar:
            for start in range(0, n, step):
                metric.update(
                    predictions[start : start + step], references[start : start + step], ids[start : start + step]
                )
                bar.update(len(predictions[start : start + step]))
            scores.update(metric.compute())
        backbones[key] = metric.describe()
        samples = metric.sample_scores()
        sample_ids = samples.pop("sample_id").tolist()
        for k, v in samples.items():
            per_sample[k] = dict(zip(sample_ids, v.tolist()))
    return scores, backbones, per_sample


def evaluate(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    ids: Sequence[int] | None = None,
    chunk_size: int | None = None,
    per_sample: bool = False,
    sources: dict[str, str] | None = None,
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """Score paired predictions and references with the named metrics.

    Args:
        predictions: generated explanations.
        references: ground-truth explanations, paired by position.
        metrics: any of ``usr``, ``bertscore``, ``bleurt``, ``bartscore``, ``llm_judge``.
        ids: sample ids (default ``0..n-1``), used in per-sample output.
        chunk_size: pairs per metric update (``None``: all at once, which matches a direct
            ``bert_score`` call exactly).
        per_sample: also return ``per_sample[key] = [score per pair]`` (in input order).
        sources: ``{"predictions": file, "references": file}`` for error messages and the report.
        **metric_kwargs: per-metric options (see :func:`split_metric_kwargs`), e.g.
            ``bertscore={"model_type": "roberta-large", "rescale_with_baseline": True}``, ``bleurt_checkpoint=...``.

    Returns:
        ``{"n", <metric keys> (bertscore_f1, bertscore_f1_std, usr, ...), "backbones": {metric: what produced
        it}, "empty_predictions", "skipped": {metric: pairs left out of its mean}}`` (+ ``sources``, ``per_sample``).
    """
    sources = {k: str(v) for k, v in (sources or {}).items()}
    empty = _validate_pairs(predictions, references, sources)
    if not metrics:
        raise ValueError("no metrics selected")
    options = split_metric_kwargs(metrics, dict(metric_kwargs))
    scores, backbones, samples = _run_metrics(predictions, references, metrics, ids, chunk_size, options)
    result: dict[str, Any] = {"n": len(predictions), **scores, "backbones": backbones, "empty_predictions": empty}
    result["skipped"] = {"llm_judge": int(scores["judge_unparsable"])} if "judge_unparsable" in scores else {}
    if sources:
        result["sources"] = sources
    if per_sample:
        order = list(range(len(predictions))) if ids is None else list(ids)
        result["per_sample"] = {k: [v[i] for i in order] for k, v in samples.items()}
    return result


def load_pair(predictions_path: str | os.PathLike, references_path: str | os.PathLike | None) -> tuple:
    preds = load_texts(predictions_path, "prediction")
    ref_path = predictions_path if references_path is None else references_path
    refs = load_texts(ref_path, "reference")
    return preds, refs, {"predictions": str(predictions_path), "references": str(ref_path)}


def restrict_to_records(
    preds: list[str], refs: list[str], records_path: str | os.PathLike
) -> tuple[list[str], list[str], int]:
    """Keep the pairs whose reference is the explanation of a record in ``records_path``.

    ``records_path`` is an XRec split file (``tst.pkl``, ``.parquet``) or a predictions JSONL, whose ``reference``
    fields then name the records (for example the test subset an experiment suite scored).

    The reference's released predictions are not in the order of any split (its test loader shuffled); their
    references are unique, so the reference text identifies the record. Every record must be found exactly once.
    """
    import pandas as pd

    from xrec_pl.data.io import check_records, safe_load_pickle

    path = Path(records_path)
    if not path.is_file():
        raise DataError(f"{path}: records file not found")
    if path.suffix == ".jsonl":  # a predictions file: its references are the records (e.g. a suite's test subset)
        wanted = set(load_texts(path, "reference"))
    else:
        frame = safe_load_pickle(path) if path.suffix in (".pkl", ".pickle") else pd.read_parquet(path)
        if not isinstance(frame, pd.DataFrame):
            raise DataError(f"{path}: expected a DataFrame of XRec records, got {type(frame).__name__}")
        check_records(frame, path)
        wanted = set(frame["explanation"].astype(str))
    keep = [i for i, ref in enumerate(refs) if ref in wanted]
    found = {refs[i] for i in keep}
    if len(found) != len(wanted) or len(keep) != len(wanted):
        raise DataError(
            f"{path}: {len(wanted)} records, but {len(found)} of their explanations matched "
            f"{len(keep)} references (each must match exactly one)"
        )
    return [preds[i] for i in keep], [refs[i] for i in keep], len(refs) - len(keep)


def check_metric_names(metrics: Sequence[str]) -> None:
    """Raise ``DataError`` naming ``--metrics`` for an unknown metric, before any file is read or scored."""
    from xrec_pl.metrics import METRICS

    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if str(m).lower().replace("-", "_") not in METRICS]
    if unknown:
        raise DataError(f"--metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")


def evaluate_files(
    predictions_path: str | os.PathLike,
    references_path: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = DEFAULT_METRICS,
    output: str | os.PathLike | None = None,
    records: str | os.PathLike | None = None,
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """:func:`evaluate` on files; references default to the ``reference`` field of the predictions JSONL.

    ``records`` (an XRec split file) restricts the pairs to that split's records, matched by reference text.
    Writes the result as JSON to ``output`` (atomically) when given, and returns it.
    """
    check_metric_names(metrics or DEFAULT_METRICS)
    if output is not None:
        check_output_file(output, "--output", [predictions_path, references_path, records])
    preds, refs, sources = load_pair(predictions_path, references_path)
    if records is not None:
        preds, refs, dropped = restrict_to_records(preds, refs, records)
        sources = {**sources, "records": str(records), "pairs_outside_records": str(dropped)}
    result = evaluate(preds, refs, metrics or DEFAULT_METRICS, sources=sources, **metric_kwargs)
    if output is not None:
        dump_json(output, result)
    return result
