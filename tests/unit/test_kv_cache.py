"""The preallocated KV cache holds exactly what transformers' growing cache holds, and decoding with it is unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from xrec_pl.models.kv_cache import PreallocatedLayer, preallocated_cache


def _steps(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    yield torch.randn(3, 2, 5, 4, generator=g)  # prefill of 5 positions
    for _ in range(6):
        yield torch.randn(3, 2, 1, 4, generator=g)


@pytest.mark.parametrize("capacity", [1, 5, 8, 64])
def test_same_keys_and_values_as_the_growing_layer_through_drops_and_growth(capacity: int) -> None:
    ours, theirs = PreallocatedLayer(capacity), DynamicLayer()
    rows = 3
    for n, kv in enumerate(_steps()):
        if n == 3:  # a row finished: both keep rows 0 and 2
            keep = torch.tensor([0, 2])
            ours.batch_select_indices(keep)
            theirs.batch_select_indices(keep)
            rows = 2
        k, v = kv[:rows], kv[:rows] * 2
        a_k, a_v = ours.update(k, v)
        b_k, b_v = theirs.update(k, v)
        assert torch.equal(a_k, b_k) and torch.equal(a_v, b_v)
        assert ours.get_seq_length() == theirs.get_seq_length()
    assert ours.get_seq_length() == 11
    ours.crop(-3)
    theirs.crop(-3)
    assert torch.equal(ours.keys, theirs.keys) and ours.get_seq_length() == 8


def test_writes_in_place_within_capacity() -> None:
    layer = PreallocatedLayer(16)
    steps = list(_steps())
    layer.update(steps[0], steps[0])
    storage = layer.keys.untyped_storage().data_ptr()
    for kv in steps[1:]:
        layer.update(kv, kv)
    assert layer.keys.untyped_storage().data_ptr() == storage  # no reallocation, no copy of the cache


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PreallocatedLayer(0)


def test_cache_for_a_config_replaces_full_attention_layers_only() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    cache = preallocated_cache(config, 10)
    assert len(cache.layers) == 3 and all(isinstance(x, PreallocatedLayer) for x in cache.layers)


def test_greedy_decoding_with_a_too_small_capacity_equals_generate() -> None:
    """Growth past the guessed capacity keeps decoding exact (tiny random Llama, greedy, cached)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from xrec_pl.models import decoding

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    llm = LlamaForCausalLM(config).eval()
    ids = torch.randint(2, 64, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    want = llm.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=0
    )[:, 7:]
    original = decoding.preallocated_cache
    try:
        decoding.preallocated_cache = lambda cfg, capacity: original(cfg, 3)  # far too small: must grow
        got = decoding.greedy_generate(llm, mask, input_ids=ids, max_new_tokens=12, stop_ids=[1], pad_id=0)
    finally:
        decoding.preallocated_cache = original
    assert torch.equal(got, want[:, : got.shape[1]])
