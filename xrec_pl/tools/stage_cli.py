"""The LightningCLI that runs one stage (``fit``/``validate``/``test``/``predict``) of any xrec-pl model.

``xrec_pl.cli`` uses it for the stage commands, ``xrec_pl.tools.pipeline`` for each stage of a pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from xrec_pl import run_layout
from xrec_pl.errors import ConfigError, DataError

# files a stage run writes into its folder (a folder of that name would make the run fail after training)
RUN_FILES = (run_layout.EMBEDDINGS, run_layout.METRICS, run_layout.PREDICTIONS, run_layout.COMMUNITY_CHOICE)


def offline_defaults() -> None:
    """Keep every model hub offline unless the user set the variables (the framework never downloads)."""
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
                _set(args, "dirpath", str(run_layout.checkpoints_dir(root)))
            ckpt_dir = Path(_get(args, "dirpath"))
            if subcommand == "fit" and ckpt_path is None and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
                raise ConfigError(
                    f"{ckpt_dir}: holds checkpoints of an earlier run; resume it with --ckpt_path last, "
                    "or choose a new --trainer.default_root_dir"
                )
    return root


def wants_log_progress(enable_progress_bar: bool | None, callbacks: list[Any]) -> bool:
    """Whether a stage's Trainer gets ``LogProgress``: bars not switched off, none configured, and
    :func:`xrec_pl.progress.log_progress_wanted` (stderr is a file or pipe, not under ``CI``)."""
    from lightning.pytorch.callbacks import ProgressBar

    from xrec_pl.progress import log_progress_wanted

    if enable_progress_bar is False or any(isinstance(cb, ProgressBar) for cb in callbacks):
        return False
    return log_progress_wanted()


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
                raise DataError(f"{ckpt_path}: not a Lightning checkpoint (no state_dict)")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The Trainer, with ``callbacks.log_progress.LogProgress`` in place of Lightning's bar in a log file.

        Added only where :func:`xrec_pl.progress.log_progress_wanted` says so (stderr is no terminal, not under
        ``CI``), the progress bar is not off (``trainer.enable_progress_bar: false``) and no progress bar is in the
        config's callbacks; ``XREC_PROGRESS_EVERY`` sets its interval.
        """
        trainer_cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = _items(trainer_cfg.get("callbacks"))
        if wants_log_progress(trainer_cfg.get("enable_progress_bar"), [*callbacks, *self._defaults()]):
            from callbacks.log_progress import LogProgress
            from xrec_pl.progress import log_progress_every

            kwargs["callbacks"] = [*callbacks, LogProgress(every_s=log_progress_every())]
        return super().instantiate_trainer(**kwargs)

    def _defaults(self) -> list[Any]:
        return _items((self.trainer_defaults or {}).get("callbacks"))

    def before_fit(self) -> None:
        # the W&B run id goes into every checkpoint, and a resumed fit reopens the checkpoint's run
        from xrec_pl.loggers import resume_wandb_run

        resume_wandb_run(self.trainer, self.config[self.subcommand].get("ckpt_path"))

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
