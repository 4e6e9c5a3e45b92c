"""Every speed-up of the stage-2 path keeps the results of the straightforward path (tiny random Llama).

Covered: batching with right padding (and hence length bucketing), the padding mask dropped for right-padded
batches (SDPA causal kernel), SDPA vs eager attention (eager on a CPU for teacher forcing), bf16 autocast
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
    """The CPU's teacher forcing runs eager attention (faster with bf16 weights); SDPA gives the same loss/gradients."""
    from xrec_pl.models.lm_loss import cpu_eager_teacher_forcing

    module, collate, items = setup
    batch = collate(items)
    results = {}
    for impl in ("eager", "sdpa"):
        with cpu_eager_teacher_forcing(impl == "eager"):  # off: the loaded kernel (SDPA), as on a GPU
            assert (module.net.frozen_prefix_length(batch) > 0) == (impl == "eager")
            module.zero_grad(set_to_none=True)
            loss = _loss(module, batch)
            loss.backward()
        grads = torch.cat([p.grad.flatten() for p in module.adapter_parameters() if p.grad is not None])
        results[impl] = (loss.item(), grads)
    module.zero_grad(set_to_none=True)
    assert module.llm.config._attn_implementation == "sdpa"
    assert results["sdpa"][0] == pytest.approx(results["eager"][0], rel=1e-5)
    torch.testing.assert_close(results["sdpa"][1], results["eager"][1], rtol=1e-4, atol=1e-6)


def _kernels_seen(module, batch) -> list[str]:
    """The attention kernel each decoder layer ran with during one teacher-forced forward+backward."""
    seen: list[str] = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(lambda *_: seen.append(module.llm.config._attn_implementation))
        for layer in module.llm.get_decoder().layers
    ]
    try:
        with module.injecting_batch(batch):  # backward inside: checkpointing re-runs the injected forward there
            module.lm_loss(batch).backward()
    finally:
        for h in hooks:
            h.remove()
        module.zero_grad(set_to_none=True)
    return seen


def test_cpu_teacher_forcing_switches_to_eager_and_back(setup):
    module, collate, items = setup
    batch = collate(items)
    seen = _kernels_seen(module, batch)
    assert seen and set(seen) == {"eager"}
    assert module.llm.config._attn_implementation == "sdpa"  # generation keeps the loaded kernel


def test_no_switch_under_activation_checkpointing(setup):
    """Checkpointed layers re-run their forward in backward, outside the switch: the loaded kernel throughout."""
    from xrec_pl.models.llm import set_layer_checkpointing

    module, collate, items = setup
    batch = collate(items)
    module.llm.activation_checkpointing_enable({"use_reentrant": False})
    set_layer_checkpointing(module.llm, True)
    try:
        seen = _kernels_seen(module, batch)
    finally:
        set_layer_checkpointing(module.llm, False)
    assert len(seen) == 2 * len(module.llm.get_decoder().layers)  # forward + recomputation in backward
    assert set(seen) == {"sdpa"}


def test_attention_switch_is_put_back_after_an_error(setup):
    from xrec_pl.models.lm_loss import attention_implementation

    module, _, _ = setup
    with pytest.raises(RuntimeError, match="inside"), attention_implementation(module.llm, "eager"):
        assert module.llm.config._attn_implementation == "eager"
        raise RuntimeError("inside")
    assert module.llm.config._attn_implementation == "sdpa"
    with attention_implementation(module.llm, None):  # None: unchanged
        assert module.llm.config._attn_implementation == "sdpa"


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


def _full_forward(module, batch):
    """Hidden states, loss and adapter gradients of the whole batch in one forward (no shared-prefix split)."""
    from xrec_pl.models.lm_loss import decoder_hidden_states, token_nll

    module.zero_grad(set_to_none=True)
    with module.injecting_batch(batch):
        hidden = decoder_hidden_states(module.llm, batch["input_ids"], batch["attention_mask"])
        loss = token_nll(module.llm, hidden, batch["labels"])[0].mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.adapter_parameters() if p.grad is not None])
    module.zero_grad(set_to_none=True)
    return hidden.detach(), loss.item(), grads


def test_shared_prompt_prefix_runs_once_with_the_same_results(setup):
    """The tokens before the first reserved token run once per batch: same states, loss and gradients."""
    module, collate, items = setup
    batch = collate(items)
    net = module.net
    prefix = net.frozen_prefix_length(batch)
    first_reserved = int(torch.cat([batch["user_pos"], batch["item_pos"]]).min())
    assert 0 < prefix <= first_reserved
    assert bool((batch["input_ids"][:, :prefix] == batch["input_ids"][:1, :prefix]).all())
    with torch.no_grad():  # make the injection matter
        for p in module.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    rows_seen: list[tuple[int, int]] = []
    hook = module.llm.get_input_embeddings().register_forward_hook(
        lambda m, args, out: rows_seen.append(tuple(out.shape[:2]))
    )
    try:
        module.zero_grad(set_to_none=True)
        with module.injecting_batch(batch):
            hidden = net.hidden_states(batch)
            from xrec_pl.models.lm_loss import token_nll

            loss = token_nll(module.llm, hidden, batch["labels"])[0].mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in module.adapter_parameters() if p.grad is not None])
        module.zero_grad(set_to_none=True)
    finally:
        hook.remove()
    rows, width = batch["input_ids"].shape
    assert rows_seen == [(1, prefix), (rows, width - prefix)]  # the prefix once, then only the rows' own tokens
    full_hidden, full_loss, full_grads = _full_forward(module, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden.detach()[real], full_hidden[real], rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(full_loss, rel=1e-5)
    torch.testing.assert_close(grads, full_grads, rtol=1e-4, atol=1e-6)
    assert grads.abs().sum() > 0


def test_shared_prefix_is_not_split_where_it_does_not_pay(setup):
    from xrec_pl.models.lm_loss import cpu_eager_teacher_forcing

    module, collate, items = setup
    net = module.net
    batch = collate(items)
    left = PadCollator(module.tokenizer.pad_token_id, side="left")(items)
    assert net.frozen_prefix_length(left) == 0  # left padding: rows do not start together
    with torch.no_grad():
        assert net.frozen_prefix_length(batch) == 0  # evaluation: one plain forward
    assert net.frozen_prefix_length(batch) > 0
    with cpu_eager_teacher_forcing(False):
        assert net.frozen_prefix_length(batch) == 0  # a GPU, or activation checkpointing: SDPA, no split
    assert net.frozen_prefix_length(batch) > 0


def test_injection_refuses_a_reserved_token_inside_the_cached_prefix(setup):
    module, collate, items = setup
    batch = collate(items)
    net = module.net
    first_reserved = int(torch.cat([batch["user_pos"], batch["item_pos"]]).min())
    shifted = net.injector.starting_at(first_reserved + 1)
    with torch.no_grad(), module.injecting_batch(batch), shifted, pytest.raises(IndexError, match="cached prefix"):
        module.llm.get_decoder()(input_ids=batch["input_ids"][:, first_reserved + 1 :], use_cache=False)
    with torch.no_grad(), module.injecting_batch(batch), net.injector.paused():
        paused = module.llm.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(paused, module.llm.get_input_embeddings().weight[batch["input_ids"]])
