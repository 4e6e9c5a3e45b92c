"""EmbeddingInjector on the tiny random Llamas (MHA and GQA)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xrec_pl.models.adapters import MoEAdapter
from xrec_pl.models.injection import EmbeddingInjector, find_projections
from xrec_pl.models.llm import reserved_token_ids

PROMPTS = [
    "user record: <USER_EMBED> book record: <ITEM_EMBED> book name: The Sea",
    "Explain why. user record: <USER_EMBED> book record: <ITEM_EMBED> book name: A long story about a detective",
]


def encode(tokenizer, texts: list[str], side: str = "right") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, positions (B, 2) of the reserved tokens in the padded rows."""
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    user_id, item_id = reserved_token_ids(tokenizer)
    positions = torch.stack([(ids == user_id).int().argmax(1), (ids == item_id).int().argmax(1)], dim=1)  # (B, 2)
    assert (ids.gather(1, positions) == torch.tensor([user_id, item_id])).all()
    return ids, mask, positions


def vectors_for(model, batch: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, model.config.hidden_size, generator=g) * scale  # (B, 2, H)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_mode_none_leaves_logits_exactly_equal(tiny_llm):
    model, tok = tiny_llm
    ids, mask, pos = encode(tok, PROMPTS)
    plain = logits(model, ids, mask)
    injector = EmbeddingInjector(model, "none")
    with injector.injecting(pos, vectors_for(model, 2)):
        assert hook_count(model) == 0
        assert torch.equal(logits(model, ids, mask), plain)


@pytest.mark.parametrize("mode", ["layers", "input"])
def test_injection_changes_logits_and_context_clears(any_tiny_llm, mode):
    model, tok = any_tiny_llm
    ids, mask, pos = encode(tok, PROMPTS)
    plain = logits(model, ids, mask)
    injector = EmbeddingInjector(model, mode).install()
    try:
        injector.set_context(pos, vectors_for(model, 2))
        injected = logits(model, ids, mask)
        # causal: positions before the first reserved token are untouched
        first = int(pos.min())
        assert torch.equal(injected[:, :first], plain[:, :first])
        assert not torch.allclose(injected[:, first:], plain[:, first:])
        injector.clear()
        assert torch.equal(logits(model, ids, mask), plain)  # hooks installed, no context: plain model
    finally:
        injector.remove()


def _capture(model, injector):
    """Hooks before (prepend) and after the injector's hooks on the embedding and every q/k/v projection."""
    before, after, handles = {}, {}, []
    modules = [("embed", model.get_input_embeddings()), *find_projections(model)]
    for name, module in modules:
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: before.__setitem__(n, o), prepend=True))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: after.__setitem__(n, o)))
    return before, after, handles


@pytest.mark.parametrize("mode", ["layers", "input"])
def test_projection_deltas_exact(any_tiny_llm, mode):
    """q/k/v outputs differ only at the two positions, by the vector (MHA) or W @ vector (GQA k/v)."""
    model, tok = any_tiny_llm
    hidden = model.config.hidden_size
    ids, mask, pos = encode(tok, PROMPTS)
    vec = vectors_for(model, 2)
    injector = EmbeddingInjector(model, mode).install()  # first, so that the "after" hooks run after it
    before, after, handles = _capture(model, injector)
    try:
        with injector.injecting(pos, vec):
            logits(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
        injector.remove()
    at = torch.zeros(ids.shape, dtype=torch.bool)
    at[torch.arange(2).unsqueeze(1), pos] = True
    # embedding rows at the two positions are replaced by the vectors, other rows untouched
    emb = after.pop("embed")
    torch.testing.assert_close(emb[at], vec.reshape(-1, hidden), rtol=0, atol=0)
    assert torch.equal(emb[~at], before.pop("embed")[~at])
    widths = set()
    for name, proj in find_projections(model):
        delta = after[name] - before[name]  # (B, T, out)
        assert torch.count_nonzero(delta[~at]) == 0, name
        if mode == "input":
            assert torch.count_nonzero(delta) == 0, name
            continue
        out = proj.weight.shape[0]
        widths.add(out)
        expected = vec if out == hidden else F.linear(vec, proj.weight)  # (B, 2, out)
        got = delta[torch.arange(2).unsqueeze(1), pos]  # (B, 2, out)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if mode == "layers":
        gqa = model.config.num_key_value_heads < model.config.num_attention_heads
        assert widths == ({hidden, hidden // 2} if gqa else {hidden})  # both branches of the rule exercised


def test_layers_mode_hooks_every_projection_and_install_is_idempotent(tiny_llm_gqa):
    model, _ = tiny_llm_gqa
    injector = EmbeddingInjector(model, "layers")
    assert [n for n, _ in injector.projections] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")
    ]
    injector.install()
    injector.install()
    assert hook_count(model) == 1 + 6
    injector.remove()
    assert hook_count(model) == 0 and not injector.installed
    injector.remove()  # harmless twice
    input_only = EmbeddingInjector(model, "input").install()
    assert hook_count(model) == 1
    input_only.remove()
    assert hook_count(model) == 0


def test_single_token_forward_untouched(tiny_llm):
    """Cached decoding steps (sequence length 1) are never modified."""
    model, tok = tiny_llm
    ids = torch.tensor([[5], [7]])
    plain = logits(model, ids, None)
    injector = EmbeddingInjector(model, "layers")
    with injector.injecting(torch.zeros(2, 2, dtype=torch.long), vectors_for(model, 2)):
        assert torch.equal(logits(model, ids, None), plain)


def _greedy_uncached(model, ids, mask, steps):
    for _ in range(steps):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        ids = torch.cat([ids, out[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def test_cached_generation_matches_uncached_with_prefill_injection(any_tiny_llm):
    model, tok = any_tiny_llm
    ids, mask, pos = encode(tok, PROMPTS[:1])
    vec = vectors_for(model, 1, scale=2.0)
    steps = 12
    injector = EmbeddingInjector(model, "layers")
    with injector.injecting(pos, vec):
        cached = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=True
        )
        uncached = _greedy_uncached(model, ids, mask, steps)  # every forward re-injects at the same positions
    assert hook_count(model) == 0
    n = cached.shape[1]
    assert n > ids.shape[1] + 1
    assert torch.equal(cached, uncached[:, :n])
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert not torch.equal(plain, cached)  # the injection matters, so the comparison above is not vacuous


def test_left_padded_generation_positions(any_tiny_llm, fresh_tiny_tokenizer):
    """Each row of a left-padded batch generates what it generates alone, with its own vectors."""
    model, _ = any_tiny_llm
    tok = fresh_tiny_tokenizer
    ids, mask, pos = encode(tok, PROMPTS, side="left")
    assert mask[0, 0] == 0 and mask[1, 0] == 1  # row 0 is padded on the left
    vec = vectors_for(model, 2, scale=2.0)
    injector = EmbeddingInjector(model, "layers")
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": tok.pad_token_id}
    with injector.injecting(pos, vec):
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    for row in range(2):
        alone_ids, alone_mask, alone_pos = encode(tok, PROMPTS[row : row + 1])
        with injector.injecting(alone_pos, vec[row : row + 1]):
            alone = model.generate(input_ids=alone_ids, attention_mask=alone_mask, **kwargs)
        assert torch.equal(batched[row, -8:], alone[0, -8:]), row


def test_expanded_batch_reuses_row_context(tiny_llm):
    """generate() with beams / num_return_sequences repeats each row; the context follows."""
    model, tok = tiny_llm
    ids, mask, pos = encode(tok, PROMPTS)
    vec = vectors_for(model, 2)
    injector = EmbeddingInjector(model, "layers")
    with injector.injecting(pos, vec):
        single = logits(model, ids, mask)
        expanded = logits(model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0))
        with pytest.raises(ValueError, match="batch size 2"):
            logits(model, ids[:1].repeat(3, 1), mask[:1].repeat(3, 1))
    torch.testing.assert_close(expanded, single.repeat_interleave(3, 0))


def _loss_and_grads(model, tok, injector, adapter, use_checkpoint: bool):
    ids, mask, pos = encode(tok, PROMPTS)
    graph = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(3))  # (B, 2, graph_dim)
    adapter.zero_grad(set_to_none=True)
    injector.set_context(pos, adapter(graph))  # (B, 2, H)

    def run(input_ids):
        return model(input_ids=input_ids, attention_mask=mask).logits

    out = checkpoint(run, ids, use_reentrant=False) if use_checkpoint else run(ids)
    loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()  # hooks and context stay in place through backward (recompute needs them)
    injector.clear()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["layers", "input"])
def test_gradients_reach_only_the_adapter_also_under_checkpointing(any_tiny_llm, mode):
    model, tok = any_tiny_llm
    torch.manual_seed(0)
    adapter = MoEAdapter(8, model.config.hidden_size, dropout=0.0, noisy_gating=False)
    injector = EmbeddingInjector(model, mode).install()
    try:
        loss, grads = _loss_and_grads(model, tok, injector, adapter, use_checkpoint=False)
        loss_ckpt, grads_ckpt = _loss_and_grads(model, tok, injector, adapter, use_checkpoint=True)
    finally:
        injector.remove()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert set(grads) == {"expert_weight", "expert_bias", "w_gate"}  # w_noise is unused without noisy gating
    assert torch.count_nonzero(grads["expert_weight"]) > 0
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)


def test_vectors_cast_to_llm_dtype(tiny_llm):
    model, tok = tiny_llm
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids, mask, pos = encode(tok, PROMPTS)
    vec = vectors_for(model, 2).requires_grad_(True)  # fp32, like an adapter output
    injector = EmbeddingInjector(bf16, "layers")
    with injector.injecting(pos, vec):
        assert injector._vectors.dtype == torch.bfloat16
        out = bf16(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert vec.grad is not None and vec.grad.dtype == torch.float32


def test_negative_position_skips_slot(tiny_llm):
    model, tok = tiny_llm
    ids, mask, pos = encode(tok, PROMPTS)
    vec = vectors_for(model, 2)
    injector = EmbeddingInjector(model, "input")
    skip_item = pos.clone()
    skip_item[:, 1] = -1
    with injector.injecting(skip_item, vec):
        partial = logits(model, ids, mask)
    only_user = torch.cat([vec[:, :1], model.get_input_embeddings()(ids.gather(1, pos[:, 1:]))], dim=1)
    with injector.injecting(pos, only_user):
        full = logits(model, ids, mask)
    torch.testing.assert_close(partial, full)


def test_bad_context_and_position_errors(tiny_llm):
    model, tok = tiny_llm
    injector = EmbeddingInjector(model, "layers")
    with pytest.raises(ValueError, match="positions"):
        injector.set_context(torch.zeros(2, dtype=torch.long), torch.zeros(2, 2, 32))
    with pytest.raises(ValueError, match="hidden size is 32"):
        injector.set_context(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, 16))
    with pytest.raises(ValueError, match="integer"):
        injector.set_context(torch.zeros(2, 2), torch.zeros(2, 2, 32))
    with pytest.raises(ValueError, match="unknown injection mode"):
        EmbeddingInjector(model, "attention")
    ids = torch.tensor([[5, 6, 7]])
    with injector.injecting(torch.tensor([[1, 3]]), torch.zeros(1, 2, 32)), pytest.raises(IndexError, match="3"):
        logits(model, ids, None)
    assert hook_count(model) == 0


def test_unsupported_model_type_has_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*mode 'input'"):
        EmbeddingInjector(gpt2, "layers")
    # input-only injection needs only the embedding table, which every model has
    injector = EmbeddingInjector(gpt2, "input").install()
    injector.remove()
