"""Experiment tracking: W&B that never hangs and never needs the network unless a key is configured."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger


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
        mode: ``auto`` (online with a key, offline without), ``online``, ``offline`` or ``disabled``.
        log_model: Log checkpoints as artifacts (``True`` at the end, ``"all"`` as they are written).
        save_dir: Folder of the ``wandb/`` run files (the CLI sets the run folder).
        **kwargs: Passed on to ``WandbLogger`` / ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "xrec-pl",
        name: str | None = None,
        entity: str | None = None,
        tags: list[str] | None = None,
        mode: str = "auto",
        log_model: bool | str = True,
        save_dir: str = ".",
        **kwargs: Any,
    ) -> None:
        resolved = wandb_mode(mode)
        if name is None and save_dir not in (".", ""):
            name = Path(save_dir).name
        kwargs.setdefault("settings", None)
        if kwargs["settings"] is None:
            kwargs.pop("settings")
        super().__init__(
            project=project,
            name=name,
            entity=entity,
            tags=tags,
            mode=resolved,
            offline=resolved == "offline",
            log_model=log_model if resolved == "online" else False,
            save_dir=save_dir,
            **kwargs,
        )
        self.resolved_mode = resolved
