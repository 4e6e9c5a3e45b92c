"""The ``xrec-pl`` command line.

Two families of commands share one entry point:

* ``fit``, ``validate``, ``test``, ``predict``: LightningCLI over any of the project's LightningModules and
  DataModules, chosen by ``class_path`` in the YAML config (``xrec-pl fit -c configs/stage1/synthetic.yaml``).
* tools: ``pipeline``, ``evaluate``, ``make-synthetic``, ``convert``, ``bench``, ``experiment`` (jsonargparse
  functions; each takes ``--config`` too).

Bad input (``DataError``, ``ConfigError``) ends the program with one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from xrec_pl.error_lines import condense_parse_error, config_file_problem, constructor_error, find_cause

STAGE_COMMANDS = ("fit", "validate", "test", "predict")
# files a stage run writes into its folder (a folder of that name would make the run fail after training)
RUN_FILES = ("embeddings.safetensors", "metrics.json", "predictions.jsonl", "community_choice.jsonl")
TOOL_COMMANDS = ("pipeline", "evaluate", "make-synthetic", "convert", "bench", "experiment")


class ConfigError(ValueError):
    """A configuration that cannot run (conflicting paths, a run folder that would be overwritten, ...)."""


def _offline_defaults() -> None:
    # The framework never reaches a model hub at run time; users with a hub unset these explicitly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _items(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _class_name(entry: Any) -> str:
    path = getattr(entry, "class_path", None) or (entry.get("class_path") if isinstance(entry, dict) else None)
    return str(path or "").rsplit(".", 1)[-1]


def _init_args(entry: Any) -> Any:
    if isinstance(entry, dict):
        return entry.setdefault("init_args", {})
    if getattr(entry, "init_args", None) is None:
        from jsonargparse import Namespace

        entry.init_args = Namespace()
    return entry.init_args


def _get(ns: Any, key: str) -> Any:
    return ns.get(key) if isinstance(ns, dict) else getattr(ns, key, None)


def _set(ns: Any, key: str, value: Any) -> None:
    if isinstance(ns, dict):
        ns[key] = value
    else:
        setattr(ns, key, value)


def place_run_outputs(trainer_cfg: Any, *, subcommand: str | None, ckpt_path: str | None) -> Path:
    """Route every output of a run into ``trainer.default_root_dir``.

    Loggers without a ``save_dir`` and checkpoint callbacks without a ``dirpath`` are pointed into the run folder,
    so one override (``--trainer.default_root_dir=...``) moves a whole run. A ``fit`` that would write new
    checkpoints over a previous run's is refused before anything starts.
    """
    root = Path(_get(trainer_cfg, "default_root_dir") or "runs/default")
    _set(trainer_cfg, "default_root_dir", str(root))
    for logger in _items(_get(trainer_cfg, "logger")):
        args = _init_args(logger)
        if _get(args, "save_dir") in (None, "", "."):
            _set(args, "save_dir", str(root))
    for callback in _items(_get(trainer_cfg, "callbacks")):
        if _class_name(callback) == "ModelCheckpoint":
            args = _init_args(callback)
            if not _get(args, "dirpath"):
                _set(args, "dirpath", str(root / "checkpoints"))
            ckpt_dir = Path(_get(args, "dirpath"))
            if subcommand == "fit" and ckpt_path is None and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
                raise ConfigError(
                    f"{ckpt_dir}: holds checkpoints of an earlier run; resume it with --ckpt_path last, "
                    "or choose a new --trainer.default_root_dir"
                )
    return root


class XrecSaveConfig(SaveConfigCallback):
    """Save the resolved config beside the logs (a new versioned folder per run) and into the W&B run config.

    Lightning saves it in ``setup``, before a checkpoint given with ``--ckpt_path`` is loaded and checked: a resume
    refused for a changed config would still leave a ``config.yaml`` (and a log folder) behind. Here it is saved
    when the stage starts, after the checkpoint passed its checks.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stage = stage

    def _save_now(self, trainer: Any, pl_module: Any) -> None:
        super().setup(trainer, pl_module, getattr(self, "_stage", "fit"))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "validate":
            self._save_now(trainer, pl_module)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._save_now(trainer, pl_module)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": self.parser.dump(self.config, skip_none=False)})


class XrecCLI(LightningCLI):
    """LightningCLI for every xrec-pl stage; the model and data classes come from the YAML's ``class_path``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", XrecSaveConfig)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"prog": "xrec-pl", "exit_on_error": False})  # errors -> one line
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would merge the checkpoint's stored hyperparameters over the config here, silently replacing
        # options given on the command line (and only for a file path, not for `--ckpt_path last`). xrec-pl has one
        # rule for both: the config as given is what runs, and CheckpointCheck refuses a resume whose training
        # settings differ from the checkpoint's, naming each option. Here the file is only checked to be readable
        # with weights_only=True, so a damaged or malicious file is one line, never a torch.load traceback.
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not str(ckpt_path).startswith("http"):
            from xrec_pl.data.pickles import safe_torch_load

            checkpoint = safe_torch_load(ckpt_path, "checkpoint")
            if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
                from xrec_pl.data.errors import DataError

                raise DataError(f"{ckpt_path}: not a Lightning checkpoint (no state_dict)")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = place_run_outputs(cfg.trainer, subcommand=self.subcommand, ckpt_path=cfg.get("ckpt_path"))
        from xrec_pl.outputs import check_output_dir, check_run_files

        data_dir = _get(_init_args(cfg.data), "data_dir") if cfg.get("data") is not None else None
        check_output_dir(root, "--trainer.default_root_dir", [data_dir])
        check_run_files(root, RUN_FILES, "--trainer.default_root_dir")
        if self.subcommand is not None:  # a command that runs (not run=False set-up) owns its folder until it ends
            from xrec_pl.run_lock import lock_run_folder

            lock_run_folder(root)


# ----------------------------------------------------------------------------------------------------- tool commands


def make_synthetic(
    out: str = "data/synthetic",
    seed: int = 0,
    size: Literal["tiny", "default", "smoke"] = "default",
    overwrite: bool = False,
) -> str:
    """Write the project's deterministic synthetic dataset in the XRec format.

    Args:
        out: Output folder.
        seed: Random seed; the same seed gives byte-identical files.
        size: ``tiny`` (tests), ``default`` (first runs) or ``smoke`` (default with 240 test records).
        overwrite: Replace an existing dataset folder.
    """
    from xrec_pl.data.synthetic import make_synthetic as _make
    from xrec_pl.outputs import check_output_dir

    target = check_output_dir(out, "--out")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target}: folder exists and is not empty; pass --overwrite true to replace it")
    return str(_make(target, seed=seed, size=size))


def convert(src: str, dst: str, format: Literal["parquet", "jsonl"] = "parquet", overwrite: bool = False) -> list[str]:
    """Convert an XRec data folder's pickles to a plain format once, so later reads never unpickle.

    Args:
        src: XRec data folder (``para_dict.pickle``, ``total_*.csv``, ``{trn,val,tst}.pkl``).
        dst: Output folder.
        format: ``parquet`` or ``jsonl`` for the text records.
        overwrite: Replace existing files in ``dst``.
    """
    from xrec_pl.data.io import convert_folder

    written = [str(p) for p in convert_folder(src, dst, fmt=format, overwrite=overwrite)]
    if not written:
        raise ConfigError(f"{src}: no XRec files (para_dict.pickle, total_*.csv, *.pkl) to convert")
    sys.stdout.write("\n".join(written) + "\n")
    return written


def evaluate(
    predictions: str,
    references: str | None = None,
    metrics: list[str] | None = None,
    output: str | None = None,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
    rescale_with_baseline: bool = False,
    bleurt_checkpoint: str | None = None,
    bartscore_checkpoint: str | None = None,
    judge_model: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    records: str | None = None,
) -> dict:
    """Score a prediction file against its references and print one JSON object.

    Args:
        predictions: Our predict JSONL (``prediction``/``reference`` fields) or a pickled list of strings.
        references: Reference file (JSONL or pickled list); defaults to the ``reference`` field of ``predictions``.
        metrics: Any of ``usr``, ``bertscore``, ``bleurt``, ``bartscore``, ``llm_judge`` (default: usr, bertscore).
        output: Also write the JSON here.
        bertscore_model: BERTScore backbone (local path or cached hub name); default: the offline MiniLM, layer 6.
        bertscore_layers: Layer of the backbone to use (default: the backbone's usual layer).
        rescale_with_baseline: BERTScore baseline rescaling (needs the backbone's baseline file, e.g. roberta-large).
        bleurt_checkpoint: Path of a BLEURT checkpoint (needed for ``bleurt``).
        bartscore_checkpoint: Path of a BART checkpoint (needed for ``bartscore``).
        judge_model: Local causal LM used as the judge (default: the embedded LLM).
        batch_size: Scoring batch size for every metric that batches.
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        records: Score only the pairs whose reference belongs to this XRec split file (e.g. ``tst.pkl``), matched
            by reference text — how the reference's shuffled released predictions are paired with a split.
    """
    import json

    from xrec_pl.evaluate import evaluate_files

    chosen = [m.lower().replace("-", "_") for m in (metrics or ["usr", "bertscore"])]
    options: dict[str, Any] = {
        "bertscore_model_type": bertscore_model,
        "bertscore_num_layers": bertscore_layers,
        "bertscore_rescale_with_baseline": rescale_with_baseline or None,
        "bleurt_checkpoint": bleurt_checkpoint,
        "bartscore_checkpoint": bartscore_checkpoint,
        "llm_judge_judge_model": judge_model,
        "device": device,
    }
    if batch_size is not None:
        options.update({f"{m}_batch_size": batch_size for m in chosen if m != "usr"})
    result = evaluate_files(predictions, references, metrics=chosen, output=output, records=records, **options)
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _tool_functions() -> dict[str, Any]:
    from xrec_pl.bench import bench
    from xrec_pl.experiment import experiment
    from xrec_pl.pipeline import pipeline

    return {
        "pipeline": pipeline,
        "evaluate": evaluate,
        "make-synthetic": make_synthetic,
        "convert": convert,
        "bench": bench,
        "experiment": experiment,
    }


USAGE = """usage: xrec-pl COMMAND [options]

Training (LightningCLI; pick the stage with a config):
  fit | validate | test | predict   -c configs/stage1/synthetic.yaml  (or configs/stage2/..., any overrides)

Tools:
  pipeline        stage 1 -> stage 2 -> predict -> score, into one run folder
  evaluate        score a prediction file (BERTScore, USR, BLEURT, BARTScore, LLM judge)
  make-synthetic  write the deterministic synthetic XRec-format dataset
  convert         convert an XRec folder's pickles to parquet/jsonl once
  bench           benchmarks against reference-style implementations
  experiment      run an ablation suite over seeds and write a report

`xrec-pl COMMAND --help` shows every option of a command.
"""


def _errors() -> tuple[type[BaseException], ...]:
    from xrec_pl.data.io import DataError
    from xrec_pl.models.llm import LLMLoadError

    return (DataError, ConfigError, LLMLoadError)


def _error_line(err: BaseException) -> str | None:
    """The one line for bad input (ours, wrapped by jsonargparse, a parse error, a constructor check), else None."""
    from jsonargparse import ArgumentError

    ours = find_cause(err, _errors())
    if ours is not None:
        return " ".join(str(ours).split("\n"))
    if isinstance(err, ArgumentError):
        return condense_parse_error(str(err))
    return constructor_error(err, ("xrec_pl", "callbacks", "data_modules", "lit", "models", "data", "metrics"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xrec-pl`` console script."""
    _offline_defaults()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    from xrec_pl.run_lock import release_all

    try:
        problem = config_file_problem(argv)
        if problem is not None:
            raise ConfigError(problem)
        if argv[0] in STAGE_COMMANDS:
            # from the shell LightningCLI reads sys.argv itself (passing both makes it warn)
            XrecCLI(args=None if from_command_line else argv)
        elif argv[0] in TOOL_COMMANDS:
            from jsonargparse import CLI

            # `-c` as in the stage commands (jsonargparse's function CLIs only know `--config`)
            argv = ["--config" if arg == "-c" else arg for arg in argv]
            CLI(_tool_functions(), args=argv, as_positional=False, prog="xrec-pl", exit_on_error=False)
        else:
            sys.stderr.write(f"xrec-pl: error: unknown command {argv[0]!r}\n\n{USAGE}")
            return 2
    except Exception as err:
        line = _error_line(err)
        if line is None:
            raise
        sys.stderr.write(f"xrec-pl: error: {line}\n")
        return 2
    except SystemExit as stop:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(stop, SIGTERMException):
            raise
        # Lightning stops a fit on SIGTERM by raising SIGTERMException() with no code, which would exit 0: a job that
        # `fit && predict` chains, or a scheduler, must see that the run did not finish.
        code = stop.code if isinstance(stop.code, int) and stop.code else 128 + int(signal.SIGTERM)
        sys.stderr.write(f"xrec-pl: stopped by a signal (exit {code}); continue with --ckpt_path last\n")
        return code
    finally:
        release_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
