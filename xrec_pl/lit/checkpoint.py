"""Trainable-only checkpoints and their one validated load, shared by the LightningModules and the resume checks.

The frozen LLM never goes into a stage-2 checkpoint: :func:`trainable_state` keeps the trainable tensors only, and
:func:`state_mismatch` says how a stored ``state_dict`` differs from what a module expects (keys and shapes). The
explainer modules (``on_load_checkpoint``) and ``callbacks.resumption.CheckpointCheck`` both ask it, and each turns
the answer into its own one-line error naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def trainable_keys(module: nn.Module) -> set[str]:
    """Names of the parameters of ``module`` that require gradients."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def trainable_state(state_dict: Mapping[str, Any], module: nn.Module) -> dict[str, Any]:
    """The entries of ``state_dict`` that belong to a trainable parameter of ``module``."""
    keep = trainable_keys(module)
    return {k: v for k, v in state_dict.items() if k in keep}


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if hasattr(value, "shape") else None


def state_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any], limit: int = 5) -> str | None:
    """How ``saved`` differs from ``expected`` (name -> tensor or anything with ``shape``); ``None`` if it fits.

    Returns ``"missing [...], unexpected [...]"`` when the key sets differ (at most ``limit`` names each), else
    ``"<key> has shape (..), this module expects (..)"`` for the first tensor of another shape.
    """
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        more_m = "..." if len(missing) > limit else ""
        more_u = "..." if len(unexpected) > limit else ""
        return f"missing {missing[:limit]}{more_m}, unexpected {unexpected[:limit]}{more_u}"
    for key in sorted(expected):
        have, want = _shape(saved[key]), _shape(expected[key])
        if have is not None and want is not None and have != want:
            return f"{key} has shape {have}, this module expects {want}"
    return None


def check_identity(saved: Mapping[str, Any], mine: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first of ``keys`` whose stored value differs from this module's."""
    for key in keys:
        if saved.get(key) != mine[key]:
            raise ValueError(
                f"checkpoint was trained with {key}={saved.get(key)!r}, this module is configured with "
                f"{key}={mine[key]!r}"
            )
