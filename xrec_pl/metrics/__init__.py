"""Explanation metrics as torchmetrics Metrics whose states are per-sample tensors (DDP-safe; text is never synced).

``build_metric("bertscore", num_layers=6)`` builds one by name; names: ``usr``, ``bertscore``, ``bleurt``,
``bartscore``, ``llm_judge``, ``community`` (synthetic data: does the prediction name the reference's
graph-only community). The classes are imported on first access (``from xrec_pl.metrics import USR``), so
importing this package or ``xrec_pl.metrics.hashing`` stays light; bert_score / transformers load only when a
backend is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xrec_pl.metrics.bartscore import BARTScore
    from xrec_pl.metrics.base import PerSampleMetric
    from xrec_pl.metrics.bertscore import BERTScore
    from xrec_pl.metrics.bleurt import BLEURT
    from xrec_pl.metrics.hashing import stable_text_hash
    from xrec_pl.metrics.judge import LLMJudge, parse_judge_score
    from xrec_pl.metrics.phrase import PhraseRecall
    from xrec_pl.metrics.usr import USR

# metric name -> "module:Class"
METRICS: dict[str, str] = {
    "usr": "xrec_pl.metrics.usr:USR",
    "bertscore": "xrec_pl.metrics.bertscore:BERTScore",
    "bleurt": "xrec_pl.metrics.bleurt:BLEURT",
    "bartscore": "xrec_pl.metrics.bartscore:BARTScore",
    "llm_judge": "xrec_pl.metrics.judge:LLMJudge",
    "community": "xrec_pl.metrics.phrase:PhraseRecall",
}

_EXPORTS = {
    "USR": "xrec_pl.metrics.usr",
    "BERTScore": "xrec_pl.metrics.bertscore",
    "BLEURT": "xrec_pl.metrics.bleurt",
    "BARTScore": "xrec_pl.metrics.bartscore",
    "LLMJudge": "xrec_pl.metrics.judge",
    "PhraseRecall": "xrec_pl.metrics.phrase",
    "parse_judge_score": "xrec_pl.metrics.judge",
    "PerSampleMetric": "xrec_pl.metrics.base",
    "stable_text_hash": "xrec_pl.metrics.hashing",
}


def metric_class(name: str) -> type[PerSampleMetric]:
    """The class registered under ``name`` (case-insensitive, ``-`` = ``_``)."""
    key = name.lower().replace("-", "_")
    if key not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    module, cls = METRICS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def build_metric(name: str, **kwargs: Any) -> PerSampleMetric:
    """Instantiate the metric registered under ``name`` with ``kwargs``."""
    return metric_class(name)(**kwargs)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BARTScore",
    "BERTScore",
    "BLEURT",
    "LLMJudge",
    "METRICS",
    "PerSampleMetric",
    "PhraseRecall",
    "USR",
    "build_metric",
    "metric_class",
    "parse_judge_score",
    "stable_text_hash",
]
