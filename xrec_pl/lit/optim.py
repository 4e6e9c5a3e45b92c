"""The stage-2 optimizer: Adam or AdamW on the trainable (adapter) parameters, with an optional linear warmup."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "adam"]


def adam_with_warmup(
    params: Iterable[nn.Parameter],
    kind: OptimizerName,
    lr: float,
    weight_decay: float,
    warmup_steps: int = 0,
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer, or with ``warmup_steps > 0`` a dict adding a per-step
    linear warmup of the learning rate over that many optimizer steps."""
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt = cls(list(params), lr=lr, weight_decay=weight_decay)
    warmup = int(warmup_steps)
    if warmup <= 0:
        return opt
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
