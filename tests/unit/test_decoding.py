"""greedy_generate (finished rows leave the batch) gives exactly what llm.generate gives."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from tests.unit.test_explainer import emb_path as emb_path  # the fixture
from tests.unit.test_explainer import make, train_batch
from tests.unit.test_injection import PROMPTS, encode, vectors_for
from xrec_pl.models.decoding import greedy_generate
from xrec_pl.models.injection import EmbeddingInjector


def _hf(model, ids, mask, steps, stops, pad, suppress=()):
    config = GenerationConfig(
        max_new_tokens=steps,
        do_sample=False,
        num_beams=1,
        eos_token_id=stops,
        pad_token_id=pad,
        suppress_tokens=list(suppress) or None,
    )
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]


def test_equals_generate_when_rows_stop_at_different_steps(any_tiny_llm, fresh_tiny_tokenizer):
    model, _ = any_tiny_llm
    tok = fresh_tiny_tokenizer
    ids, mask, pos = encode(tok, PROMPTS, side="left")
    pad = tok.pad_token_id
    injector = EmbeddingInjector(model, "layers")
    with injector.injecting(pos, vectors_for(model, ids.shape[0], scale=2.0)):
        free = _hf(model, ids, mask, 12, [pad], pad)  # no stop in practice: see what each row writes
        # a stop token one row emits before the last step and the other never: rows leave at different steps
        stop = next(int(t) for r in (0, 1) for t in free[r, :-2] if int(t) not in free[1 - r].tolist())
        expected = _hf(model, ids, mask, 12, [stop], pad)
        got = greedy_generate(model, mask, input_ids=ids, max_new_tokens=12, stop_ids=[stop], pad_id=pad)
        assert torch.equal(got, expected), (got, expected)
        padded = (got == pad).any(1)
        assert padded.any() and not padded.all()  # one row stopped early and was padded, the other went on
        suppress = [int(free[1, 0]), int(free[0, 0])]
        expected = _hf(model, ids, mask, 12, [stop], pad, suppress)
        got = greedy_generate(
            model, mask, input_ids=ids, max_new_tokens=12, stop_ids=[stop], pad_id=pad, suppress_ids=suppress
        )
    assert torch.equal(got, expected), (got, expected)
    assert not torch.isin(got, torch.tensor(suppress)).any()


def test_all_rows_stop_and_argument_errors(tiny_llm):
    model, tok = tiny_llm
    ids, mask, _ = encode(tok, PROMPTS[:1], side="left")
    first = int(_hf(model, ids, mask, 1, [tok.pad_token_id], tok.pad_token_id)[0, 0])
    got = greedy_generate(model, mask, input_ids=ids, max_new_tokens=9, stop_ids=[first], pad_id=tok.pad_token_id)
    assert got.tolist() == [[first]]  # stopped after one token: no padding columns
    with pytest.raises(ValueError, match="exactly one"):
        greedy_generate(model, mask, max_new_tokens=3, stop_ids=[0], pad_id=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, mask, input_ids=ids, max_new_tokens=0, stop_ids=[0], pad_id=0)


def test_explainer_compact_and_hf_decoders_agree(synthetic_dir, emb_path):
    module = make(emb_path, max_new_tokens=10).eval()
    with torch.no_grad():  # sharpen the adapters so the injection decides the text
        module.user_adapter.expert_weight.mul_(50.0)
        module.item_adapter.expert_weight.mul_(50.0)
    dm, _ = train_batch(module, synthetic_dir)
    batch = next(iter(dm.generation_dataloader("val", indices=list(range(5)), batch_size=5)))
    compact = module.generate_explanations(batch)
    module.hparams.decoder = "hf"
    assert module.generate_explanations(batch) == compact
    assert len(set(compact)) > 1
    with pytest.raises(ValueError, match="decoder"):
        make(emb_path, decoder="beam")
