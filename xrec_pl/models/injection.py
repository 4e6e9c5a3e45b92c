"""Inject adapter outputs into a frozen Hugging Face causal LM with forward hooks (no fork of the model file).

XRec injects the collaborative embedding of the user and of the item in two places:

1. the input embeddings at the positions of ``<USER_EMBED>`` / ``<ITEM_EMBED>`` are *replaced* by the adapter
   outputs (hook on ``llm.get_input_embeddings()``);
2. in every decoder layer, right after the q/k/v projections and before the rotary embedding, the adapter output is
   *added* to the query, key and value states at those two positions (hooks on ``self_attn.{q,k,v}_proj``).

Grouped-query attention (k/v narrower than the hidden size, e.g. SmolLM2, Llama-3, Qwen2) leaves XRec's rule
undefined. Rule here: where a projection's output width equals the hidden size, the raw adapter output is added
(exactly XRec); where it differs, the adapter output is passed through that projection's own frozen weight
(``F.linear(vec, proj.weight)``, no bias, no new parameters) and the result is added. The projection is never called
inside its own hook (that would re-enter the hook).

Hooks act only when a context is set and the sequence is longer than one token (training forward or the prefill of
generation); cached decoding steps (one new token) are untouched, so the KV cache holds the injected keys/values
of the prompt. Hooks return new tensors; nothing is edited in place.

Lifetime: install once (``install()`` is idempotent) and keep the hooks through ``backward()`` — non-reentrant
activation checkpointing re-runs the forward during backward and needs the same hooks and context. Set the context
per batch with ``set_context`` and ``clear()`` it after backward; use ``injecting(...)`` for eval and generation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from xrec_pl.utils import check_choice

InjectionMode = Literal["layers", "input", "none"]


@dataclass(frozen=True)
class InjectionTarget:
    """Where the projections live, relative to the ``*ForCausalLM`` module.

    Attributes:
        layers: dotted path of the ``ModuleList`` of decoder layers.
        attention: attribute of a decoder layer holding the self-attention module.
        projections: attribute names of the query, key and value projections (separate ``nn.Linear``-like modules).
    """

    layers: str = "model.layers"
    attention: str = "self_attn"
    projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")


# Per model_type module names (the idea of PEFT's TRANSFORMERS_MODELS_TO_*_MAPPING). The Llama layout is the
# default for any model type not listed; models with fused qkv projections (gpt2, gpt_neox, phi3, falcon) are not
# supported in "layers" mode and get a clear error. Every entry is tested on a tiny random config built offline
# (tests/unit/test_injection_families.py: q/k/v deltas exact, cached = uncached greedy, gradients only in adapters;
# all but opt with grouped-query attention).
_LLAMA = InjectionTarget()
INJECTION_TARGETS: dict[str, InjectionTarget] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
            "phi",
            "starcoder2",
            "cohere",
            "stablelm",
        ),
        _LLAMA,
    ),
    "opt": InjectionTarget(layers="model.decoder.layers"),
}


class EmbeddingInjector:
    """Hooks that put adapter outputs into a frozen causal LM at the reserved-token positions.

    Args:
        llm: a Hugging Face causal LM (``*ForCausalLM``).
        mode: ``"layers"`` (input embeddings replaced and q/k/v of every layer added to; XRec), ``"input"`` (input
            embeddings only) or ``"none"`` (no hooks; the context is accepted and ignored).

    Raises:
        ValueError: unknown mode, or (``"layers"``) q/k/v projections that cannot be found for this model type.

    Example::

        injector = EmbeddingInjector(llm, "layers").install()
        injector.set_context(positions, vectors)   # (B, 2) long, (B, 2, H)
        loss = llm(input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        injector.clear()

        with injector.injecting(positions, vectors):
            out = llm.generate(input_ids, attention_mask=mask, max_new_tokens=128)
    """

    def __init__(self, llm: nn.Module, mode: InjectionMode = "layers") -> None:
        check_choice("injection mode", mode, InjectionMode)
        self.llm = llm
        self.mode = mode
        self.embedding: nn.Module = llm.get_input_embeddings()
        self.hidden_size = int(self.embedding.weight.shape[1])
        self.projections: list[tuple[str, nn.Module]] = find_projections(llm) if mode == "layers" else []
        for name, proj in self.projections:
            if _out_width(proj) != self.hidden_size and not proj.weight.dtype.is_floating_point:
                raise ValueError(
                    f"{name} is narrower than the hidden size and its weight is quantised ({proj.weight.dtype}); "
                    "the grouped-query rule needs a float weight. Use mode='input' or an unquantised model."
                )
        self._handles: list[RemovableHandle] = []
        self._rows: Tensor | None = None  # (N,) batch row of each injected slot
        self._cols: Tensor | None = None  # (N,) sequence position of each slot
        self._vectors: Tensor | None = None  # (N, H) in the LLM dtype
        self._batch_size = 0
        self._max_position = -1
        self._min_position = -1
        self._offset = 0  # sequence position of the first token the forward sees (a cached prefix holds the rest)
        self._paused = False

    # ---------------------------------------------------------------- hooks lifetime

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> EmbeddingInjector:
        """Register the hooks (no-op if already installed or in mode ``"none"``). Returns ``self``."""
        if self._handles or self.mode == "none":
            return self
        self._handles.append(self.embedding.register_forward_hook(self._embedding_hook))
        for _, proj in self.projections:
            self._handles.append(proj.register_forward_hook(self._projection_hook))
        return self

    def remove(self) -> None:
        """Remove every hook this injector registered (the context is kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---------------------------------------------------------------- context

    @property
    def dtype(self) -> torch.dtype:
        """The LLM's activation dtype (that of the input embedding table)."""
        return self.embedding.weight.dtype

    @property
    def has_context(self) -> bool:
        return self._vectors is not None

    def set_context(self, positions: Tensor, vectors: Tensor) -> None:
        """Set what to inject in the next forward passes.

        Args:
            positions: ``(B, 2)`` long, absolute positions of ``<USER_EMBED>`` and ``<ITEM_EMBED>`` in each row of the
                (padded) input; for left-padded generation batches these include the padding offset. Negative
                entries mean "nothing to inject in this slot".
            vectors: ``(B, 2, H)`` adapter outputs (any float dtype; cast once here to the LLM dtype, keeping the
                autograd graph to the adapter).
        """
        if positions.dim() != 2 or vectors.dim() != 3 or vectors.shape[:2] != positions.shape:
            raise ValueError(
                f"set_context expects positions (B, K) and vectors (B, K, H), got {tuple(positions.shape)} and "
                f"{tuple(vectors.shape)}"
            )
        if vectors.shape[-1] != self.hidden_size:
            raise ValueError(f"vectors have width {vectors.shape[-1]}, the LLM hidden size is {self.hidden_size}")
        if positions.dtype.is_floating_point:
            raise ValueError(f"positions must be integer, got {positions.dtype}")
        device = self.embedding.weight.device
        positions = positions.to(device=device, dtype=torch.long)
        valid = positions >= 0  # (B, K)
        rows = torch.arange(positions.shape[0], device=device).unsqueeze(1).expand_as(positions)  # (B, K)
        self._rows = rows[valid]  # (N,)
        self._cols = positions[valid]  # (N,)
        self._vectors = vectors.to(device=device, dtype=self.dtype)[valid]  # (N, H)
        self._batch_size = positions.shape[0]
        self._max_position = int(self._cols.max()) if self._cols.numel() else -1
        self._min_position = int(self._cols.min()) if self._cols.numel() else -1

    def clear(self) -> None:
        """Forget the context; hooks stay installed but do nothing."""
        self._rows = self._cols = self._vectors = None
        self._batch_size = 0
        self._max_position = self._min_position = -1

    @contextmanager
    def injecting(self, positions: Tensor, vectors: Tensor) -> Iterator[EmbeddingInjector]:
        """Inject within the block (installing the hooks for the block if needed), then clear.

        Use for eval and generation; in training keep the context until after ``backward()``.
        """
        was_installed = self.installed
        self.install()
        self.set_context(positions, vectors)
        try:
            yield self
        finally:
            self.clear()
            if not was_installed:
                self.remove()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside the block inject nothing (a shared prompt prefix before the reserved tokens)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @contextmanager
    def starting_at(self, offset: int) -> Iterator[None]:
        """Forwards inside the block see the sequence from position ``offset`` on (the tokens before it are in the
        KV cache): the context's positions are shifted by ``offset``; none may lie before it."""
        self._offset = offset
        try:
            yield
        finally:
            self._offset = 0

    # ---------------------------------------------------------------- hook bodies

    def _slots(self, output: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """(rows, cols, vectors) for this output, or None when nothing is to be injected."""
        if self._vectors is None or output.dim() != 3 or output.shape[1] <= 1 or self._rows.numel() == 0:
            return None  # no context, or a cached decoding step (one token)
        if self._paused:
            return None
        batch, seq = output.shape[:2]
        if self._max_position - self._offset >= seq:
            raise IndexError(
                f"injection position {self._max_position} is outside the sequence of length {seq + self._offset}"
            )
        rows, cols, vectors = self._rows, self._cols, self._vectors
        if self._offset:
            if self._min_position < self._offset:  # positions are checked once, in set_context: no sync per hook
                raise IndexError(f"an injection position lies in the cached prefix (before {self._offset})")
            cols = cols - self._offset
        if batch != self._batch_size:
            # generate() expands the batch for num_return_sequences / beams: row b becomes rows b*k .. b*k+k-1
            if batch % self._batch_size:
                raise ValueError(f"context was set for batch size {self._batch_size}, the forward has {batch}")
            k = batch // self._batch_size
            rows = (rows.unsqueeze(1) * k + torch.arange(k, device=rows.device)).flatten()
            cols = cols.repeat_interleave(k)
            vectors = vectors.repeat_interleave(k, dim=0)
        return rows, cols.to(output.device), vectors.to(output.device)

    def _embedding_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        slots = self._slots(output)
        if slots is None:
            return None
        rows, cols, vectors = slots
        # (B, T, H) with the reserved rows replaced; out-of-place so autograd sees a new tensor
        return output.index_put((rows.to(output.device), cols), vectors.to(output.dtype))

    def _projection_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        slots = self._slots(output)
        if slots is None:
            return None
        rows, cols, vectors = slots
        if output.shape[-1] != self.hidden_size:
            vectors = F.linear(vectors, module.weight)  # (N, out): GQA rule, the layer's own frozen weight
        # (B, T, out) plus the delta at the reserved positions
        return output.index_put((rows.to(output.device), cols), vectors.to(output.dtype), accumulate=True)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}, hidden_size={self.hidden_size}, "
            f"projections={len(self.projections)}, installed={self.installed}, has_context={self.has_context})"
        )


def _out_width(proj: nn.Module) -> int:
    return int(getattr(proj, "out_features", None) or proj.weight.shape[0])


def find_projections(llm: nn.Module) -> list[tuple[str, nn.Module]]:
    """The q/k/v projection modules of every decoder layer, as ``(qualified name, module)``.

    Uses ``INJECTION_TARGETS[config.model_type]`` (Llama names by default), then ``llm.get_decoder().layers``.

    Raises:
        ValueError: when the layers or projections cannot be found, naming what was looked for.
    """
    config = getattr(llm, "config", None)
    model_type = getattr(config, "model_type", None) or type(llm).__name__
    target = INJECTION_TARGETS.get(model_type, _LLAMA)
    layers, prefix = _find_layers(llm, target)
    found: list[tuple[str, nn.Module]] = []
    missing: list[str] = []
    for i, layer in enumerate(layers or []):
        attention = getattr(layer, target.attention, None)
        for proj_name in target.projections:
            proj = getattr(attention, proj_name, None) if attention is not None else None
            name = f"{prefix}.{i}.{target.attention}.{proj_name}"
            if proj is None or not isinstance(getattr(proj, "weight", None), Tensor):
                missing.append(name)
            else:
                found.append((name, proj))
    if layers is None or missing or not found:
        what = f"{target.layers}[*].{target.attention}.{{{','.join(target.projections)}}}"
        detail = f"missing {missing[0]}" if missing else "no decoder layers found"
        raise ValueError(
            f"EmbeddingInjector cannot find the q/k/v projections of model_type {model_type!r} (looked for {what}; "
            f"{detail}). Injection in layers needs separate q/k/v projection modules; supported model types: "
            f"{', '.join(sorted(INJECTION_TARGETS))} and Llama-like layouts. Use injection mode 'input' or add an "
            "entry to xrec_pl.models.injection.INJECTION_TARGETS."
        )
    return found


def _find_layers(llm: nn.Module, target: InjectionTarget) -> tuple[nn.ModuleList | None, str]:
    try:
        layers = llm.get_submodule(target.layers)
        if isinstance(layers, nn.ModuleList):
            return layers, target.layers
    except AttributeError:
        pass
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        name = next((n for n, m in llm.named_modules() if m is layers), "layers")
        return layers, name
    return None, target.layers
