"""Soft-prompt analysis: how much of what the adapters inject is shared by all records, and how much varies.

For every injection point -- the input embedding (replaced by the adapter output) and, with ``injection="layers"``,
every decoder layer's q/k/v projection (the adapter output added, or its projection through the layer's own weight
where k/v are narrower: the grouped-query rule of :mod:`xrec_pl.models.injection`) -- and for the user and the item
slot separately, over the records of a split:

- ``mean_norm``: mean L2 norm of the injected vectors;
- ``shared_fraction`` = ``|mean vector|^2 / mean |v|^2`` and ``varying_fraction`` = ``mean |v - mean|^2 / mean |v|^2``
  (they sum to 1: the energy of the vectors split into the part every record shares and the part that varies);
- ``relative_spread`` = ``sqrt(mean |v - mean|^2) / mean_norm`` (between-record standard deviation over mean norm);
- ``mean_pairwise_cosine`` over all pairs of records;
- ``scale_vs_base``: mean norm of the injected vector over the mean norm of what it is added to (the projection's own
  output at the reserved position; for the input point, the mean norm of the LLM's token embeddings).

A fixed-embedding run gives ``shared_fraction = 1`` and cosine 1 everywhere; the question is how far the graph arm
is from that. Then the *mean replacement*: every record's user (item, both) vector is replaced by the mean over the
split, and the reference NLL is re-scored, paired against the record's own vectors. If only the shared part matters,
the difference is near zero.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xrec_pl.metrics.significance import compare_paired
from xrec_pl.tools.analysis.run import LoadedRun, adapter_vectors, record_nll, teacher_batches

__all__ = ["dispersion", "soft_prompt_analysis"]

SLOTS = ("user", "item")


def dispersion(vectors: Tensor) -> dict[str, float]:
    """Shared vs varying statistics of ``vectors`` ``(N, D)`` (see the module docstring)."""
    x = vectors.double()
    n = x.shape[0]
    norms = x.norm(dim=1)  # (N,)
    mean = x.mean(dim=0)  # (D,)
    energy = float((norms**2).mean())
    varying = float(((x - mean) ** 2).sum(dim=1).mean())
    unit = x / norms.clamp_min(1e-12)[:, None]
    total = float(unit.sum(dim=0).norm() ** 2)
    cosine = (total - n) / (n * (n - 1)) if n > 1 else float("nan")
    return {
        "n": int(n),
        "mean_norm": float(norms.mean()),
        "mean_vector_norm": float(mean.norm()),
        "shared_fraction": float(mean.norm() ** 2) / energy if energy > 0 else float("nan"),
        "varying_fraction": varying / energy if energy > 0 else float("nan"),
        "relative_spread": varying**0.5 / float(norms.mean()) if float(norms.mean()) > 0 else float("nan"),
        "mean_pairwise_cosine": float(cosine),
    }


class _BaseNorms:
    """Forward hooks that record the norm of each projection's output at the reserved positions, minus the delta.

    Registered after the injector's hooks, they see the injected output; the injected delta is subtracted again,
    which leaves the norm of what the adapter output was added to.
    """

    def __init__(self, projections: list[tuple[str, Any]], hidden: int) -> None:
        self.projections = projections
        self.hidden = hidden
        self.sums: dict[tuple[str, str], float] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self._handles: list[Any] = []
        self._context: tuple[Tensor, Tensor] | None = None  # positions (B, 2), vectors (B, 2, H)

    def __enter__(self) -> _BaseNorms:
        for name, proj in self.projections:
            self._handles.append(proj.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set(self, positions: Tensor, vectors: Tensor | None) -> None:
        """Record the next forwards with these positions ``(B, 2)`` and injected vectors ``(B, 2, H)``; ``None``: stop."""
        self._context = None if vectors is None else (positions, vectors)

    def _hook(self, name: str) -> Any:
        def hook(module: Any, args: tuple, output: Tensor) -> None:
            if self._context is None or output.dim() != 3 or output.shape[1] <= 1:
                return
            positions, vectors = self._context
            rows = torch.arange(positions.shape[0], device=output.device)
            for k, slot in enumerate(SLOTS):
                delta = vectors[:, k].to(output.dtype)
                if output.shape[-1] != self.hidden:
                    delta = F.linear(delta, module.weight.to(output.dtype))
                base = output[rows, positions[:, k].to(output.device)] - delta  # (B, out)
                key = (name, slot)
                self.sums[key] = self.sums.get(key, 0.0) + float(base.double().norm(dim=1).sum())
                self.counts[key] = self.counts.get(key, 0) + int(base.shape[0])

        return hook

    def mean(self, name: str, slot: str) -> float:
        count = self.counts.get((name, slot), 0)
        return self.sums[(name, slot)] / count if count else float("nan")


@torch.no_grad()
def soft_prompt_analysis(
    run: LoadedRun,
    split: str = "tst",
    seed: int = 0,
    precision: str = "32",
    replace: tuple[str, ...] = ("user", "item", "both"),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Dispersion of the injected vectors per injection point, and the mean-replacement NLL test.

    ``replace`` chooses the mean-replacement variants (each is one more pass over the split).

    Returns:
        ``(summary, rows)``: ``summary["points"]`` (one entry per injection point and slot), ``summary["input"]``
        (the adapter outputs themselves), ``summary["mean_replacement"]`` (paired NLL statistics, replaced minus own,
        for ``user``, ``item`` and ``both``); one row per record with its NLLs.
    """
    module = run.module
    started = time.perf_counter()
    batches = list(teacher_batches(run, split))
    per_batch = [adapter_vectors(module, b["user_id"], b["item_id"]) for b in batches]
    summary: dict[str, Any] = {
        "split": split,
        "embedding_source": module.hparams.embedding_source,
        "injection": module.hparams.injection,
        "adapter": module.hparams.adapter,
        "checkpoint": str(run.checkpoint),
        "precision": precision,
    }
    if any(v is None for v in per_batch) or not per_batch:
        summary["note"] = "this run injects nothing (no adapter or no injection)"
        return summary, []
    vectors = torch.cat(per_batch).float()  # (N, 2, H)
    hidden = module.injector.hidden_size
    projections = list(module.injector.projections)
    token_norm = float(module.llm.get_input_embeddings().weight.detach().double().norm(dim=1).mean())
    points: list[dict[str, Any]] = []
    for k, slot in enumerate(SLOTS):
        stats = dispersion(vectors[:, k])
        points.append({"point": "input", "slot": slot, **stats, "scale_vs_base": stats["mean_norm"] / token_norm})
    for name, proj in projections:
        for k, slot in enumerate(SLOTS):
            v = vectors[:, k]
            if int(proj.weight.shape[0]) != hidden:
                v = F.linear(v, proj.weight.float())  # the grouped-query rule: through the layer's own weight
            points.append({"point": name, "slot": slot, **dispersion(v)})
    summary["n"] = int(vectors.shape[0])
    summary["token_embedding_mean_norm"] = token_norm

    means = vectors.mean(dim=0, keepdim=True)  # (1, 2, H)
    known = {"user": (0,), "item": (1,), "both": (0, 1)}
    bad = [r for r in replace if r not in known]
    if bad:
        raise ValueError(f"replace: unknown variant(s) {bad}; choose from {sorted(known)}")
    variants = {"own": None, **{r: known[r] for r in replace}}
    nll: dict[str, list[np.ndarray]] = {k: [] for k in variants}
    base = _BaseNorms(projections, hidden)
    with base:
        for batch, vec in zip(batches, per_batch):
            positions = torch.stack([batch["user_pos"], batch["item_pos"]], dim=1)
            for name, slots in variants.items():
                v = vec.clone()
                for k in slots or ():
                    v[:, k] = means[0, k].to(v.dtype)
                base.set(positions, vec if name == "own" else None)  # base norms from the own pass only
                nll[name].append(record_nll(module, batch, v, precision).numpy())
            base.set(positions, None)
    for point in points:
        if point["point"] != "input":
            point["scale_vs_base"] = point["mean_norm"] / base.mean(point["point"], point["slot"])
    summary["points"] = points
    arrays = {k: np.concatenate(v) for k, v in nll.items()}
    summary["mean_replacement"] = {
        k: compare_paired(arrays[k], arrays["own"], seed=seed) for k in variants if k != "own"
    }
    summary["layers_summary"] = _layer_summary(points)
    summary["wall_s"] = time.perf_counter() - started
    index = torch.cat([b["index"] for b in batches]).tolist()
    rows = [
        {
            "index": int(index[j]),
            **{f"nll_{k}" if k == "own" else f"nll_mean_{k}": float(arrays[k][j]) for k in variants},
        }
        for j in np.argsort(index, kind="stable")
    ]
    return summary, rows


def _layer_summary(points: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per slot and projection kind (q/k/v): the mean over layers of the shared fraction, cosine and scale."""
    out: dict[str, dict[str, float]] = {}
    for p in points:
        kind = "input" if p["point"] == "input" else p["point"].rsplit(".", 1)[-1]
        key = f"{p['slot']}/{kind}"
        acc = out.setdefault(key, {"layers": 0, "shared_fraction": 0.0, "mean_pairwise_cosine": 0.0, "scale": 0.0})
        acc["layers"] += 1
        acc["shared_fraction"] += p["shared_fraction"]
        acc["mean_pairwise_cosine"] += p["mean_pairwise_cosine"]
        acc["scale"] += p.get("scale_vs_base", float("nan"))
    for acc in out.values():
        for key in ("shared_fraction", "mean_pairwise_cosine", "scale"):
            acc[key] /= acc["layers"]
    return out
