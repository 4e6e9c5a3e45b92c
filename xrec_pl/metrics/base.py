"""Shared machinery of the explanation metrics: per-sample tensor states that survive a DDP sync.

Every metric here scores each (prediction, reference) pair on the rank that holds it and appends *per-sample
tensors* to list states reduced with ``dist_reduce_fx="cat"``. torchmetrics gathers only tensors, so text never
crosses processes (USR gathers an int64 hash of each token sequence instead). A ``sample_id`` state travels with
the scores: the padding a ``DistributedSampler`` adds (the same sample on two ranks) is dropped by id at
``compute()``, so a synced result equals the single-process result on the same samples.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from xrec_pl.errors import DataError
from xrec_pl.metrics.hashing import stable_text_hash  # noqa: F401  (re-exported)

UNASSIGNED_ID = -1


def check_texts(preds: Sequence[str], target: Sequence[str]) -> tuple[list[str], list[str]]:
    """Validate one update's predictions and references (same length, all ``str``) and return them as lists."""
    if isinstance(preds, str) or isinstance(target, str):
        raise TypeError("preds and target must be sequences of strings, not a single string")
    preds, target = list(preds), list(target)
    if len(preds) != len(target):
        raise ValueError(f"got {len(preds)} predictions but {len(target)} references")
    for name, texts in (("prediction", preds), ("reference", target)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name} {i} is {type(text).__name__}, expected str")
    return preds, target


def as_id_tensor(ids: Sequence[int] | Tensor | None, n: int) -> Tensor:
    """Sample ids as an int64 tensor of shape (n,); ``None`` means "no ids" (``UNASSIGNED_ID``, never deduplicated)."""
    if ids is None:
        return torch.full((n,), UNASSIGNED_ID, dtype=torch.long)
    out = torch.as_tensor(ids).detach().to(device="cpu", dtype=torch.long).flatten()
    if out.numel() != n:
        raise ValueError(f"got {out.numel()} sample ids for {n} samples")
    if (out < 0).any():
        raise ValueError("sample ids must be >= 0")
    return out


def require_path(path: str | os.PathLike | None, what: str) -> Path:
    """Return ``path`` as a Path if it exists, else raise a ``DataError`` that names it and what it should hold."""
    if path is None or str(path) == "":
        raise DataError(
            f"{what}: no checkpoint path given (these weights cannot be downloaded here; pass a local path)"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: {what} checkpoint not found")
    return p


def mean_std(x: Tensor) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0) of the finite entries; NaN for an empty tensor."""
    x = x[torch.isfinite(x)].double()
    if x.numel() == 0:
        return math.nan, math.nan
    return x.mean().item(), x.std(correction=0).item()


class PerSampleMetric(Metric):
    """Base class: float per-sample score states plus a ``sample_id`` state, deduplicated at compute.

    Subclasses set ``score_names`` (float states) and may add int64 states in ``extra_int_states``; they implement
    ``_score(preds, target) -> dict[name, Tensor (B,)]`` and ``_summarise(states) -> dict[str, float]``.
    ``update(preds, target, ids=None)``: ``ids`` are the dataset indices of the samples; under DDP pass them, so
    padded duplicates are recognised. Samples without ids are never deduplicated.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    score_names: tuple[str, ...] = ()
    extra_int_states: tuple[str, ...] = ()
    sample_keys: dict[str, str] = {}  # float state -> the summary key its per-sample values feed (significance)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_dtypes: dict[str, torch.dtype] = {"sample_id": torch.long}
        self.add_state("sample_id", default=[], dist_reduce_fx="cat")
        for name in self.score_names:
            self.add_state(name, default=[], dist_reduce_fx="cat")
            self._state_dtypes[name] = torch.float64
        for name in self.extra_int_states:
            self.add_state(name, default=[], dist_reduce_fx="cat")
            self._state_dtypes[name] = torch.long

    # -- subclass API ---------------------------------------------------------------------------------------
    def _score(self, preds: list[str], target: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _summarise(self, states: dict[str, Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What produced the scores (backbone, checkpoint, layer, ...), for reports."""
        return {}

    # -- torchmetrics API -----------------------------------------------------------------------------------
    def update(self, preds: Sequence[str], target: Sequence[str], ids: Sequence[int] | Tensor | None = None) -> None:
        """Score a batch of (prediction, reference) pairs and append the per-sample results."""
        preds, target = check_texts(preds, target)
        id_tensor = as_id_tensor(ids, len(preds))
        if not preds:
            return
        scores = self._score(preds, target)
        self.sample_id.append(id_tensor.to(self.device))
        for name in (*self.score_names, *self.extra_int_states):
            value = torch.as_tensor(scores[name]).detach().flatten()
            if value.numel() != len(preds):
                raise RuntimeError(f"{type(self).__name__}: scorer returned {value.numel()} {name} for {len(preds)}")
            getattr(self, name).append(value.to(device=self.device, dtype=self._state_dtypes[name]))

    def compute(self) -> dict[str, float]:
        """Summary statistics over the deduplicated samples (all ranks' samples after a sync)."""
        return self._summarise(self.per_sample())

    def per_sample(self) -> dict[str, Tensor]:
        """All states as tensors, duplicates (same id) removed and sorted by id; unassigned ids keep update order.

        Call on a synced metric (inside ``compute`` or after ``sync()``) to see every rank's samples.
        """
        ids = self._cat("sample_id")
        states = {name: self._cat(name) for name in (*self.score_names, *self.extra_int_states)}
        keep = _first_occurrence_order(ids)
        out = {name: value[keep] for name, value in states.items()}
        out["sample_id"] = ids[keep]
        return out

    def sample_scores(self) -> dict[str, Tensor]:
        """Per-sample values of each summary key (e.g. ``{"bertscore_f1": (N,)}``) plus ``sample_id``, deduplicated.

        These are what paired significance tests compare. Set-level metrics (USR) have none. Under DDP this is a
        collective call (every rank gets all samples).
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=not self._is_synced):
            states = self.per_sample()
        out = {key: states[state] for state, key in self.sample_keys.items()}
        out["sample_id"] = states["sample_id"]
        return out

    def _cat(self, name: str) -> Tensor:
        value = getattr(self, name)
        if isinstance(value, list) and not value:
            return torch.empty(0, dtype=self._state_dtypes[name], device=self.device)
        return dim_zero_cat(value).to(self._state_dtypes[name])

    def _sync_dist(self, dist_sync_fn=gather_all_tensors, process_group: Any | None = None) -> None:
        # torchmetrics fills a rank's empty list state with a float32 tensor before gathering; that would promote
        # int64 ids/hashes to float (losing bits) and mismatch dtypes across ranks. Give empty states their dtype.
        for name, dtype in self._state_dtypes.items():
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                setattr(self, name, [torch.empty(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)


def _first_occurrence_order(ids: Tensor) -> Tensor:
    """Indices that keep the first sample of each id >= 0 (sorted by id), then every unassigned sample in order."""
    positions = torch.arange(ids.numel(), device=ids.device)
    assigned = ids >= 0
    a_ids, a_pos = ids[assigned], positions[assigned]
    if a_ids.numel():
        uniq, inverse = torch.unique(a_ids, sorted=True, return_inverse=True)
        first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
        first = first.scatter_reduce(0, inverse, a_pos, reduce="amin")
        kept = first
    else:
        kept = a_pos
    return torch.cat([kept, positions[~assigned]])
