"""A KV cache whose full-attention layers write into storage allocated once, instead of growing by concatenation.

Transformers' ``DynamicLayer`` appends each decoding step with ``torch.cat``, so step ``t`` copies the whole cache of
every layer (``O(t)`` bytes per step, ``O(T^2)`` per explanation). On a CPU, where a decoding step of a small model
is bound by memory traffic, that copy is a large share of the step. :class:`PreallocatedLayer` allocates
``(B, heads, capacity, head_dim)`` at the prefill, writes each new step in place and hands attention a view of the
filled part; dropping finished rows (``batch_select_indices``) is the only copy. The keys and values attention sees
are the same numbers as with ``DynamicLayer`` (tested: the same tokens).

Layers of other kinds (sliding-window layers of Gemma-2/Mistral configs) keep transformers' own class.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["PreallocatedLayer", "preallocated_cache"]


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer with room for ``capacity`` positions, filled in place.

    Args:
        capacity: the most positions the layer will hold (prompt length + new tokens); a longer sequence grows the
            storage (doubling), so a wrong guess costs speed, never correctness.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.length = 0
        self._keys: Tensor | None = None  # (B, heads, capacity, head_dim)
        self._values: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._keys is None or self.length + new > self._keys.shape[-2]:
            self._grow(key_states, value_states, self.length + new)
        self._keys[:, :, self.length : self.length + new] = key_states
        self._values[:, :, self.length : self.length + new] = value_states
        self.length += new
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]
        return self.keys, self.values

    def _grow(self, key_states: Tensor, value_states: Tensor, needed: int) -> None:
        size = max(self.capacity, needed)
        if self._keys is not None:
            size = max(size, 2 * self._keys.shape[-2])
        b, h, _, d = key_states.shape
        keys = key_states.new_empty(b, h, size, d)
        values = value_states.new_empty(b, h, size, value_states.shape[-1])
        if self._keys is not None and self.length:
            keys[:, :, : self.length] = self._keys[:, :, : self.length]
            values[:, :, : self.length] = self._values[:, :, : self.length]
        self._keys, self._values = keys, values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self._keys = self._values = None
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self._keys is None:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._keys is not None:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self.keys = self._keys[:, :, : self.length]
            self.values = self._values[:, :, : self.length]

    def batch_select_indices(self, indices: Tensor) -> None:
        if self._keys is not None:
            self._keys = self._keys[indices]
            self._values = self._values[indices]
            self.keys = self._keys[:, :, : self.length]
            self.values = self._values[:, :, : self.length]


def preallocated_cache(config: Any, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain full-attention layers are :class:`PreallocatedLayer`."""
    cache = DynamicCache(config=config)
    if cache.layers:
        cache.layers = [PreallocatedLayer(capacity) if type(x) is DynamicLayer else x for x in cache.layers]
    else:  # no layer types known up front: every layer created on first use is preallocated
        cache.layer_class_to_replicate = lambda: PreallocatedLayer(capacity)  # type: ignore[assignment]
    return cache


def cache_keyword(llm: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older releases), whichever ``forward`` takes."""
    params = inspect.signature(llm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
