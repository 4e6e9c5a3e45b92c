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

import json
import logging
import time
from pathlib import Path
from typing import Any

from xrec_pl import run_layout
from xrec_pl.data.synthetic import SyntheticSize
from xrec_pl.errors import ConfigError
from xrec_pl.outputs import check_output_dir
from xrec_pl.tools.report import write_report
from xrec_pl.tools.suite import ARMS, Suite, validate_suite
from xrec_pl.utils import dump_json

log = logging.getLogger(__name__)


def _stage1_key(arm: str) -> str:
    deltas = ARMS[arm].get("stage1", [])
    return "default" if not deltas else "+".join(Path(d).stem for d in deltas)


def _config_args(deltas: list[str]) -> list[str]:
    from xrec_pl.tools.pipeline import resolve_config

    args: list[str] = []
    for delta in deltas:
        args += ["--config", str(resolve_config(delta))]
    return args


_SETTINGS = ("data_dir", "synthetic_size", "stage1_config", "stage2_config", "stage1_args", "stage2_args")


def _check_results_folder(suite: Suite, out: Path) -> None:
    """Refuse a results folder written by another suite, or by this suite with other run settings."""
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
    synthetic_size: SyntheticSize = "default",
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
        arms: Arms to run (see ``xrec_pl.tools.suite.ARMS``).
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
    from xrec_pl.tools.pipeline import pipeline

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
        from xrec_pl.progress import progress_bar

        runs = [(seed, arm) for seed in seeds for arm in to_run]
        with progress_bar(len(runs), f"experiment {name}", unit="run") as bar:
            for i, (seed, arm) in enumerate(runs, start=1):
                bar.set_postfix_str(f"arm {arm} ({i}/{len(runs)}), seed {seed}")
                run_arm(spec, out, arm, seed, pipeline)
                bar.update(1)
                elapsed = time.perf_counter() - started
                log.info(
                    "experiment %s: %d/%d runs done (arm %s, seed %d), elapsed %.0f s, ETA %.0f s",
                    name, i, len(runs), arm, seed, elapsed, elapsed / i * (len(runs) - i),
                )  # fmt: skip
    return write_report(spec, out, seeds, wall_s=time.perf_counter() - started)


def run_arm(spec: Suite, out: Path, arm: str, seed: int, pipeline: Any) -> Path:
    """Run one (arm, seed) unless it already finished; returns its run folder."""
    run_dir = out / arm / f"seed{seed}"
    if (run_dir / run_layout.METRICS).exists():
        return run_dir
    stage1_dir = out / "_stage1" / f"{_stage1_key(arm)}-seed{seed}"
    emb = stage1_dir / run_layout.STAGE1_DIR / run_layout.EMBEDDINGS
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
    dump_json(run_dir / run_layout.WALL, {"seconds": time.perf_counter() - t0})
    return run_dir


def pipeline_stage1(spec: Suite, stage1_dir: Path, data_dir: str, seed: int, arm: str) -> None:
    """Train the stage-1 model an arm needs (shared by every arm with the same stage-1 deltas and seed)."""
    from xrec_pl.tools.pipeline import run_stage

    if spec.data_dir is None and not (Path(data_dir) / "para_dict.pickle").exists():
        from xrec_pl.data.synthetic import make_synthetic

        make_synthetic(data_dir, seed=seed, size=spec.synthetic_size)
    overrides = [*_config_args(ARMS[arm].get("stage1", [])), *spec.stage1_args]
    run_stage(spec.stage1_config, stage1_dir / run_layout.STAGE1_DIR, Path(data_dir), overrides, seed)
