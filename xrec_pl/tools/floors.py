"""What a score means: record specificity and the scores of explanations no model wrote.

Two questions a reviewer asks of an explanation score such as BERTScore-F1 0.62:

* **Specificity** -- does a prediction match *its own* record's reference better than another record's? Each
  prediction is scored once against its reference and once against the reference of another record (a seeded
  derangement of the references: no record keeps its own); the paired difference, with bootstrap CI and p-values, is
  the part of the score that depends on the record (:func:`specificity`; ``xrec-pl evaluate --specificity true``).
* **Floors** -- what do texts that need no model score? :func:`floor_predictions` builds, for the records of a split,
  the *medoid* (the one training explanation most central among all training explanations, given to every record),
  and the training explanation of the *same item* / *same user* where the training split has one (else the medoid).
  Only the training split is read, so no test text leaks into a floor (``xrec-pl baselines``).

The medoid is the training explanation whose mean-pooled sentence embedding (the offline all-MiniLM-L6-v2, the
BERTScore backbone) has the highest mean cosine similarity to all training explanations.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xrec_pl.errors import DataError

__all__ = ["baselines", "floor_predictions", "medoid_text", "specificity"]


def specificity(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str] = ("bertscore",),
    *,
    seed: int = 0,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    own: dict[str, list[float]] | None = None,
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """Own-reference vs other-record-reference scores of the same predictions, paired per record.

    Args:
        predictions: Generated explanations.
        references: Their references, paired by position.
        metrics: Metrics to score (those with per-sample scores are tested; USR has none).
        seed: Seed of the derangement and of the bootstrap.
        n_resamples: Bootstrap resamples of the CI.
        confidence: CI level.
        own: Per-sample scores against the own references when already computed (``evaluate(per_sample=True)``).
        **metric_kwargs: Metric options, as for :func:`~xrec_pl.tools.evaluate.evaluate`.

    Returns:
        ``{"n", "seed", "shuffled": {metric key: mean against another record's reference}, "tests": {key:
        compare_paired(own, shuffled)}}``; ``tests[key]["mean_diff"]`` is the record-specific part of the score.
    """
    from xrec_pl.metrics.significance import compare_scores
    from xrec_pl.tools.analysis.swap import derangement
    from xrec_pl.tools.evaluate import evaluate

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise DataError(f"specificity: {len(predictions)} predictions but {len(references)} references")
    if len(references) < 2:
        raise DataError("specificity: needs at least 2 records (a prediction is compared with another's reference)")
    perm = derangement(len(references), seed).tolist()  # one cycle: no record keeps its own reference
    other = [references[j] for j in perm]
    if own is None:
        own = evaluate(predictions, references, metrics, per_sample=True, **metric_kwargs)["per_sample"]
    shuffled = evaluate(predictions, other, metrics, per_sample=True, **metric_kwargs)
    shuffled_samples = shuffled.pop("per_sample")
    means = {k: float(np.mean(v)) for k, v in shuffled_samples.items()}
    return {
        "n": len(references),
        "seed": seed,
        "same_reference_pairs": sum(1 for a, b in zip(references, other) if a == b),
        "shuffled": means,
        "tests": compare_scores(own, shuffled_samples, n_resamples=n_resamples, confidence=confidence, seed=seed),
    }


def _sentence_embeddings(texts: list[str], model_path: Path, batch_size: int = 64) -> Any:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def medoid_text(texts: Sequence[str], model_path: str | os.PathLike | None = None) -> str:
    """The text with the highest mean cosine similarity (MiniLM sentence embeddings) to all of ``texts``."""
    from xrec_pl.metrics.bertscore import minilm_path

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError("medoid: no non-empty texts")
    embeddings = _sentence_embeddings(texts, Path(model_path) if model_path else minilm_path())
    centrality = embeddings @ embeddings.mean(0)  # mean cosine to all texts, up to a constant factor
    return texts[int(centrality.argmax())]


def floor_predictions(
    data_dir: str | os.PathLike, split: str = "tst", model_path: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The floors' predictions for every record of ``split``, built from the training split only.

    Returns:
        ``{"medoid": text, "records": n, "coverage": {"same_item": share, "same_user": share},
        "predictions": {floor: [{"uid", "iid", "prediction", "reference"}, ...]}}`` in the split's record order.
    """
    from xrec_pl.data.io import read_records

    train = read_records(data_dir, "trn")
    records = read_records(data_dir, split)
    medoid = medoid_text(train["explanation"].astype(str).tolist(), model_path)
    first_by = {key: train.groupby(key, sort=False)["explanation"].first().astype(str) for key in ("iid", "uid")}
    floors: dict[str, list[dict[str, Any]]] = {"medoid": [], "same_item": [], "same_user": []}
    hits = {"same_item": 0, "same_user": 0}
    for uid, iid, reference in zip(records["uid"], records["iid"], records["explanation"].astype(str)):
        row = {"uid": int(uid), "iid": int(iid), "reference": reference}
        floors["medoid"].append({**row, "prediction": medoid})
        for floor, key, value in (("same_item", "iid", iid), ("same_user", "uid", uid)):
            text = first_by[key].get(value)
            hits[floor] += text is not None
            floors[floor].append({**row, "prediction": medoid if text is None else text})
    n = len(records)
    return {
        "medoid": medoid,
        "records": n,
        "coverage": {floor: hits[floor] / n if n else 0.0 for floor in hits},
        "predictions": floors,
    }


def baselines(
    data_dir: str,
    out_dir: str,
    split: str = "tst",
    metrics: list[str] | None = None,
    specificity_test: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Write and score the floors of a split: the medoid, same-item and same-user training explanations.

    Each floor is written as ``OUT_DIR/<floor>.jsonl`` (``uid``, ``iid``, ``prediction``, ``reference``: the
    format of a predict run, so ``xrec-pl evaluate --predictions RUN --against OUT_DIR/medoid.jsonl`` pairs a
    model with a floor) and scored; ``OUT_DIR/baselines.json`` holds the scores, the medoid text and the share of
    records whose item / user has a training explanation. Nothing is written if ``OUT_DIR`` holds any of them.

    Args:
        data_dir: XRec data folder; only its training split feeds the floors.
        out_dir: Folder for the files (created).
        split: Records to build floors for (``tst`` or ``val``).
        metrics: Metrics to score (default: usr, bertscore).
        specificity_test: Also score each floor against other records' references (the medoid's gap is 0 by
            construction; the retrieval floors' gap is the record-specific part a lookup gets).
        device: ``cpu`` or ``cuda`` for the scoring backbones.
    """
    import json

    from xrec_pl.outputs import check_output_dir
    from xrec_pl.tools.evaluate import check_metric_names, evaluate
    from xrec_pl.utils import atomic_write_text, dump_json

    chosen = [m.lower().replace("-", "_") for m in (metrics or ["usr", "bertscore"])]
    check_metric_names(chosen)
    if split not in ("tst", "test", "val"):
        raise DataError(f"--split {split}: choose tst or val (the floors are built from trn)")
    split = "tst" if split == "test" else split
    out = check_output_dir(out_dir, "--out_dir", [data_dir])
    names = ["medoid.jsonl", "same_item.jsonl", "same_user.jsonl", "baselines.json"]
    taken = [name for name in names if (out / name).exists()]
    if taken:
        raise DataError(f"--out_dir {out}: {taken[0]} exists; baselines never overwrite (choose another folder)")
    built = floor_predictions(data_dir, split)
    options = {"device": device} if device else {}
    report: dict[str, Any] = {
        "data_dir": str(data_dir),
        "split": split,
        "records": built["records"],
        "medoid": built["medoid"],
        "coverage": built["coverage"],
        "floors": {},
    }
    for floor, rows in built["predictions"].items():
        preds = [r["prediction"] for r in rows]
        refs = [r["reference"] for r in rows]
        scored = evaluate(preds, refs, chosen, per_sample=specificity_test, **options)
        own = scored.pop("per_sample", None)
        if specificity_test:
            scored["specificity"] = specificity(preds, refs, chosen, own=own, **options)
        report["floors"][floor] = scored
    out.mkdir(parents=True, exist_ok=True)
    for floor, rows in built["predictions"].items():
        atomic_write_text(out / f"{floor}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dump_json(out / "baselines.json", report)
    sys.stdout.write(summary(report) + "\n")
    return report


def summary(report: dict[str, Any]) -> str:
    """One line per floor: its scores and, when measured, its record-specific gap."""
    lines = [f"floors for {report['records']} {report['split']} records of {report['data_dir']} (from trn only):"]
    for floor, scored in report["floors"].items():
        cover = report["coverage"].get(floor)
        parts = [f"{k} {scored[k]:.4f}" for k in ("bertscore_f1", "usr") if k in scored]
        gap = (scored.get("specificity") or {}).get("tests", {}).get("bertscore_f1")
        if gap:
            parts.append(f"own-other reference {gap['mean_diff']:+.4f} [{gap['ci_low']:+.4f}, {gap['ci_high']:+.4f}]")
        if cover is not None:
            parts.append(f"found for {100 * cover:.0f} % of records")
        lines.append(f"  {floor:10s} " + ", ".join(parts))
    return "\n".join(lines)
