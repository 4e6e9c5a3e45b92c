"""USR, the unique sentence ratio: the share of generated explanations that are distinct token sequences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from xrec_pl.metrics.base import PerSampleMetric, stable_text_hash


class USR(PerSampleMetric):
    """Unique sentence ratio of the predictions (references are ignored).

    Each prediction is reduced to an int64 hash of its whitespace-normalised token sequence (``str.split()``:
    case and punctuation count, runs of whitespace do not); the hashes are gathered across ranks and
    ``usr = #distinct hashes / #samples``. Returns ``{"usr": ..., "usr_unique": ..., "usr_n": ...}``.

    Args:
        hash_fn: text -> signed 64-bit int; defaults to :func:`stable_text_hash`. Must be stable across processes.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    extra_int_states = ("token_hash",)

    def __init__(self, hash_fn: Callable[[str], int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hash_fn = hash_fn or stable_text_hash

    def _score(self, preds: list[str], target: list[str]) -> dict[str, Tensor]:
        return {"token_hash": torch.tensor([self.hash_fn(p) for p in preds], dtype=torch.long)}

    def _summarise(self, states: dict[str, Tensor]) -> dict[str, float]:
        hashes = states["token_hash"]
        n = hashes.numel()
        unique = torch.unique(hashes).numel()
        return {"usr": unique / n if n else float("nan"), "usr_unique": float(unique), "usr_n": float(n)}

    def describe(self) -> dict[str, Any]:
        name = "whitespace tokens, blake2b-64" if self.hash_fn is stable_text_hash else repr(self.hash_fn)
        return {"tokenization": name}
