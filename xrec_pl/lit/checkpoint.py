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

from xrec_pl.errors import DataError, LLMLoadError

CHECKPOINT_KEY = "xrec_explainer"  # what a stage-2 checkpoint was trained with: the LLM's identity and the switches


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


def save_trainable(module: nn.Module, checkpoint: dict[str, Any], identity: dict[str, Any]) -> None:
    """Keep only the trainable weights of ``module`` (never a frozen LLM) and record ``identity`` beside them."""
    checkpoint["state_dict"] = trainable_state(checkpoint["state_dict"], module)
    checkpoint[CHECKPOINT_KEY] = identity


def load_validated(
    module: nn.Module, checkpoint: dict[str, Any], identity: dict[str, Any], keys: tuple[str, ...], where: str
) -> None:
    """Refuse a checkpoint of another LLM or configuration, or with missing/unexpected/misshapen trainable weights.

    ``identity`` is the module's own (``llm`` = its ``LLMInfo.to_dict()``, plus ``keys``). On success the frozen
    weights the module already holds (its state but the trainable parameters) are filled into ``checkpoint["state_dict"]``, so the
    non-strict load reports no missing keys; copying a tensor onto itself changes nothing.

    Raises:
        LLMLoadError: another LLM (``where: ...``).
        DataError: anything else (``where: ...``), one line naming the file.
    """
    try:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("not an ExplainerModule checkpoint (no LLM/adapter identity stored)")
        module.llm_info.check_matches(saved["llm"], what="checkpoint")
        check_identity(saved, identity, keys)
        expected = {key: module.get_parameter(key) for key in trainable_keys(module)}
        problem = state_mismatch(checkpoint.get("state_dict", {}), expected)
        if problem:
            raise ValueError(f"checkpoint adapter weights do not match this module: {problem}")
    except LLMLoadError as err:  # one line that names the file (the CLI prints these without a traceback)
        raise LLMLoadError(f"{where}: {err}") from None
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None
    trainable = trainable_keys(module)
    frozen = {k: v for k, v in module.state_dict().items() if k not in trainable}
    checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}


def rename_legacy_keys(checkpoint: dict[str, Any], renames: Mapping[str, str]) -> None:
    """Rename the ``state_dict`` keys that start with an old prefix (``renames``: old prefix -> new), in place.

    For checkpoints written before a module moved its parts (the explainer's adapters into ``net``); keys that
    already have the new layout, and the optimizer state (kept by parameter order), are left as they are.
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return
    renamed = {}
    for key, value in state.items():
        old = next((prefix for prefix in renames if key.startswith(prefix)), None)
        renamed[key if old is None else renames[old] + key[len(old) :]] = value
    checkpoint["state_dict"] = renamed
