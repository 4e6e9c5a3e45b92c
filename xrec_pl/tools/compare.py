"""Paired comparison of two systems' explanations on the same references (``xrec-pl evaluate --against``).

Both systems are scored like :func:`~xrec_pl.tools.evaluate.evaluate`; for every per-sample key (``bertscore_f1``,
``bleurt``, ``llm_judge``, ...) the result holds both means, ``mean_diff`` (A - B), its bootstrap CI and paired t-test /
Wilcoxon p-values (:func:`~xrec_pl.metrics.significance.compare_scores`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xrec_pl.errors import DataError
from xrec_pl.outputs import check_output_file
from xrec_pl.tools.evaluate import check_metric_names, evaluate, load_pair, load_texts, restrict_to_records
from xrec_pl.utils import dump_json

__all__ = ["align_by_reference", "compare_against", "compare_files"]


def compare_files(
    a: str | os.PathLike,
    b: str | os.PathLike,
    references: str | os.PathLike | None = None,
    metrics: Sequence[str] = ("bertscore",),
    output: str | os.PathLike | None = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """Paired significance of system A vs system B on the same references, per metric key.

    References default to the ``reference`` field of ``a``. Each system is scored like :func:`evaluate`; for every
    per-sample key (``bertscore_f1``, ``bleurt``, ``llm_judge``, ...) the result holds means, ``mean_diff``
    (A - B), its bootstrap CI and paired t-test / Wilcoxon p-values. USR (a set-level ratio) is reported
    for both systems without a test.
    """
    check_metric_names(metrics)
    if output is not None:
        check_output_file(output, "--output", [a, b, references])
    ref_path = a if references is None else references
    refs = load_texts(ref_path, "reference")
    for path in (a, b):  # a JSONL that carries its own references must agree with the shared ones
        if Path(path).suffix.lower() in (".jsonl", ".json") and Path(path) != Path(ref_path):
            try:
                own = load_texts(path, "reference")
            except DataError:
                continue
            if own != refs:
                raise DataError(f"{path}: its references differ from those in {ref_path}; systems are not paired")
    texts = {label: load_texts(path, "prediction") for label, path in (("a", a), ("b", b))}
    sources = {label: {"predictions": str(path), "references": str(ref_path)} for label, path in (("a", a), ("b", b))}
    result = _compare_texts(
        texts["a"], texts["b"], refs, metrics, sources, n_resamples, confidence, seed, metric_kwargs
    )
    if output is not None:
        dump_json(output, result)
    return result


def _compare_texts(
    preds_a: list[str],
    preds_b: list[str],
    refs: list[str],
    metrics: Sequence[str],
    sources: dict[str, dict[str, str]],
    n_resamples: int,
    confidence: float,
    seed: int,
    metric_kwargs: dict[str, Any],
) -> dict[str, Any]:
    from xrec_pl.metrics.significance import compare_scores

    systems = {
        label: evaluate(preds, refs, metrics, per_sample=True, sources=sources[label], **metric_kwargs)
        for label, preds in (("a", preds_a), ("b", preds_b))
    }
    samples_a, samples_b = systems["a"].pop("per_sample"), systems["b"].pop("per_sample")
    return {
        "n": len(refs),
        "a": systems["a"],
        "b": systems["b"],
        "tests": compare_scores(samples_a, samples_b, n_resamples=n_resamples, confidence=confidence, seed=seed),
    }


def align_by_reference(predictions: list[str], references: list[str], wanted: list[str], where: str) -> list[str]:
    """``predictions`` reordered so that the i-th answers ``wanted[i]``, matched by reference text.

    Raises:
        DataError: naming ``where``, when a reference appears twice there or a wanted reference is missing.
    """
    by_reference: dict[str, str] = {}
    for pred, ref in zip(predictions, references):
        if ref in by_reference:
            raise DataError(f"{where}: the reference {ref[:60]!r} appears twice; its predictions cannot be paired")
        by_reference[ref] = pred
    missing = [ref for ref in wanted if ref not in by_reference]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} of the {len(wanted)} references have no prediction there "
            f"(first: {missing[0][:60]!r})"
        )
    return [by_reference[ref] for ref in wanted]


def compare_against(
    predictions: str | os.PathLike,
    against: str | os.PathLike,
    references: str | os.PathLike | None = None,
    against_references: str | os.PathLike | None = None,
    metrics: Sequence[str] = ("bertscore",),
    output: str | os.PathLike | None = None,
    records: str | os.PathLike | None = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """Paired comparison of ``predictions`` (A) with another system's (B), whose pairs may be in any order.

    B's predictions are matched to A's references by reference text (the reference's released predictions are
    shuffled), so every reference of A must appear exactly once among B's. ``records`` first restricts A to a split.
    The result is :func:`compare_files`'s: both systems' scores and, per per-sample key, ``mean_diff`` (A - B), its
    bootstrap CI and paired t-test / Wilcoxon p-values.
    """
    check_metric_names(metrics)
    if output is not None:
        check_output_file(output, "--output", [predictions, references, against, against_references, records])
    preds, refs, sources = load_pair(predictions, references)
    if records is not None:
        preds, refs, _ = restrict_to_records(preds, refs, records)
    other, other_refs, other_sources = load_pair(against, against_references)
    aligned = align_by_reference(other, other_refs, refs, str(against))
    result = _compare_texts(
        preds, aligned, refs, metrics, {"a": sources, "b": other_sources}, n_resamples, confidence, seed, metric_kwargs
    )
    if output is not None:
        dump_json(output, result)
    return result
