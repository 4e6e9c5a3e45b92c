"""``xrec-pl experiment``: every arm of an ablation suite for every seed, then one report.

A suite is a YAML file (``configs/experiments/*.yaml``) that names a dataset, the two stage configs and a list of
arms. An arm is a set of small delta configs over the stage configs (``configs/ablations/*.yaml``), so an arm
changes exactly what its file says. Runs go to ``<out_dir>/<arm>/seed<k>/`` (the pipeline's run-folder layout);
stage 1 is trained once per (seed, stage-1 delta) and shared by the arms that use it. A suite that stopped part-way
resumes where it stopped: finished runs are read, not re-run.

The results folder holds ``results.csv`` (one row per arm and seed), ``significance.csv`` (each arm against the
reference arm, paired per record), ``report.md`` and ``report.png``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrec_pl.outputs import check_output_dir
from xrec_pl.utils import atomic_write_text, dump_json

# The arms the framework knows: stage-2 and stage-1 delta files, and whether stage 2 trains.
ARMS: dict[str, dict[str, Any]] = {
    "xrec": {"doc": "full XRec: graph embeddings, MoE adapters, injection in every layer"},
    "no_moe": {"stage2": ["ablations/no_moe.yaml"], "doc": "single linear adapter instead of the MoE"},
    "no_adapter": {"stage2": ["ablations/no_adapter.yaml"], "doc": "no adapter: reserved tokens keep new embeddings"},
    "fixed_emb": {"stage2": ["ablations/fixed_emb.yaml"], "doc": "one constant embedding for all users/items"},
    "random_emb": {"stage2": ["ablations/random_emb.yaml"], "doc": "random embedding fixed per id"},
    "redrawn_emb": {"stage2": ["ablations/redrawn_emb.yaml"], "doc": "random embedding re-drawn every step"},
    "input_only": {"stage2": ["ablations/input_only.yaml"], "doc": "injection at the input tokens only"},
    "no_injection": {
        "stage2": ["ablations/no_injection.yaml"],
        "train": False,  # nothing reaches the LLM from the adapters, so there is nothing to train
        "doc": "no injection at all: adapters disconnected, nothing to train (the plain prompt)",
    },
    "no_profiles": {"stage2": ["ablations/no_profiles.yaml"], "doc": "title only, no user/item profiles"},
    "no_profiles_no_injection": {
        "stage2": ["ablations/no_profiles.yaml", "ablations/no_injection.yaml"],
        "doc": "no profiles and no injection",
    },
    "plain_llm": {
        "stage2": ["ablations/plain_llm.yaml"],
        "train": False,
        "doc": "the frozen LLM with the same prompt, no adapters, no training",
    },
    "lightgcn_mean": {"stage1": ["ablations/lightgcn_mean.yaml"], "doc": "LightGCN layers averaged, not summed"},
    "lora": {"stage2": ["ablations/lora.yaml"], "doc": "peft LoRA on the frozen LLM, same prompt, no graph"},
    "prompt_tuning": {
        "stage2": ["ablations/prompt_tuning.yaml"],
        "doc": "peft prompt tuning on the frozen LLM, same prompt, no graph",
    },
}


@dataclass
class Suite:
    """A parsed suite file."""

    name: str
    arms: list[str]
    out_dir: str
    stage1_config: str
    stage2_config: str
    data_dir: str | None = None
    synthetic_size: str = "default"
    stage1_args: list[str] = field(default_factory=list)
    stage2_args: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: ["usr", "bertscore"])
    reference_arm: str = "xrec"
    notes: str = ""


def validate_suite(suite: Suite, where: str = "suite") -> Suite:
    """Check arm names and the reference arm; errors name the suite file."""
    from xrec_pl.cli import ConfigError

    if not suite.arms:
        raise ConfigError(f"{where}: the suite has no arms")
    bad = [arm for arm in suite.arms if arm not in ARMS]
    if bad:
        raise ConfigError(f"{where}: unknown arm(s) {bad}; known arms: {sorted(ARMS)}")
    if suite.reference_arm not in suite.arms:
        raise ConfigError(f"{where}: reference_arm {suite.reference_arm!r} is not among the arms {suite.arms}")
    return suite


def load_suite(path: str) -> Suite:
    """Read and validate a suite YAML; unknown arms and keys are errors that name the file."""
    import yaml

    from xrec_pl.cli import ConfigError
    from xrec_pl.pipeline import resolve_config

    file = resolve_config(path)
    raw = yaml.safe_load(file.read_text()) or {}
    known = set(Suite.__dataclass_fields__)
    unexpected = sorted(set(raw) - known)
    if unexpected:
        raise ConfigError(f"{file}: unknown key(s) {unexpected}; allowed: {sorted(known)}")
    missing = [k for k in ("name", "arms", "out_dir", "stage1_config", "stage2_config") if k not in raw]
    if missing:
        raise ConfigError(f"{file}: missing key(s) {missing}")
    return validate_suite(Suite(**raw), str(file))


def _stage1_key(arm: str) -> str:
    deltas = ARMS[arm].get("stage1", [])
    return "default" if not deltas else "+".join(Path(d).stem for d in deltas)


def _config_args(deltas: list[str]) -> list[str]:
    from xrec_pl.pipeline import resolve_config

    args: list[str] = []
    for delta in deltas:
        args += ["--config", str(resolve_config(delta))]
    return args


_SETTINGS = ("data_dir", "synthetic_size", "stage1_config", "stage2_config", "stage1_args", "stage2_args")


def _check_results_folder(suite: Suite, out: Path) -> None:
    """Refuse a results folder written by another suite, or by this suite with other run settings."""
    from xrec_pl.cli import ConfigError

    marker = out / "suite.json"
    settings = {key: getattr(suite, key) for key in _SETTINGS}
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("name") != suite.name:
            raise ConfigError(
                f"{out}: holds results of suite {previous.get('name')!r}, not {suite.name!r}; choose another out_dir"
            )
        old = previous.get("settings", settings)
        changed = [key for key in _SETTINGS if key in old and old[key] != settings[key]]
        if changed:
            raise ConfigError(
                f"{out}: its finished runs were made with other settings ({', '.join(changed)} changed: "
                f"{old[changed[0]]!r} -> {settings[changed[0]]!r}); restore them or choose another out_dir"
            )
    dump_json(marker, {"name": suite.name, "arms": suite.arms, "settings": settings})


def experiment(
    name: str = "smoke",
    arms: list[str] | None = None,
    out_dir: str = "runs/experiments/smoke",
    stage1_config: str = "configs/stage1/synthetic.yaml",
    stage2_config: str = "configs/stage2/synthetic.yaml",
    data_dir: str | None = None,
    synthetic_size: str = "default",
    stage1_args: list[str] | None = None,
    stage2_args: list[str] | None = None,
    metrics: list[str] | None = None,
    reference_arm: str = "xrec",
    notes: str = "",
    seeds: list[int] | None = None,
    only: list[str] | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run an ablation suite over seeds and write results.csv, significance.csv, report.md and report.png.

    A suite is this command's config file: ``xrec-pl experiment -c configs/experiments/smoke.yaml --seeds '[0,1]'``.

    Args:
        name: Suite name (recorded in the results folder; another suite's folder is refused).
        arms: Arms to run (see ``xrec_pl.experiment.ARMS``).
        out_dir: Results folder.
        stage1_config: Stage-1 LightningCLI config.
        stage2_config: Stage-2 LightningCLI config.
        data_dir: XRec data folder; ``None`` generates the synthetic dataset (one per seed).
        synthetic_size: ``tiny``, ``default`` or ``smoke`` when ``data_dir`` is ``None``.
        stage1_args: Overrides for every stage-1 run.
        stage2_args: Overrides for every stage-2 run (subset sizes, generation length).
        metrics: Explanation metrics (default: usr, bertscore).
        reference_arm: The arm every other arm is tested against.
        notes: Free text placed at the top of the report.
        seeds: Seeds to run (default ``[0, 1]``).
        only: Run only these arms of the suite now (the report covers every finished arm).
        report_only: Do not train; rebuild the report from the finished runs.
    """
    from xrec_pl.cli import ConfigError
    from xrec_pl.pipeline import pipeline

    spec = validate_suite(
        Suite(
            name=name,
            arms=list(arms or []),
            out_dir=out_dir,
            stage1_config=stage1_config,
            stage2_config=stage2_config,
            data_dir=data_dir,
            synthetic_size=synthetic_size,
            stage1_args=list(stage1_args or []),
            stage2_args=list(stage2_args or []),
            metrics=list(metrics or ["usr", "bertscore"]),
            reference_arm=reference_arm,
            notes=notes,
        ),
        f"suite {name!r}",
    )
    seeds = [0, 1] if seeds is None else list(seeds)
    if not seeds:
        raise ConfigError(f"suite {name!r}: the seed list is empty")
    to_run = list(only or spec.arms)
    bad = [a for a in to_run if a not in spec.arms]
    if bad:
        raise ConfigError(f"suite {name!r}: arm(s) {bad} are not in this suite ({spec.arms})")
    out = check_output_dir(spec.out_dir, "out_dir", [spec.data_dir])
    _check_results_folder(spec, out)
    started = time.perf_counter()

    if not report_only:
        for seed in seeds:
            for arm in to_run:
                run_arm(spec, out, arm, seed, pipeline)
    return write_report(spec, out, seeds, wall_s=time.perf_counter() - started)


def run_arm(spec: Suite, out: Path, arm: str, seed: int, pipeline: Any) -> Path:
    """Run one (arm, seed) unless it already finished; returns its run folder."""
    run_dir = out / arm / f"seed{seed}"
    if (run_dir / "metrics.json").exists():
        return run_dir
    stage1_dir = out / "_stage1" / f"{_stage1_key(arm)}-seed{seed}"
    emb = stage1_dir / "stage1" / "embeddings.safetensors"
    data_dir = spec.data_dir or str(out / "_data" / f"seed{seed}")
    if not emb.exists():
        pipeline_stage1(spec, stage1_dir, data_dir, seed, arm)
    t0 = time.perf_counter()
    pipeline(
        data_dir=data_dir,
        out_dir=str(run_dir),
        stage1_config=spec.stage1_config,
        stage2_config=spec.stage2_config,
        stage2_args=[*_config_args(ARMS[arm].get("stage2", [])), *spec.stage2_args],
        embeddings=str(emb),
        train_stage2=ARMS[arm].get("train", True),
        metrics=spec.metrics,
        seed=seed,
        show=0,
    )
    dump_json(run_dir / "wall.json", {"seconds": time.perf_counter() - t0})
    return run_dir


def pipeline_stage1(spec: Suite, stage1_dir: Path, data_dir: str, seed: int, arm: str) -> None:
    """Train the stage-1 model an arm needs (shared by every arm with the same stage-1 deltas and seed)."""
    from xrec_pl.pipeline import run_stage

    if spec.data_dir is None and not (Path(data_dir) / "para_dict.pickle").exists():
        from xrec_pl.data.synthetic import make_synthetic

        make_synthetic(data_dir, seed=seed, size=spec.synthetic_size)
    overrides = [*_config_args(ARMS[arm].get("stage1", [])), *spec.stage1_args]
    run_stage(spec.stage1_config, stage1_dir / "stage1", Path(data_dir), overrides, seed)


# --------------------------------------------------------------------------------------------------------- reporting


def _run_scores(run_dir: Path) -> dict[str, float]:
    data = json.loads((run_dir / "metrics.json").read_text())
    return {k: float(v) for k, v in data.get("explanations", {}).items() if isinstance(v, (int, float))}


def _per_sample(run_dir: Path) -> dict[str, dict[tuple[int, int], float]]:
    path = run_dir / "per_sample.json"
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
            if (run_dir / "metrics.json").exists():
                rows.append({"arm": arm, "seed": seed, **_run_scores(run_dir)})
    if not rows:
        from xrec_pl.cli import ConfigError

        raise ConfigError(f"{out}: no finished runs to report")
    metric_names = sorted({k for r in rows for k in r if k not in ("arm", "seed", "n")} - {"judge_unparsable"})
    _write_csv(out / "results.csv", rows, ["arm", "seed", *metric_names])

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
        _write_csv(out / "significance.csv", sig_rows, list(sig_rows[0]))
    plot = _plot(summary, out / "report.png")
    run_s = sum(_run_wall(out / r["arm"] / f"seed{r['seed']}") for r in rows)
    shown = [m for m in metric_names if not m.endswith(("_std", "_n")) and m not in ("usr_unique", "empty_predictions")]
    report = _markdown(spec, seeds, summary, shown, sig_rows, (wall_s, run_s), plot)
    atomic_write_text(out / "report.md", report)
    return {"results": rows, "summary": summary, "significance": sig_rows, "report": str(out / "report.md")}


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
    path = run_dir / "wall.json"
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
