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


class XrecSaveConfig(SaveConfigCallback):
    """Save the resolved config beside the logs (a new versioned folder per run) and into the W&B run config."""

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
        # a bad option raises ArgumentError (xrec_pl.cli prints it as one line) instead of printing the whole usage
        kwargs.setdefault("parser_kwargs", {"prog": "xrec-pl", "exit_on_error": False})
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters before anything of ours runs: a damaged file must still
        # give one line naming it, not a traceback from torch.load.
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as err:
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise DataError(f"{ckpt_path}: not a readable checkpoint ({type(err).__name__}: {detail})") from err

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        place_run_outputs(cfg.trainer, subcommand=self.subcommand, ckpt_path=cfg.get("ckpt_path"))
