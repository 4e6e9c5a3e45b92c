"""Trained adapters in a folder others can use without xrec-pl: safetensors weights and a JSON description.

A folder written by :func:`export_adapters` holds

* ``adapters.safetensors`` -- the trained tensors (float32): ``user_adapter.*`` and ``item_adapter.*``, and the
  collaborative tables the adapters read, ``user_table`` ``(U, D)`` and ``item_table`` ``(I, D)`` (the stage-1
  embeddings, or the fixed / random vectors of those arms; row ``k`` belongs to id ``k`` of the dataset);
* ``xrec_adapters.json`` -- what they were trained with: the LLM's identity (architecture, vocabulary size and the
  ids of the reserved ``<USER_EMBED>``/``<ITEM_EMBED>`` tokens), the switches (adapter kind, experts, width,
  injection, embedding source), the prompt settings, where they came from, and the arithmetic in words, so that the
  tensors can be applied by anyone's code.

:func:`load_exported` rebuilds a :class:`~xrec_pl.models.explainer.GraphConditionedLM` from such a folder, after
checking that the LLM it loads is the one the adapters were trained for (one ``LLMLoadError`` line if not). Reading
never unpickles: JSON and safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from xrec_pl.errors import DataError
from xrec_pl.utils import atomic_folder

__all__ = ["CONFIG_FILE", "EXPORT_FORMAT", "WEIGHTS_FILE", "export_adapters", "load_exported", "read_export_config"]

EXPORT_FORMAT = "xrec-pl-adapters"
EXPORT_VERSION = 1
WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "xrec_adapters.json"
SWITCHES = ("adapter", "num_experts", "graph_dim", "injection", "embedding_source")

ARITHMETIC = {
    "vectors": "u = user_table[user_id], i = item_table[item_id] (fixed arm: one row each, used for every id)",
    "moe_adapter": (
        "per expert e: y_e = expert_weight[e] @ (x - expert_bias[e]); gate g = softmax(x @ w_gate) (w_noise is only "
        "used for noisy gating in training); output = sum_e g_e * y_e"
    ),
    "linear_adapter": "output = weight @ x + bias",
    "injection": (
        "e_u = user_adapter(u), e_i = item_adapter(i) (fp32, cast to the LLM dtype once). They replace the input "
        "embeddings of the <USER_EMBED> / <ITEM_EMBED> tokens of the prompt; with injection 'layers' they are also "
        "added to the outputs of the q, k and v projections of every decoder layer at those two positions"
    ),
}


def export_adapters(
    net: Any,
    out_dir: str | os.PathLike,
    switches: dict[str, Any],
    *,
    extra_tokens: tuple[str, ...] = (),
    prompt: dict[str, Any] | None = None,
    trained: dict[str, Any] | None = None,
) -> Path:
    """Write ``net``'s adapters and tables into ``out_dir`` (created; must be absent or empty), atomically.

    Args:
        net: A :class:`~xrec_pl.models.explainer.GraphConditionedLM` with trained adapters.
        out_dir: The folder to write.
        switches: What ``net`` was built with: ``adapter``, ``num_experts``, ``graph_dim``, ``injection``,
            ``embedding_source`` (:meth:`~xrec_pl.models.explainer.GraphConditionedLM.build`'s arguments).
        extra_tokens: Tokens added to the tokenizer beyond the reserved ones (recorded; added again on load).
        prompt: Prompt settings the adapters were trained with (style, domain, profiles), recorded as they are.
        trained: Provenance (run folder, checkpoint, step, validation scores), recorded as it is.

    Returns:
        The folder.

    Raises:
        DataError: nothing to export (no adapters, or redrawn embeddings: no table), or ``out_dir`` is not empty.
    """
    from safetensors.torch import save_file

    from xrec_pl.models.llm import get_llm_info

    out = Path(out_dir)
    if out.is_symlink():
        raise DataError(f"--out {out}: is a link; give a plain folder path")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out}: exists and is not an empty folder; export never overwrites")
    if not net.trains_anything:
        raise DataError("this run has no trained adapters (adapter or injection 'none'): nothing to export")
    source = net.source
    if source.user_table is None or source.item_table is None:
        raise DataError(f"embedding source {source.kind!r} has no tables to export (redrawn vectors change per call)")
    tensors = {"user_table": source.user_table, "item_table": source.item_table}
    for name, adapter in (("user_adapter", net.user_adapter), ("item_adapter", net.item_adapter)):
        tensors.update({f"{name}.{key}": value for key, value in adapter.state_dict().items()})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "llm": get_llm_info(net.llm).to_dict(),
        **{key: switches[key] for key in SWITCHES},
        "extra_tokens": list(extra_tokens),
        "num_users": int(tensors["user_table"].shape[0]) if source.kind != "fixed" else None,
        "num_items": int(tensors["item_table"].shape[0]) if source.kind != "fixed" else None,
        "prompt": dict(prompt or {}),
        "trained": dict(trained or {}),
        "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
        "arithmetic": ARITHMETIC,
    }
    with atomic_folder(out) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def read_export_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``xrec_adapters.json`` of an export folder (``DataError`` naming the file otherwise)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found (not an xrec-pl adapter export)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise DataError(f"{path}: not an xrec-pl adapter export (format is not {EXPORT_FORMAT!r})")
    if config.get("version") != EXPORT_VERSION:
        raise DataError(f"{path}: export version {config.get('version')!r}; this xrec-pl reads {EXPORT_VERSION}")
    missing = [key for key in ("llm", *SWITCHES) if key not in config]
    if missing or not isinstance(config["llm"], dict):
        raise DataError(f"{path}: missing or malformed keys {missing or ['llm']}")
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable safetensors file ({err})") from None


def load_exported(folder: str | os.PathLike, llm: str | None = None, *, dtype: str = "auto", seed: int = 0) -> Any:
    """A :class:`~xrec_pl.models.explainer.GraphConditionedLM` with the exported adapters and tables, in eval mode.

    Args:
        folder: An export folder (:func:`export_adapters`).
        llm: The LLM to load (name or path; default: the name recorded in the export). It must be the architecture
            and vocabulary the adapters were trained for.
        dtype: The frozen LLM's dtype.
        seed: Seed of the LLM load (reserved-token rows).

    Raises:
        DataError: a damaged or foreign folder, or tensors that do not fit the switches (naming the file).
        LLMLoadError: another LLM than the one recorded.
    """
    from xrec_pl.models.explainer import GraphConditionedLM
    from xrec_pl.models.llm import get_llm_info

    folder = Path(folder)
    config = read_export_config(folder)
    tensors = _read_tensors(folder)
    user, item = tensors.get("user_table"), tensors.get("item_table")
    if user is None or item is None or user.ndim != 2 or item.ndim != 2:
        raise DataError(f"{folder / WEIGHTS_FILE}: user_table / item_table missing or not 2-D")
    switches = {key: config[key] for key in SWITCHES}
    graph = switches["embedding_source"] == "graph"
    net = GraphConditionedLM.from_pretrained(
        llm or config["llm"]["name"],
        dtype=dtype,
        seed=seed,
        extra_tokens=tuple(config.get("extra_tokens") or ()),
        user=user if graph else None,
        item=item if graph else None,
        num_users=config.get("num_users"),
        num_items=config.get("num_items"),
        **switches,
    )
    get_llm_info(net.llm).check_matches(config["llm"], what=f"adapter export {folder}")
    if not net.trains_anything:
        raise DataError(f"{folder / CONFIG_FILE}: switches without adapters (adapter or injection 'none')")
    if not graph:  # fixed / random: the exported vectors, whatever this build drew
        for name, table in (("user_table", user), ("item_table", item)):
            _check_shape(folder, name, table, getattr(net.source, name))
            setattr(net.source, name, table)
    for name, adapter in (("user_adapter", net.user_adapter), ("item_adapter", net.item_adapter)):
        saved = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        expected = adapter.state_dict()
        if sorted(saved) != sorted(expected):
            raise DataError(
                f"{folder / WEIGHTS_FILE}: {name} tensors {sorted(saved)} do not fit the recorded switches "
                f"(expected {sorted(expected)})"
            )
        for key, value in saved.items():
            _check_shape(folder, f"{name}.{key}", value, expected[key])
        adapter.load_state_dict(saved)
    return net.eval()


def _check_shape(folder: Path, name: str, have: torch.Tensor, want: torch.Tensor | None) -> None:
    if want is None or tuple(have.shape) != tuple(want.shape):
        shape = None if want is None else tuple(want.shape)
        raise DataError(f"{folder / WEIGHTS_FILE}: {name} has shape {tuple(have.shape)}, the switches expect {shape}")
