"""Experiment tracking: W&B that never hangs and never needs the network unless a key is configured.

:class:`XrecWandbLogger` resolves ``mode: auto`` (online with a key, offline without), writes its ``wandb/`` folder
into the run folder, and logs the run's outputs as W&B artifacts itself, in every mode but ``disabled``: Lightning's
``log_model`` refuses offline runs, whereas offline artifacts are simply synced later (``wandb sync``).

* ``checkpoint`` (type ``model``): ``last.ckpt`` and the best checkpoint of every ``ModelCheckpoint`` (stage 2: the
  adapters only), after ``fit``;
* ``predictions`` (type ``predictions``): ``<run>/predictions.jsonl`` after ``predict``; ``embeddings`` (type
  ``embeddings``): ``<run>/embeddings.safetensors`` after stage 1.

Artifacts are logged from rank zero (Lightning calls logger hooks there only), when a stage ends successfully.

Resumption: every checkpoint a ``fit`` writes carries the W&B run id (:class:`WandbRunId`, added by the CLI), and
``xrec-pl fit --ckpt_path last|PATH`` reopens that run (``resume="allow"``): metrics and the sample table continue
in the same run. W&B writes one folder per process session (``offline-run-<time>-<id>``); all of a run's sessions
carry its id, and ``wandb sync <run>/wandb/offline-run-*-<id>`` uploads them into that one run.
"""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from xrec_pl import run_layout


def wandb_mode(mode: str = "auto") -> str:
    """Resolve ``auto`` to ``online`` when an API key is configured (env or ~/.netrc), else ``offline``.

    ``WANDB_MODE`` in the environment wins over the config, as W&B itself does.
    """
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc(str(Path.home() / ".netrc"))
        if rc.authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class XrecWandbLogger(WandbLogger):
    """``WandbLogger`` with ``mode: auto|online|offline|disabled`` and the checkpoint logged as an artifact.

    Args:
        project: W&B project.
        name: Run name (default: the run folder's name).
        entity: W&B entity (team or user).
        tags: Run tags.
        group: Run group (e.g. one per experiment grid; W&B groups the runs in its UI).
        job_type: Run type (e.g. ``stage1``, ``stage2``, ``predict``).
        notes: A longer description of the run.
        mode: ``auto`` (online with a key, offline without), ``online``, ``offline`` or ``disabled``.
        log_model: Log the checkpoints, predictions and embeddings of the run as artifacts when a stage ends.
        save_dir: Folder of the ``wandb/`` run files (the CLI sets the run folder).
        **kwargs: Passed on to ``WandbLogger`` / ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "xrec-pl",
        name: str | None = None,
        entity: str | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        job_type: str | None = None,
        notes: str | None = None,
        mode: Literal["auto", "online", "offline", "disabled"] = "auto",
        log_model: bool = True,
        save_dir: str = ".",
        **kwargs: Any,
    ) -> None:
        resolved = wandb_mode(mode)
        if name is None and save_dir not in (".", ""):
            name = Path(save_dir).name
        kwargs.setdefault("settings", None)
        if kwargs["settings"] is None:
            kwargs.pop("settings")
        for key, value in (("group", group), ("job_type", job_type), ("notes", notes)):
            if value is not None:
                kwargs[key] = value
        super().__init__(
            project=project,
            name=name,
            entity=entity,
            tags=tags,
            mode=resolved,
            offline=resolved == "offline",
            log_model=False,  # artifacts are logged by finalize(), offline too
            save_dir=save_dir,
            **kwargs,
        )
        self.resolved_mode = resolved
        self.log_outputs = bool(log_model) and resolved != "disabled"
        self._run_dir = Path(save_dir)
        self._ckpt_callbacks: dict[int, Any] = {}
        self._logged: dict[str, float] = {}  # path -> mtime already logged

    def use_run_id(self, run_id: str) -> bool:
        """Reopen the W&B run ``run_id`` (``resume="allow"``) instead of starting a new one.

        Only before the run has started, and never over an ``id`` given in the config. True when it took effect.
        """
        if self._experiment is not None or self._wandb_init.get("id"):
            return False
        self._wandb_init["id"] = self._id = str(run_id)
        self._wandb_init["resume"] = "allow"
        return True

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._ckpt_callbacks[id(checkpoint_callback)] = checkpoint_callback

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "success" and self.log_outputs and self._experiment is not None:
            self.log_run_outputs()

    def _artifact_name(self, kind: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self._run_dir.name or 'run'}-{kind}")
        return base.strip("-.") or kind

    def log_run_outputs(self) -> list[str]:
        """Log new or changed run outputs (checkpoints, predictions, embeddings) as artifacts; their names."""
        import wandb

        ckpts: list[Path] = []
        for callback in self._ckpt_callbacks.values():
            for attr in ("last_model_path", "best_model_path"):
                path = getattr(callback, attr, "") or ""
                if path and Path(path).is_file() and Path(path) not in ckpts:
                    ckpts.append(Path(path))
        groups = {
            ("checkpoint", "model"): ckpts,
            ("predictions", "predictions"): [self._run_dir / run_layout.PREDICTIONS],
            ("embeddings", "embeddings"): [self._run_dir / run_layout.EMBEDDINGS],
        }
        logged = []
        for (kind, type_), paths in groups.items():
            fresh = [p for p in paths if p.is_file() and self._logged.get(str(p)) != p.stat().st_mtime]
            if not fresh:
                continue
            artifact = wandb.Artifact(self._artifact_name(kind), type=type_)
            for path in fresh:
                artifact.add_file(str(path), name=path.name)
                self._logged[str(path)] = path.stat().st_mtime
            self.experiment.log_artifact(artifact)
            logged.append(artifact.name)
        return logged


WANDB_RUN_ID_KEY = "xrec_wandb_run_id"


class WandbRunId(Callback):
    """Store the W&B run id of the run's :class:`XrecWandbLogger` in every checkpoint (``xrec_wandb_run_id``)."""

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, XrecWandbLogger) and logger.resolved_mode != "disabled" and logger.version:
                checkpoint[WANDB_RUN_ID_KEY] = str(logger.version)
                return


def _resolve_checkpoint(trainer: Any, ckpt_path: str) -> Path | None:
    """The file ``--ckpt_path`` names: a path as given, or for ``last`` the newest ``last*.ckpt`` of the run."""
    if ckpt_path != "last":
        path = Path(ckpt_path)
        return path if path.is_file() else None
    folders = {Path(trainer.default_root_dir) / "checkpoints"}
    folders.update(Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None))
    found = [p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resume_wandb_run(trainer: Any, ckpt_path: str | None) -> str | None:
    """Prepare a ``fit``'s W&B logging: id into every checkpoint, the checkpoint's run reopened on resume.

    Args:
        trainer: The trainer, before ``fit`` starts (its loggers not started yet).
        ckpt_path: ``--ckpt_path`` (``None``, ``last`` or a file).

    Returns:
        The W&B run id reused, or ``None`` (no W&B logger, no checkpoint, or a checkpoint without an id).
    """
    loggers = [lg for lg in trainer.loggers if isinstance(lg, XrecWandbLogger) and lg.resolved_mode != "disabled"]
    if not loggers:
        return None
    if not any(isinstance(cb, WandbRunId) for cb in trainer.callbacks):
        trainer.callbacks.append(WandbRunId())
    if not ckpt_path or ckpt_path in ("best", "hpc", "registry") or str(ckpt_path).startswith("http"):
        return None
    path = _resolve_checkpoint(trainer, str(ckpt_path))
    if path is None:
        return None
    from xrec_pl.data.pickles import safe_torch_load

    checkpoint = safe_torch_load(path, "checkpoint")
    run_id = checkpoint.get(WANDB_RUN_ID_KEY) if isinstance(checkpoint, dict) else None
    if not run_id:
        return None
    used = [lg.use_run_id(str(run_id)) for lg in loggers]
    return str(run_id) if any(used) else None
