"""Paired significance for two systems scored on the same references.

For per-sample scores ``a`` and ``b`` of the same N samples (same order), ``d = a - b``:
- a percentile bootstrap confidence interval of ``mean(d)`` (resample the N pairs with replacement,
  ``n_resamples`` times, seeded),
- a paired t-test (``scipy.stats.ttest_rel``) and a Wilcoxon signed-rank test (``scipy.stats.wilcoxon``),
  both two-sided.
Pairs where either score is NaN (e.g. an unparsable judge answer) are dropped first and counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _as_pairs(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal lengths, got {a.size} and {b.size}")
    finite = np.isfinite(a) & np.isfinite(b)
    return a[finite], b[finite], int((~finite).sum())


def bootstrap_mean_diff_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 1_000,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(a - b)`` over paired samples (seeded, resampled in chunks)."""
    a, b, _ = _as_pairs(a, b)
    d = a - b
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        idx = rng.integers(0, d.size, size=(size, d.size))  # (size, N)
        means[start : start + size] = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_tests(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Two-sided paired t-test and Wilcoxon signed-rank test; p = 1.0 where ``a == b`` everywhere."""
    from scipy import stats

    a, b, _ = _as_pairs(a, b)
    d = a - b
    out = {"t_statistic": math.nan, "t_pvalue": math.nan, "wilcoxon_statistic": math.nan, "wilcoxon_pvalue": math.nan}
    if d.size < 2:
        return out
    if np.all(d == 0):
        out.update(t_statistic=0.0, t_pvalue=1.0, wilcoxon_statistic=0.0, wilcoxon_pvalue=1.0)
        return out
    t = stats.ttest_rel(a, b)
    out["t_statistic"], out["t_pvalue"] = float(t.statistic), float(t.pvalue)
    w = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    out["wilcoxon_statistic"], out["wilcoxon_pvalue"] = float(w.statistic), float(w.pvalue)
    return out


def compare_paired(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything for one metric: means, mean difference (a - b), bootstrap CI, t-test and Wilcoxon p-values."""
    fa, fb, dropped = _as_pairs(a, b)
    low, high = bootstrap_mean_diff_ci(fa, fb, n_resamples=n_resamples, confidence=confidence, seed=seed)
    out: dict[str, Any] = {
        "n": int(fa.size),
        "dropped_nan": dropped,
        "mean_a": float(fa.mean()) if fa.size else math.nan,
        "mean_b": float(fb.mean()) if fb.size else math.nan,
        "mean_diff": float((fa - fb).mean()) if fa.size else math.nan,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
    }
    out.update(paired_tests(fa, fb))
    return out


def compare_scores(
    scores_a: Mapping[str, Sequence[float] | np.ndarray],
    scores_b: Mapping[str, Sequence[float] | np.ndarray],
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """:func:`compare_paired` for every metric key the two score dicts share (``sample_id`` is skipped)."""
    keys = [k for k in scores_a if k in scores_b and k != "sample_id"]
    return {k: compare_paired(scores_a[k], scores_b[k], n_resamples, confidence, seed) for k in keys}
