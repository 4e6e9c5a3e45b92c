"""The report of an ablation suite: results.csv, significance.csv, report.md and report.png from the finished runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from xrec_pl import run_layout
from xrec_pl.errors import ConfigError
from xrec_pl.tools.suite import ARMS, Suite
from xrec_pl.utils import atomic_write_text

# --------------------------------------------------------------------------------------------------------- reporting


def _run_scores(run_dir: Path) -> dict[str, float]:
    data = json.loads((run_dir / run_layout.METRICS).read_text())
    return {k: float(v) for k, v in data.get("explanations", {}).items() if isinstance(v, (int, float))}


def _per_sample(run_dir: Path) -> dict[str, dict[tuple[int, int], float]]:
    path = run_dir / run_layout.PER_SAMPLE
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {m: {(int(r["uid"]), int(r["iid"])): float(r["score"]) for r in rows} for m, rows in raw.items()}


def write_report(spec: Suite, out: Path, seeds: list[int], wall_s: float = 0.0) -> dict[str, Any]:
    """Collect finished runs into results.csv, significance.csv, report.md and report.png."""
    from xrec_pl.metrics.significance import compare_paired

    rows: list[dict[str, Any]] = []
    for arm in spec.arms:
        for seed in seeds:
            run_dir = out / arm / f"seed{seed}"
            if (run_dir / run_layout.METRICS).exists():
                rows.append({"arm": arm, "seed": seed, **_run_scores(run_dir)})
    if not rows:
        raise ConfigError(f"{out}: no finished runs to report")
    metric_names = sorted({k for r in rows for k in r if k not in ("arm", "seed", "n")} - {"judge_unparsable"})
    _write_csv(out / run_layout.RESULTS_CSV, rows, ["arm", "seed", *metric_names])

    summary: dict[str, dict[str, tuple[float, float, int]]] = {}
    for arm in spec.arms:
        arm_rows = [r for r in rows if r["arm"] == arm]
        summary[arm] = {}
        for m in metric_names:
            values = [r[m] for r in arm_rows if m in r]
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                summary[arm][m] = (float(np.mean(values)), std, len(values))

    sig_rows: list[dict[str, Any]] = []
    for arm in spec.arms:
        if arm == spec.reference_arm:
            continue
        for metric in spec_metrics_per_sample(spec):
            a, b = [], []
            for seed in seeds:
                ours = _per_sample(out / arm / f"seed{seed}").get(metric, {})
                ref = _per_sample(out / spec.reference_arm / f"seed{seed}").get(metric, {})
                keys = [k for k in sorted(set(ours) & set(ref)) if math.isfinite(ours[k]) and math.isfinite(ref[k])]
                a += [ours[k] for k in keys]
                b += [ref[k] for k in keys]
            if len(a) >= 2:
                result = compare_paired(np.asarray(a), np.asarray(b))
                sig_rows.append({"arm": arm, "vs": spec.reference_arm, "metric": metric, "n_pairs": len(a), **result})
    if sig_rows:
        _write_csv(out / run_layout.SIGNIFICANCE_CSV, sig_rows, list(sig_rows[0]))
    plot = _plot(summary, out / run_layout.REPORT_PNG)
    run_s = sum(_run_wall(out / r["arm"] / f"seed{r['seed']}") for r in rows)
    shown = [m for m in metric_names if not m.endswith(("_std", "_n")) and m not in ("usr_unique", "empty_predictions")]
    report = _markdown(spec, seeds, summary, shown, sig_rows, (wall_s, run_s), plot)
    atomic_write_text(out / run_layout.REPORT_MD, report)
    return {"results": rows, "summary": summary, "significance": sig_rows, "report": str(out / run_layout.REPORT_MD)}


def spec_metrics_per_sample(spec: Suite) -> list[str]:
    names = {
        "bertscore": ["bertscore_f1"],
        "bleurt": ["bleurt"],
        "bartscore": ["bartscore"],
        "llm_judge": ["llm_judge"],
        "community": ["community"],
    }
    extra = ["community_choice"] if spec.data_dir is None else []  # synthetic suites: the forced-choice test
    return [m for metric in spec.metrics for m in names.get(metric, [])] + extra


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if math.isfinite(std) else f"{mean:.4f}"


def _run_wall(run_dir: Path) -> float:
    path = run_dir / run_layout.WALL
    return float(json.loads(path.read_text()).get("seconds", 0.0)) if path.exists() else 0.0


def _markdown(spec, seeds, summary, metric_names, sig_rows, times, plot) -> str:
    wall_s, run_s = times
    lines = [f"# Suite `{spec.name}`", ""]
    if spec.notes:
        lines += [spec.notes.strip(), ""]
    lines += [
        f"Seeds: {seeds}. Data: `{spec.data_dir or 'synthetic (' + spec.synthetic_size + ')'}`. "
        f"Stage configs: `{spec.stage1_config}`, `{spec.stage2_config}`"
        + (f" with `{' '.join(spec.stage2_args)}`" if spec.stage2_args else "")
        + ".",
        f"Wall time of this invocation: {wall_s / 60:.1f} min; the finished runs took {run_s / 60:.1f} min "
        "(sum of their `wall.json`; shared stage-1 training not included).",
        "",
        "## Mean ± std over seeds (all columns, and the per-record spread, in results.csv)",
        "",
        "| arm | runs | " + " | ".join(metric_names) + " |",
        "|---|---|" + "---|" * len(metric_names),
    ]
    for arm, stats in summary.items():
        cells = [_fmt(*stats[m][:2]) if m in stats else "–" for m in metric_names]
        runs = max((n for _, _, n in stats.values()), default=0)
        lines.append(f"| {arm} | {runs} | " + " | ".join(cells) + " |")
    if sig_rows:
        lines += [
            "",
            f"## Paired significance against `{spec.reference_arm}` (per record, pooled over seeds)",
            "",
            "| arm | metric | pairs | mean diff | 95% bootstrap CI | p (paired t) | p (Wilcoxon) | significant |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sig_rows:
            sig = "yes" if r["t_pvalue"] < 0.05 and r["wilcoxon_pvalue"] < 0.05 else "no"
            lines.append(
                f"| {r['arm']} | {r['metric']} | {r['n_pairs']} | {r['mean_diff']:+.4f} | "
                f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['t_pvalue']:.3g} | {r['wilcoxon_pvalue']:.3g} | {sig} |"
            )
    lines += ["", "## Arms", ""] + [f"- `{arm}`: {ARMS[arm]['doc']}" for arm in spec.arms]
    if plot:
        lines += ["", f"![main metrics per arm]({plot.name})"]
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = ("bertscore_f1", "usr", "bleurt", "llm_judge", "community", "community_choice")
    metrics = [m for m in main if any(m in s for s in summary.values())]
    if not metrics:
        return None
    arms = list(summary)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.45 * len(arms) + 1.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        means = [summary[a].get(metric, (np.nan, 0, 0))[0] for a in arms]
        stds = [summary[a].get(metric, (np.nan, 0, 0))[1] for a in arms]
        ax.barh(arms, means, xerr=stds, color="#4c72b0", capsize=3)
        ax.invert_yaxis()
        ax.set_title(metric)
        finite = [m for m in means if np.isfinite(m)]
        if finite and metric not in ("usr", "community", "community_choice"):
            lo, hi = min(finite), max(finite)
            pad = max(0.02, (hi - lo) * 0.5)
            ax.set_xlim(lo - pad, hi + pad)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
