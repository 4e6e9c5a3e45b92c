"""``xrec-pl pipeline``: stage 1 -> stage 2 -> predict -> score, into one run folder.

Layout of ``out_dir``::

    data/                      the synthetic dataset (only when no --data_dir is given)
    stage1/                    LightGCN run: checkpoints/, logs/, metrics.json, embeddings.safetensors
    stage2/                    explainer run: checkpoints/, logs/, metrics.json, predictions.jsonl
    metrics.json               everything a script needs: stage-1 ranking, stage-2 loss, explanation scores
    timings.json               wall time of each step

A pipeline that stopped part-way resumes where it stopped: finished steps (their output file exists) are skipped and
an interrupted training run continues from its ``last.ckpt``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from xrec_pl import run_layout
from xrec_pl.data.synthetic import SyntheticSize
from xrec_pl.outputs import check_output_dir
from xrec_pl.run_lock import lock_run_folder
from xrec_pl.utils import dump_json


def resolve_config(path: str) -> Path:
    """Find a config: as given, ``xrec:NAME`` among the shipped configs, or a relative path in the shipped configs."""
    from xrec_pl.config_files import resolve_config as resolve

    return resolve(path)


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _last_ckpt(run_dir: Path) -> str | None:
    last = run_layout.last_checkpoint(run_dir)
    return str(last) if last.exists() else None


def _best_or_none(trainer: Any) -> str | None:
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    return path or None


class _PhaseClock:
    """Wall time spent in validation loops during ``fit`` (loss, generated samples, their scores)."""

    def __init__(self) -> None:
        self.validation_s = 0.0
        self.started: float | None = None

    def callback(self) -> Any:
        import lightning.pytorch as pl

        clock = self

        class PhaseClock(pl.Callback):
            def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
                clock.started = time.perf_counter()

            def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
                if clock.started is not None:
                    clock.validation_s += time.perf_counter() - clock.started
                    clock.started = None

        return PhaseClock()


def run_stage(
    config: str,
    run_dir: Path,
    data_dir: Path,
    overrides: list[str],
    seed: int,
    fit: bool = True,
    test: bool = True,
    predict: bool = False,
    timings: dict[str, float] | None = None,
    name: str = "stage",
) -> Any:
    """Run one stage through the project's LightningCLI objects: fit (resuming a ``last.ckpt``), test, predict.

    ``timings`` (when given) receives ``{name}_{phase}_s`` for the phases ``setup`` (parsing, model and LLM load),
    ``train`` (fit without its validation loops), ``validation``, ``test`` and ``predict``.
    """
    from xrec_pl.tools.stage_cli import XrecCLI

    times: dict[str, float] = {}
    t0 = time.perf_counter()

    args = [
        "--config",
        str(resolve_config(config)),
        f"--data.init_args.data_dir={data_dir}",
        f"--trainer.default_root_dir={run_dir}",
        f"--seed_everything={seed}",
        *overrides,
    ]
    cli = XrecCLI(args=args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    times["setup"] = time.perf_counter() - t0
    if fit:
        resume = _last_ckpt(run_dir)
        if resume:
            _write(f"[xrec-pl] {run_dir}: resuming from {resume}")
        clock = _PhaseClock()
        trainer.callbacks.append(clock.callback())
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
        times["train"] = time.perf_counter() - t0 - clock.validation_s
        times["validation"] = clock.validation_s
    best = _best_or_none(trainer) if fit else None
    if test:
        t0 = time.perf_counter()
        trainer.test(model, datamodule=datamodule, ckpt_path=best)
        times["test"] = time.perf_counter() - t0
    if predict:
        t0 = time.perf_counter()
        trainer.predict(model, datamodule=datamodule, ckpt_path=best, return_predictions=False)
        times["predict"] = time.perf_counter() - t0
    if timings is not None:
        timings.update({f"{name}_{phase}_s": seconds for phase, seconds in times.items()})
    return cli


def _read_metrics(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()).get("metrics", {}) if path.exists() else {}


def pipeline(
    data_dir: str | None = None,
    out_dir: str = "runs/synthetic",
    stage1_config: str = "configs/stage1/synthetic.yaml",
    stage2_config: str = "configs/stage2/synthetic.yaml",
    stage1_args: list[str] | None = None,
    stage2_args: list[str] | None = None,
    embeddings: str | None = None,
    train_stage2: bool = True,
    metrics: list[str] | None = None,
    synthetic_size: SyntheticSize = "default",
    seed: int = 0,
    show: int = 3,
) -> dict[str, Any]:
    """Run the whole method: LightGCN, the explainer, generation on the test split, and scoring.

    Args:
        data_dir: An XRec-format data folder; by default the synthetic dataset is generated into ``out_dir/data``.
        out_dir: Run folder (see the module docstring for its layout).
        stage1_config: LightningCLI config of stage 1.
        stage2_config: LightningCLI config of stage 2.
        stage1_args: Extra LightningCLI overrides for stage 1 (``["--trainer.max_epochs=5"]``).
        stage2_args: Extra LightningCLI overrides for stage 2 (``["--model.init_args.adapter=linear"]``).
        embeddings: Use these stage-1 embeddings and skip stage 1.
        train_stage2: ``False`` generates with the untrained explainer (the plain-LLM baseline with ``adapter: none``).
        metrics: Explanation metrics for ``xrec-pl evaluate`` (default: usr, bertscore).
        synthetic_size: ``tiny`` or ``default`` synthetic dataset when ``data_dir`` is not given.
        seed: Seed for both stages (``seed_everything``) and the synthetic data.
        show: Number of generated explanations to print beside their references.
    """
    from xrec_pl.tools.evaluate import evaluate_files

    out = check_output_dir(out_dir, "--out_dir", [data_dir])
    lock_run_folder(out)  # one pipeline per folder; its stage runs lock their own sub-folders
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if data_dir is None:
        data = out / run_layout.DATA_DIR
        if not (data / "para_dict.pickle").exists():
            from xrec_pl.data.synthetic import make_synthetic

            t0 = time.perf_counter()
            make_synthetic(data, seed=seed, size=synthetic_size)
            timings["make_synthetic_s"] = time.perf_counter() - t0
            _write(f"[xrec-pl] synthetic dataset written to {data}")
    else:
        data = Path(data_dir)

    stage1_dir, stage2_dir = out / run_layout.STAGE1_DIR, out / run_layout.STAGE2_DIR
    if embeddings is None:
        emb_path = stage1_dir / run_layout.EMBEDDINGS
        _unless_done(
            "stage1",
            "LightGCN",
            emb_path,
            lambda: run_stage(
                stage1_config, stage1_dir, data, list(stage1_args or []), seed, timings=timings, name="stage1"
            ),
            timings,
        )
    else:
        emb_path = Path(embeddings)

    predictions = stage2_dir / run_layout.PREDICTIONS
    overrides = [f"--model.init_args.embeddings_path={emb_path}", *(stage2_args or [])]
    _unless_done(
        "stage2",
        "explainer",
        predictions,
        lambda: run_stage(
            stage2_config,
            stage2_dir,
            data,
            overrides,
            seed,
            fit=train_stage2,
            test=False,
            predict=True,
            timings=timings,
            name="stage2",
        ),
        timings,
    )

    t0 = time.perf_counter()
    scores = evaluate_files(str(predictions), None, metrics=tuple(metrics or ("usr", "bertscore")), per_sample=True)
    per_sample = scores.pop("per_sample", {})
    extra = _add_community_choice(stage2_dir, scores)
    _write_per_sample(out / run_layout.PER_SAMPLE, predictions, per_sample, extra)
    timings["evaluate_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    result = {
        "data_dir": str(data),
        "embeddings": str(emb_path),
        "stage1": _read_metrics(stage1_dir / run_layout.METRICS),
        "stage2": _read_metrics(stage2_dir / run_layout.METRICS),
        "explanations": scores,
        "predictions": str(predictions),
    }
    dump_json(out / run_layout.METRICS, result)
    timings_path = out / run_layout.TIMINGS
    previous = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    dump_json(timings_path, {**previous, **timings})
    _report(result, predictions, show)
    _write(phase_table(timings))
    return result


_PHASES = (
    ("make_synthetic_s", "synthetic data"),
    ("stage1_setup_s", "stage 1 setup (config, data)"),
    ("stage1_train_s", "stage 1 training"),
    ("stage1_validation_s", "stage 1 validation (Recall/NDCG)"),
    ("stage1_test_s", "stage 1 test and embedding export"),
    ("stage2_setup_s", "stage 2 setup (config, LLM load)"),
    ("stage2_train_s", "stage 2 training"),
    ("stage2_validation_s", "stage 2 validation (loss, generated samples)"),
    ("stage2_predict_s", "stage 2 generation (test split)"),
    ("evaluate_s", "scoring (BERTScore, USR, community)"),
)


def phase_table(timings: dict[str, float]) -> str:
    """The wall time of each pipeline phase this run went through, and its share of the total."""
    total = timings.get("total_s") or sum(v for k, v in timings.items() if k != "total_s") or 1.0
    lines = ["[xrec-pl] time per phase:"]
    for key, label in _PHASES:
        if key in timings:
            lines.append(f"  {label:46s} {timings[key]:8.1f} s  {100 * timings[key] / total:5.1f} %")
    lines.append(f"  {'total':46s} {total:8.1f} s")
    return "\n".join(lines)


def _unless_done(step: str, what: str, output: Path, run: Any, timings: dict[str, float]) -> None:
    """Run one pipeline step unless its output exists (a resumed pipeline); time it into ``timings[step + "_s"]``."""
    number = step.removeprefix("stage")
    if output.exists():
        _write(f"[xrec-pl] stage {number} already finished: using {output}")
        return
    t0 = time.perf_counter()
    _write(f"[xrec-pl] stage {number}: {what}")
    run()
    timings[f"{step}_s"] = time.perf_counter() - t0


def _add_community_choice(stage2_dir: Path, scores: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Add ``community_choice.jsonl`` (synthetic data, ``callbacks.community_choice``) to the scores.

    Returns its per-record hits for ``per_sample.json`` (``{}`` when there is no such file). They cover every tested
    record, which may be more than the generated ones.
    """
    path = stage2_dir / run_layout.COMMUNITY_CHOICE
    choices = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not choices:
        return {}
    scores["community_choice"] = sum(float(r["correct"]) for r in choices) / len(choices)
    scores["community_choice_raw"] = sum(float(r.get("correct_raw", r["correct"])) for r in choices) / len(choices)
    scores["community_choice_n"] = len(choices)
    return {"community_choice": [{"uid": r["uid"], "iid": r["iid"], "score": float(r["correct"])} for r in choices]}


def _write_per_sample(
    path: Path,
    predictions: Path,
    per_sample: dict[str, list[float]],
    extra: dict[str, list[dict[str, Any]]] | None = None,
) -> None:
    """Per-record scores keyed by (uid, iid), so runs can be compared pair by pair (paired significance).

    ``per_sample`` lists are aligned with the predictions file; ``extra`` entries are already ``{uid, iid, score}``.
    """
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    keyed = {
        key: [{"uid": r["uid"], "iid": r["iid"], "score": s} for r, s in zip(rows, scores)]
        for key, scores in per_sample.items()
    }
    dump_json(path, {**keyed, **(extra or {})})


def _report(result: dict[str, Any], predictions: Path, show: int) -> None:
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    for row in rows[:show]:
        _write(f"\n[uid {row['uid']} iid {row['iid']}]")
        _write(f"  generated: {row['prediction']}")
        _write(f"  reference: {row['reference']}")
    scalars = {k: v for k, v in result["explanations"].items() if isinstance(v, (int, float))}
    stage1 = {k: v for k, v in result["stage1"].items() if k.startswith("test/")}
    _write("\nstage 1 (test): " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(stage1.items())))
    _write("explanations:   " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(scalars.items())))
