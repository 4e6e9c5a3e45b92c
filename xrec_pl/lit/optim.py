"""The stage-2 optimizer: Adam or AdamW on the trainable (adapter) parameters, with an optional linear warmup and
a linear decay over the last steps (warmup-stable-decay)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "adam"]


def lr_factor(step: int, warmup_steps: int = 0, decay_steps: int = 0, total_steps: int | None = None) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): warmup, stable, decay.

    A linear warmup over the first ``warmup_steps`` steps; with ``decay_steps > 0`` a linear decay towards zero over
    the last ``decay_steps`` of ``total_steps`` (the factor is ``(total_steps - step) / decay_steps`` there, so the
    last step trains at ``1 / decay_steps``). In between the rate is constant. The two ramps multiply where they
    overlap.
    """
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_steps > 0:
        if total_steps is None:
            raise ValueError("decay_steps needs the run's total number of optimizer steps")
        factor *= min(1.0, max(0.0, (total_steps - step) / decay_steps))
    return factor


def schedules_agree(a: Mapping[str, Any], b: Mapping[str, Any], steps: int) -> bool:
    """Whether two schedules (``warmup_steps``/``decay_steps``/``total_steps`` mappings) give the same learning
    rate at every optimizer step before ``steps`` — i.e. whether a run trained ``steps`` steps under ``a`` is also a
    run under ``b`` up to there.

    Between the schedules' corners (end of warmup, start and end of decay) each factor is linear in the step, so
    their product is a quadratic: three steps per stretch decide it, however large the numbers (a checkpoint's
    stored schedule is not trusted to be small).
    """

    def key(s: Mapping[str, Any]) -> tuple[int, int, int]:
        warmup, decay = int(s.get("warmup_steps") or 0), int(s.get("decay_steps") or 0)
        return warmup, decay, int(s.get("total_steps") or 0) if decay > 0 else 0

    ka, kb = key(a), key(b)
    if ka == kb:
        return True
    end = int(steps)
    corners = (c for w, d, t in (ka, kb) for c in (w - 1, w, t - d, t))
    cuts = sorted({0, end, *(c for c in corners if 0 < c < end)})
    return all(
        lr_factor(step, *ka) == lr_factor(step, *kb)
        for lo, hi in zip(cuts, cuts[1:])
        for step in range(lo, min(hi, lo + 3))
    )


def adam_with_warmup(
    params: Iterable[nn.Parameter],
    kind: OptimizerName,
    lr: float,
    weight_decay: float,
    warmup_steps: int = 0,
    decay_steps: int = 0,
    total_steps: int | None = None,
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer, or with ``warmup_steps > 0`` or ``decay_steps > 0`` a
    dict adding the per-step schedule of :func:`lr_factor` (warmup, constant, then a linear decay over the last
    ``decay_steps`` of ``total_steps``)."""
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt = cls(list(params), lr=lr, weight_decay=weight_decay)
    warmup, decay = int(warmup_steps), int(decay_steps)
    if warmup <= 0 and decay <= 0:
        return opt
    if decay > 0 and (total_steps is None or not 0 < decay <= total_steps):
        raise ValueError(f"decay_steps ({decay}) must be at most the run's optimizer steps ({total_steps})")

    # a plain function, not a callable object: LambdaLR would otherwise save its fields in the checkpoint and put the
    # old schedule back on resume over the one configured now
    def factor(step: int) -> float:
        return lr_factor(step, warmup, decay, total_steps)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
