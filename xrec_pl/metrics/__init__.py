"""Explanation metrics as torchmetrics Metrics whose states are per-sample tensors (DDP-safe; text is never synced).

``build_metric("bertscore", num_layers=6)`` builds one by name; names: ``usr``, ``bertscore``, ``bleurt``,
``bartscore``, ``llm_judge``. Heavy packages (bert_score, transformers) load only when a backend is first used.
"""

from __future__ import annotations

from typing import Any

from xrec_pl.metrics.bartscore import BARTScore
from xrec_pl.metrics.base import PerSampleMetric, stable_text_hash
from xrec_pl.metrics.bertscore import BERTScore
from xrec_pl.metrics.bleurt import BLEURT
from xrec_pl.metrics.judge import LLMJudge, parse_judge_score
from xrec_pl.metrics.usr import USR

METRICS: dict[str, type[PerSampleMetric]] = {
    "usr": USR,
    "bertscore": BERTScore,
    "bleurt": BLEURT,
    "bartscore": BARTScore,
    "llm_judge": LLMJudge,
}


def build_metric(name: str, **kwargs: Any) -> PerSampleMetric:
    """Instantiate the metric registered under ``name`` with ``kwargs``."""
    key = name.lower().replace("-", "_")
    if key not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return METRICS[key](**kwargs)


__all__ = [
    "BARTScore",
    "BERTScore",
    "BLEURT",
    "LLMJudge",
    "METRICS",
    "PerSampleMetric",
    "USR",
    "build_metric",
    "parse_judge_score",
    "stable_text_hash",
]
