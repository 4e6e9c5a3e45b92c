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
    torch.manual_seed(0)  # unseeded, about one draw of adapters in ten wrote five empty texts (EOS first): a flaky test
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


def test_penalty_scope_generated_leaves_the_prompt_alone(tiny_llm):
    """With "all" (generate's rule) the ban and the penalty count the prompt; with "generated" only the new tokens."""
    from xrec_pl.models.decoding import Sampling

    model, tok = tiny_llm
    ids, mask, _ = encode(tok, PROMPTS[:1], side="left")
    pad = tok.pad_token_id
    plain = greedy_generate(model, mask, input_ids=ids, max_new_tokens=8, stop_ids=[pad], pad_id=pad)
    # the prompt followed by the model's own greedy text: a tiny random model goes on with a token of that prompt
    ids = torch.cat([ids, plain], dim=1)
    mask = torch.ones_like(ids)
    free = greedy_generate(model, mask, input_ids=ids, max_new_tokens=6, stop_ids=[pad], pad_id=pad)
    assert int(free[0, 0]) in ids[0].tolist()  # the case the scopes differ on

    def run(scope: str, **kw) -> list[int]:
        sampling = Sampling(penalty_scope=scope, **kw)
        return greedy_generate(
            model, mask, input_ids=ids, max_new_tokens=6, stop_ids=[pad], pad_id=pad, sampling=sampling
        )[0].tolist()

    for kw in ({"no_repeat_ngram_size": 1}, {"repetition_penalty": 1e9}):
        everything, generated = run("all", **kw), run("generated", **kw)
        assert not set(everything) & set(ids[0].tolist()), kw  # nothing of the prompt may come back
        assert generated[0] == int(free[0, 0]), kw  # the first step has no history of its own
        assert len(set(generated)) == len(generated), kw  # but the new tokens still never repeat
    # "all" is generate's rule, token for token
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=[pad], pad_token_id=pad)
    config.no_repeat_ngram_size = 1
    want = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    assert run("all", no_repeat_ngram_size=1) == want[0].tolist()


def test_penalty_scope_settings_and_the_hf_decoder(emb_path):
    from xrec_pl.models.decoding import Sampling, check_hf_scope, greedy_config, resolve_sampling

    assert Sampling().penalty_scope == "generated"
    assert resolve_sampling("model", GenerationConfig(do_sample=True)).penalty_scope == "all"  # generate's rule
    assert resolve_sampling("model", None, {"penalty_scope": "generated"}).penalty_scope == "generated"
    with pytest.raises(ValueError, match="penalty_scope"):
        Sampling(penalty_scope="prompt")
    # the scope travels through the GenerationConfig the modules build; a foreign config means generate's rule
    model_tok = make(emb_path, max_new_tokens=4)
    config = greedy_config(
        model_tok.tokenizer, model_tok.llm, 4, [], Sampling(no_repeat_ngram_size=3, penalty_scope="generated")
    )
    assert Sampling.from_generation_config(config).penalty_scope == "generated"
    assert Sampling.from_generation_config(GenerationConfig(no_repeat_ngram_size=3)).penalty_scope == "all"
    # generate cannot leave the prompt out: refused, only when a penalty or a ban is on
    check_hf_scope(Sampling(penalty_scope="generated"))
    check_hf_scope(Sampling(no_repeat_ngram_size=3, penalty_scope="all"))
    with pytest.raises(ValueError, match="penalty_scope='all'"):
        check_hf_scope(Sampling(no_repeat_ngram_size=3))
    with pytest.raises(ValueError, match="penalty_scope='all'"):
        make(emb_path, decoder="hf", no_repeat_ngram_size=3)
    assert make(emb_path, decoder="hf", no_repeat_ngram_size=3, penalty_scope="all").sampling.penalty_scope == "all"
    assert make(emb_path, no_repeat_ngram_size=3).sampling.penalty_scope == "generated"


def test_decoding_keeps_padded_attention_off_cudnn(tiny_llm, monkeypatch):
    """On CUDA, SDPA's cuDNN backend builds an execution plan for every new shape (a 7B-shape decoding step of 8 rows
    took 118 ms instead of 49 on an H200): both decoders run every forward without it there; on other devices nothing changes."""
    from xrec_pl.models import decoding, explainer

    flags = torch.backends.cuda
    assert flags.cudnn_sdp_enabled()
    with decoding.padded_attention_kernels(torch.device("cuda")):
        assert not flags.cudnn_sdp_enabled()
        assert flags.flash_sdp_enabled() and flags.mem_efficient_sdp_enabled() and flags.math_sdp_enabled()
    assert flags.cudnn_sdp_enabled()  # put back on leaving
    with decoding.padded_attention_kernels(torch.device("cpu")):
        assert flags.cudnn_sdp_enabled()

    seen: list[str] = []
    real = decoding.padded_attention_kernels

    def spy(device: torch.device):
        seen.append(device.type)
        return real(device)

    monkeypatch.setattr(decoding, "padded_attention_kernels", spy)
    monkeypatch.setattr(explainer, "padded_attention_kernels", spy)
    model, tok = tiny_llm
    ids, mask, _ = encode(tok, PROMPTS[:1], side="left")
    pad = tok.pad_token_id
    compact = greedy_generate(model, mask, input_ids=ids, max_new_tokens=3, stop_ids=[pad], pad_id=pad)
    assert seen == ["cpu"] * compact.shape[1]  # every forward of the compact loop (prefill + steps), prompt's device
    config = GenerationConfig(max_new_tokens=3, do_sample=False, num_beams=1, eos_token_id=[pad], pad_token_id=pad)
    hf = explainer.decode(model, ids, mask, config, "hf")
    assert seen == ["cpu"] * (compact.shape[1] + 1)  # generate() as a whole, once
    assert torch.equal(compact, hf[:, : compact.shape[1]])


def test_cpu_decoding_layout_stores_frozen_fp32_weights_column_major_and_puts_them_back(tiny_llm):
    """Decoding on a CPU multiplies a few rows by each weight: the frozen fp32 ``nn.Linear`` weights are stored
    transposed inside the block (same shape, values and ``Parameter`` objects) and row-major again afterwards, also
    after an error; CUDA devices, trainable or non-fp32 weights and the switch set off change nothing."""
    from xrec_pl.models.decoding import cpu_decoding_layout, decoding_layout_switch

    model, tok = tiny_llm
    cpu = torch.device("cpu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    params = [m.weight for m in linears]
    unique = {id(p): p for p in params}
    values = {k: p.detach().clone() for k, p in unique.items()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight

    def row_major() -> bool:
        return all(p.is_contiguous() for p in unique.values())

    with cpu_decoding_layout(model, cpu) as relaid:
        assert relaid == len(unique) > 0
        assert all(p.stride() == (1, p.shape[0]) for p in unique.values())  # column-major storage
        assert all(torch.equal(p, values[k]) for k, p in unique.items())
        with cpu_decoding_layout(model, cpu) as again:
            assert again == 0  # nested: nothing left to re-lay, nothing restored early
        assert not any(p.is_contiguous() for p in unique.values())
    assert row_major() and all(torch.equal(p, values[k]) for k, p in unique.items())
    assert [m.weight for m in linears] == params  # the same Parameter objects
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied

    with pytest.raises(RuntimeError, match="boom"), cpu_decoding_layout(model, cpu):
        raise RuntimeError("boom")
    assert row_major()
    with cpu_decoding_layout(model, torch.device("cuda")) as relaid:
        assert relaid == 0 and row_major()
    with decoding_layout_switch(False), cpu_decoding_layout(model, cpu) as relaid:
        assert relaid == 0 and row_major()
    params[0].requires_grad_(True)
    try:
        with cpu_decoding_layout(model, cpu) as relaid:
            assert relaid == len(unique) - 1 and params[0].is_contiguous()
    finally:
        params[0].requires_grad_(False)
    half = torch.nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False)
    with cpu_decoding_layout(half, cpu) as relaid:
        assert relaid == 0


def test_both_decoders_run_under_the_cpu_layout_and_write_the_same_tokens(tiny_llm):
    """Every forward of the compact loop and of ``generate`` (the ``hf`` decoder) sees the column-major weights; the
    tokens equal those decoded with the layout switched off (fp32)."""
    from xrec_pl.models import explainer
    from xrec_pl.models.decoding import decoding_layout_switch

    model, tok = tiny_llm
    ids, mask, _ = encode(tok, PROMPTS, side="left")
    pad = tok.pad_token_id
    probe = model.get_output_embeddings()
    seen: list[bool] = []
    handle = probe.register_forward_pre_hook(lambda m, args: seen.append(m.weight.is_contiguous()))
    config = GenerationConfig(max_new_tokens=6, do_sample=False, num_beams=1, eos_token_id=[pad], pad_token_id=pad)
    try:
        compact = greedy_generate(model, mask, input_ids=ids, max_new_tokens=6, stop_ids=[pad], pad_id=pad)
        hf = explainer.decode(model, ids, mask, config, "hf")
        assert seen and not any(seen)  # LM head column-major in every forward of both decoders
        seen.clear()
        with decoding_layout_switch(False):
            plain = greedy_generate(model, mask, input_ids=ids, max_new_tokens=6, stop_ids=[pad], pad_id=pad)
            plain_hf = explainer.decode(model, ids, mask, config, "hf")
        assert seen and all(seen)
    finally:
        handle.remove()
    assert probe.weight.is_contiguous()
    assert torch.equal(compact, plain) and torch.equal(hf, plain_hf)
    assert torch.equal(compact, hf[:, : compact.shape[1]])
