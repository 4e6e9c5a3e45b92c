"""EmbeddingInjector on every model family of ``INJECTION_TARGETS``: tiny random configs built offline by transformers.

For each family: q/k/v deltas exact at the two positions (the raw vector where the projection is as wide as the
hidden size, ``W @ vector`` where it is narrower), cached greedy generation equal to uncached greedy, and a training
step whose gradients reach only the adapter. A family that fails here is not in the table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from xrec_pl.models.adapters import MoEAdapter
from xrec_pl.models.injection import INJECTION_TARGETS, EmbeddingInjector, find_projections

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 4, 2, 8, 96
# tiny sizes every family accepts (unknown keys are ignored or stored on the config); MoE and family-specific
# widths are shrunk so that each model has a few thousand parameters
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
FAMILY = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "gemma2": {"query_pre_attn_scalar": HEAD_DIM, "sliding_window": 16},
    "gemma3_text": {"query_pre_attn_scalar": HEAD_DIM, "sliding_window": 16},
    "phi": {"partial_rotary_factor": 0.5},
    "stablelm": {"partial_rotary_factor": 0.5},
    "opt": {"ffn_dim": 48, "word_embed_proj_dim": HIDDEN, "num_key_value_heads": HEADS, "enable_bias": True},
    "starcoder2": {"sliding_window": 16},
}
FAMILIES = sorted(INJECTION_TARGETS)


def tiny_model(model_type: str) -> torch.nn.Module:
    """A frozen, eval-mode random model of ``model_type`` with the tiny sizes above (eager attention, float32)."""
    kwargs = {**COMMON, **FAMILY.get(model_type, {})}
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, tiny_model(request.param)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (2, 12) without the special ids, a full mask, and the two injection positions of each row."""
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids), torch.tensor([[3, 7], [2, 9]])


def vectors(hidden: int, rows: int = 2, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(rows, 2, hidden, generator=torch.Generator().manual_seed(2)) * scale


def test_every_family_in_the_table_is_tested():
    assert "llama" in FAMILIES and len(FAMILIES) >= 10
    assert "phi3" not in INJECTION_TARGETS  # fused qkv_proj: refused, not silently handled (see test below)


def test_projection_deltas_exact(family):
    name, model = family
    ids, mask, pos = batch()
    vec = vectors(model.config.hidden_size)
    injector = EmbeddingInjector(model, "layers").install()  # first: the capture hooks below run after it
    projections = find_projections(model)
    assert len(projections) == 3 * model.config.num_hidden_layers
    before, after, handles = {}, {}, []
    for pname, module in projections:
        handles.append(module.register_forward_hook(lambda m, a, o, n=pname: before.__setitem__(n, o), prepend=True))
        handles.append(module.register_forward_hook(lambda m, a, o, n=pname: after.__setitem__(n, o)))
    try:
        with injector.injecting(pos, vec), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
        injector.remove()
    at = torch.zeros(ids.shape, dtype=torch.bool)
    at[torch.arange(2).unsqueeze(1), pos] = True
    widths = set()
    for pname, proj in projections:
        delta = after[pname] - before[pname]  # (B, T, out)
        assert torch.count_nonzero(delta[~at]) == 0, (name, pname)
        out = proj.weight.shape[0]
        widths.add(out)
        expected = vec if out == model.config.hidden_size else F.linear(vec, proj.weight)
        torch.testing.assert_close(delta[torch.arange(2).unsqueeze(1), pos], expected, rtol=1e-5, atol=1e-5)
    kv = getattr(model.config, "num_key_value_heads", HEADS) or HEADS
    if kv < model.config.num_attention_heads:  # GQA: both branches of the rule exercised
        assert len(widths) == 2, (name, widths)


def _greedy_uncached(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, out[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_greedy_equals_uncached(family):
    name, model = family
    ids, mask, pos = batch()
    ids, mask, pos = ids[:1], mask[:1], pos[:1]
    vec = vectors(model.config.hidden_size, rows=1, scale=3.0)
    steps = 6
    injector = EmbeddingInjector(model, "layers")
    kwargs = {"max_new_tokens": steps, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with injector.injecting(pos, vec):
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        uncached = _greedy_uncached(model, ids, steps)
    assert cached.shape[1] == ids.shape[1] + steps, name
    assert torch.equal(cached, uncached), name
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits[0, -1]
    with injector.injecting(pos, vec), torch.no_grad():
        injected = model(input_ids=ids, attention_mask=mask).logits[0, -1]
    assert not torch.allclose(plain, injected), name  # the injection matters: the comparison is not vacuous


def test_training_step_grads_only_in_adapter(family):
    name, model = family
    ids, mask, pos = batch()
    torch.manual_seed(0)
    adapter = MoEAdapter(8, model.config.hidden_size, dropout=0.0, noisy_gating=False)
    injector = EmbeddingInjector(model, "layers").install()
    try:
        injector.set_context(pos, adapter(torch.randn(2, 2, 8)))
        out = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        injector.clear()
    finally:
        injector.remove()
    assert torch.isfinite(loss), name
    assert all(p.grad is None for p in model.parameters()), name
    grads = {n: p.grad for n, p in adapter.named_parameters() if p.grad is not None}
    assert set(grads) == {"expert_weight", "expert_bias", "w_gate"} and torch.count_nonzero(grads["expert_weight"])


def test_fused_qkv_family_is_refused():
    model = tiny_model("phi3")
    with pytest.raises(ValueError, match="phi3"):
        EmbeddingInjector(model, "layers")
    EmbeddingInjector(model, "input")  # input-embedding injection works for any layout
