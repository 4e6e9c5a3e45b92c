"""Outlier recommendations: explanation quality by how highly stage 1 ranks the explained item for its user.

For each test record ``(u, i)``: stage 1's score of every item for ``u`` is ``user_emb[u] . item_emb``; items ``u``
interacted with in training are masked (except ``i`` itself); the rank of ``i`` is one plus the number of unmasked
items scored higher. Records are bucketed by rank (default edges 20 and 1,000: ``top-20``, ``21-1000``, ``rest``) and
every per-record metric (BERTScore P/R/F1, and, when the run's swap test was written, the NLL change under a user or
item swap) is reported per bucket as a mean with a percentile bootstrap CI; USR per bucket; and a Mann-Whitney U test
of the first bucket against the last.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrec_pl.data.embeddings import load_embeddings
from xrec_pl.data.io import read_interactions, read_para_dict
from xrec_pl.errors import DataError
from xrec_pl.metrics.significance import bootstrap_mean_diff_ci

__all__ = ["bucket_labels", "bucket_names", "bucket_report", "item_ranks"]


def item_ranks(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    users: Sequence[int],
    items: Sequence[int],
    train: np.ndarray | None = None,
) -> np.ndarray:
    """Rank (1 = best) of ``items[k]`` among all items for ``users[k]``, training items of the user masked.

    Args:
        user_emb: ``(U, D)`` stage-1 user embeddings.
        item_emb: ``(I, D)`` stage-1 item embeddings.
        users: user id of each record.
        items: item id of each record.
        train: ``(N, 2)`` training interactions ``[user, item]`` to mask (the record's own item is never masked).
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    seen: dict[int, np.ndarray] = {}
    if train is not None and len(train):
        order = np.argsort(train[:, 0], kind="stable")
        sorted_train = train[order]
        bounds = np.searchsorted(sorted_train[:, 0], np.unique(users), side="left")
        ends = np.searchsorted(sorted_train[:, 0], np.unique(users), side="right")
        for u, lo, hi in zip(np.unique(users).tolist(), bounds.tolist(), ends.tolist()):
            seen[u] = sorted_train[lo:hi, 1]
    ranks = np.empty(users.size, dtype=np.int64)
    item_emb = item_emb.double()
    for k, (u, i) in enumerate(zip(users.tolist(), items.tolist())):
        scores = item_emb @ user_emb[u].double()  # (I,)
        target = scores[i].clone()
        mask = seen.get(u)
        if mask is not None and mask.size:
            scores[torch.as_tensor(mask[mask != i])] = -torch.inf
        ranks[k] = 1 + int((scores > target).sum())
    return ranks


def bucket_names(edges: Sequence[int] = (20, 1000)) -> list[str]:
    """``top-E1``, ``E1+1-E2``, ..., ``over-Ek``."""
    edges = sorted(int(e) for e in edges)
    return [f"top-{edges[0]}"] + [f"{a + 1}-{b}" for a, b in zip(edges, edges[1:])] + [f"over-{edges[-1]}"]


def bucket_labels(ranks: np.ndarray, edges: Sequence[int] = (20, 1000)) -> list[str]:
    """The bucket name (:func:`bucket_names`) of each rank (1 = best)."""
    names = bucket_names(edges)
    edges = sorted(int(e) for e in edges)
    idx = np.searchsorted(np.asarray(edges), ranks, side="left")  # rank <= e -> that bucket
    return [names[int(j)] for j in idx]


def _mean_ci(values: np.ndarray, seed: int) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0, "mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    low, high = bootstrap_mean_diff_ci(values, np.zeros_like(values), seed=seed)  # CI of the mean itself
    return {"n": int(values.size), "mean": float(values.mean()), "ci_low": low, "ci_high": high}


def _read_swaps(path: str | Path | None) -> dict[tuple[int, int], dict[str, Any]]:
    if path is None or not Path(path).is_file():
        return {}
    rows = (json.loads(x) for x in Path(path).read_text().splitlines() if x.strip())
    return {(r["uid"], r["iid"]): r for r in rows}


def bucket_report(
    predictions: str | Path | None,
    embeddings: str | Path,
    data_dir: str | Path,
    edges: Sequence[int] = (20, 1000),
    metrics: Sequence[str] = ("bertscore", "usr"),
    swap_rows: str | Path | None = None,
    seed: int = 0,
    metric_kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-bucket metrics of a predictions file.

    Args:
        predictions: ``predictions.jsonl`` (``uid, iid, prediction, reference``); when it does not exist, the
            records of ``swap_rows`` are bucketed with their NLLs only.
        embeddings: stage-1 ``embeddings.safetensors``.
        data_dir: the dataset (its training interactions are masked).
        edges: bucket edges on the rank.
        metrics: metrics of :func:`xrec_pl.tools.evaluate.evaluate` (per-record ones get CIs; ``usr`` per bucket).
        swap_rows: the swap test's ``swap.jsonl`` of this run (adds NLL changes per bucket), optional.
        seed: bootstrap seed.
        metric_kwargs: options for the metrics, e.g. ``{"bertscore": {...}}``.

    Returns:
        ``(summary, rows)``: per bucket and metric mean/CI, and one row per record with its rank and scores.
    """
    from scipy import stats

    from xrec_pl.tools.evaluate import evaluate

    swaps = _read_swaps(swap_rows)
    if predictions is not None and Path(predictions).is_file():
        path = Path(predictions)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows or not all({"uid", "iid", "prediction", "reference"} <= set(r) for r in rows):
            raise DataError(f"{path}: expected JSON lines with uid, iid, prediction, reference")
    elif swaps:  # no generations: bucket the swap test's records (NLL only)
        rows = [{"uid": s["uid"], "iid": s["iid"]} for s in swaps.values()]
    else:
        raise DataError(f"{predictions}: predictions file not found (run predict first, or run the swap test)")
    user_emb, item_emb = load_embeddings(embeddings)
    para = read_para_dict(data_dir)
    train = read_interactions(data_dir, "trn", para["user_num"], para["item_num"])
    ranks = item_ranks(user_emb, item_emb, [r["uid"] for r in rows], [r["iid"] for r in rows], train)
    labels = bucket_labels(ranks, edges)
    per_record: dict[str, np.ndarray] = {}
    scores: dict[str, Any] = {}
    if "prediction" in rows[0]:
        scores = evaluate(
            [r["prediction"] for r in rows],
            [r["reference"] for r in rows],
            metrics=tuple(metrics),
            per_sample=True,
            **(metric_kwargs or {}),
        )
        per_record = {k: np.asarray(v, dtype=np.float64) for k, v in scores.pop("per_sample").items()}
    else:
        metrics = ()
    if swaps:
        keyed = [swaps.get((r["uid"], r["iid"])) for r in rows]
        per_record["nll_own"] = np.asarray([s["nll_own"] if s else np.nan for s in keyed])
        for kind in ("user", "item"):
            per_record[f"nll_{kind}_swap_minus_own"] = np.asarray(
                [s[f"nll_{kind}_swap"] - s["nll_own"] if s else np.nan for s in keyed]
            )
    names = bucket_names(edges)
    lab = np.asarray(labels)
    summary: dict[str, Any] = {
        "n": len(rows),
        "edges": list(edges),
        "backbones": scores.get("backbones", {}),
        "rank_median": float(np.median(ranks)),
        "buckets": {},
    }
    for name in names:
        sel = lab == name
        entry: dict[str, Any] = {"n": int(sel.sum())}
        for key, values in per_record.items():
            entry[key] = _mean_ci(values[sel], seed)
        if "usr" in metrics and sel.any():
            sub = evaluate([r["prediction"] for r, s in zip(rows, sel) if s], ["x"] * int(sel.sum()), ("usr",))
            entry["usr"] = float(sub["usr"])
        summary["buckets"][name] = entry
    first, last = lab == names[0], lab == names[-1]
    summary["first_vs_last"] = {}
    for key, values in per_record.items():
        a, b = values[first & np.isfinite(values)], values[last & np.isfinite(values)]
        p = float(stats.mannwhitneyu(a, b).pvalue) if a.size and b.size else float("nan")
        summary["first_vs_last"][key] = {"mean_diff": float(a.mean() - b.mean()) if a.size and b.size else None, "p": p}
    out_rows = [
        {
            "uid": r["uid"],
            "iid": r["iid"],
            "rank": int(k),
            "bucket": b,
            **{m: float(v[j]) for m, v in per_record.items()},
        }
        for j, (r, k, b) in enumerate(zip(rows, ranks, labels))
    ]
    return summary, out_rows
