"""Every speed-up of the stage-2 path keeps the results of the straightforward path (tiny random Llama).

Covered: batching with right padding (and hence length bucketing), the padding mask dropped for right-padded
batches (SDPA causal kernel), SDPA vs eager attention, bf16 autocast
(``Trainer(precision="bf16-mixed")``) within a tolerance of fp32. The gathered-position loss and batched generation
are covered in ``test_explainer.py`` (``test_gathered_loss_equals_full_logits_loss``,
``test_generate_batched_equals_one_by_one``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from data_modules.batching import PadCollator
from data_modules.explanations import ExplanationDataModule
from xrec_pl.lit.explainer import ExplainerModule


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (see the ``one_thread`` fixture)."""


@pytest.fixture(scope="module")
def setup(synthetic_dir):
    torch.manual_seed(0)
    module = ExplainerModule(llm="tiny-random-gqa", embedding_source="random", num_users=60, num_items=50)
    module.eval()  # no adapter dropout / gate noise: deterministic
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4, tokenizer=module.tokenizer)
    dm.setup("fit")
    items = [{k: v for k, v in it.items() if k != "reference"} for it in dm._teacher_items("trn")[:6]]
    assert len({len(it["input_ids"]) for it in items}) > 1  # the batch really is padded
    return module, PadCollator(module.tokenizer.pad_token_id, side="right"), items


def _loss(module, batch, autocast: bool = False):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with module.injecting_batch(batch), ctx:
        return module.lm_loss(batch)


def _targets(item) -> int:
    return sum(1 for x in item["labels"][1:] if x != -100)


def test_padded_batch_equals_one_at_a_time(setup):
    """A right-padded batch gives the token-weighted mean of the batch-1 losses (so batching/bucketing is exact)."""
    module, collate, items = setup
    with torch.no_grad():
        batched = float(_loss(module, collate(items)))
        singles = [float(_loss(module, collate([it]))) for it in items]
    weights = [_targets(it) for it in items]
    expected = sum(s * w for s, w in zip(singles, weights)) / sum(weights)
    assert batched == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_sdpa_equals_eager_loss_and_gradients(setup):
    module, collate, items = setup
    batch = collate(items)
    results = {}
    for impl in ("eager", "sdpa"):
        module.llm.set_attn_implementation(impl)
        module.zero_grad(set_to_none=True)
        loss = _loss(module, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in module.adapter_parameters() if p.grad is not None])
        results[impl] = (loss.item(), grads)
    module.zero_grad(set_to_none=True)
    assert module.llm.config._attn_implementation == "sdpa"
    assert results["sdpa"][0] == pytest.approx(results["eager"][0], rel=1e-5)
    torch.testing.assert_close(results["sdpa"][1], results["eager"][1], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_loss_and_gradients_close_to_fp32(setup):
    module, collate, items = setup
    batch = collate(items)
    out = {}
    for bf16 in (False, True):
        module.zero_grad(set_to_none=True)
        loss = _loss(module, batch, autocast=bf16)
        assert loss.dtype == torch.float32  # the LM head output is upcast before the cross-entropy
        loss.backward()
        out[bf16] = (
            loss.item(),
            torch.cat([p.grad.flatten() for p in module.adapter_parameters() if p.grad is not None]),
        )
    module.zero_grad(set_to_none=True)
    assert out[True][0] == pytest.approx(out[False][0], rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(out[True][1], out[False][1], dim=0)
    assert cos > 0.95


def test_right_padding_drops_the_mask_exactly(setup):
    """Right-padded batches run without the padding mask (SDPA's causal kernel); real positions are unchanged."""
    from xrec_pl.models.lm_loss import causal_suffices

    module, collate, items = setup
    batch = collate(items)
    mask = batch["attention_mask"]
    assert causal_suffices(mask) is None
    left = mask.flip(1)
    assert causal_suffices(left) is left  # left padding keeps its mask
    decoder = module.llm.get_decoder()
    with torch.no_grad(), module.injecting_batch(batch):
        fast = module.lm_hidden_states(batch)  # (B, T, H), no mask passed
        masked = decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(fast[real], masked[real], rtol=1e-5, atol=1e-5)
