"""load_frozen_llm and friends on the tiny random Llamas (no network, no embedded GGUF)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from xrec_pl.models import llm_loading
from xrec_pl.models.llm import (
    PAD_TOKEN,
    RESERVED_TOKENS,
    LLMInfo,
    LLMLoadError,
    add_reserved_tokens,
    get_llm_info,
    load_frozen_llm,
    reserved_token_ids,
    resolve_dtype,
)
from xrec_pl.models.tiny import build_tiny_llm, build_tiny_tokenizer


@pytest.mark.parametrize(("fixture", "kv_heads"), [("tiny_llm", 4), ("tiny_llm_gqa", 2)])
def test_tiny_models_are_frozen_llamas(request, fixture, kv_heads):
    model, tok = request.getfixturevalue(fixture)
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == ("llama", 32, 2, 4)
    assert cfg.num_key_value_heads == kv_heads
    assert model.model.layers[0].self_attn.k_proj.out_features == 8 * kv_heads
    assert not model.training and all(not m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert cfg._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    info = get_llm_info(model)
    assert info.num_kv_heads == kv_heads and info.hidden_size == 32 and info.num_layers == 2
    assert info.vocab_size == len(tok) and info.dtype == "float32"
    assert set(info.added_tokens) == {PAD_TOKEN, *RESERVED_TOKENS}
    assert info.reserved_token_ids == info.added_tokens
    assert not any(name.startswith("xrec") for name in vars(model))  # the identity stays on our side


def test_llm_info_follows_the_model_object():
    import gc
    import weakref

    model, _ = load_frozen_llm("tiny-random")
    other, _ = load_frozen_llm("tiny-random-gqa")
    assert get_llm_info(model).num_kv_heads == 4 and get_llm_info(other).num_kv_heads == 2
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the kept identity does not keep the model alive


def test_reserved_and_pad_tokens(tiny_tokenizer, tiny_llm):
    tok = tiny_tokenizer
    user_id, item_id = reserved_token_ids(tok)
    assert {user_id, item_id} <= set(tok.all_special_ids)
    ids = tok("user record: <USER_EMBED> book record: <ITEM_EMBED>")["input_ids"]
    assert ids.count(user_id) == 1 and ids.count(item_id) == 1  # never split
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert tok.padding_side == "right"
    model = tiny_llm[0]
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id
    # new rows start at the mean of the old ones (deterministic), input and (tied) output table alike
    weight = model.get_input_embeddings().weight
    old = weight.shape[0] - 3
    for row in range(old, weight.shape[0]):
        torch.testing.assert_close(weight[row], weight[:old].mean(0))
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()


def test_add_reserved_tokens_is_idempotent_and_keeps_existing_pad():
    model, tok = build_tiny_llm()
    tok.pad_token = "<|endoftext|>"  # an existing pad distinct from EOS is kept
    added = add_reserved_tokens(model, tok)
    assert list(added) == list(RESERVED_TOKENS) and tok.pad_token == "<|endoftext|>"
    assert add_reserved_tokens(model, tok) == {}
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_tiny_tokenizer_byte_level_chat_and_fast():
    start = time.perf_counter()
    tok = build_tiny_tokenizer()
    assert time.perf_counter() - start < 1.0
    assert tok.is_fast
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and tok.pad_token is None
    for text in ["Explain why the user would buy the book.", "naïve café — 日本語 🙂", "  spaces\n\ttabs"]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert len(tok("Explain why the user would buy the book within 50 words.")["input_ids"]) < 20
    assert tok.get_vocab() == build_tiny_tokenizer().get_vocab()  # deterministic
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(
        [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], tokenize=False
    )
    assert full.startswith("<|im_start|>system\n") and full.endswith("<|im_start|>assistant\nA<|im_end|>\n")


def test_tiny_model_deterministic_and_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, _ = load_frozen_llm("tiny-random")
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = load_frozen_llm("tiny-random")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_explicit_dtype():
    model, _ = load_frozen_llm("tiny-random", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and get_llm_info(model).dtype == "bfloat16"


def test_resolve_dtype():
    assert resolve_dtype("auto") == (torch.float32 if not torch.cuda.is_available() else resolve_dtype("auto"))
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    assert resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(LLMLoadError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule of 'fastest'")
def test_fastest_dtype_follows_the_cpu_bf16_instructions(monkeypatch):
    """``fastest``: bf16 on a CPU with bf16 instructions, fp32 without them or when unknown (emulated bf16 matrix
    products ran ~4x slower than fp32 on such a CPU)."""
    import xrec_pl.models.llm as llm_mod

    for native, expected in ((True, torch.bfloat16), (False, torch.float32), (None, torch.float32)):
        monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_dtype("fastest") == expected and resolve_dtype("FASTEST") == expected
    assert resolve_dtype("auto") == torch.float32  # auto keeps its meaning on every CPU


def test_shipped_cpu_stage2_configs_pick_the_fastest_dtype():
    """The embedded-LLM stage-2 configs ask for ``fastest``, so a CPU without bf16 instructions runs fp32."""
    import yaml

    root = Path(__file__).resolve().parents[2] / "configs" / "stage2"
    for name in ("synthetic", "amazon", "yelp", "google"):
        config = yaml.safe_load((root / f"{name}.yaml").read_text())
        assert config["model"]["init_args"]["llm_dtype"] == "fastest", name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantization_without_cuda_is_a_clear_error(quantization):
    with pytest.raises(LLMLoadError, match=rf"quantization='{quantization}' needs (CUDA|the bitsandbytes)"):
        load_frozen_llm("some/model", quantization=quantization)
    with pytest.raises(LLMLoadError, match="unknown quantization"):
        load_frozen_llm("some/model", quantization="3bit")


def test_unknown_name_says_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(LLMLoadError) as err:
        load_frozen_llm("no-such-org/no-such-model")
    msg = str(err.value)
    assert "'no-such-org/no-such-model'" in msg and "built-in names" in msg and "HF_HUB_OFFLINE" in msg
    missing_dir = tmp_path / "missing"
    with pytest.raises(LLMLoadError, match="not found"):
        load_frozen_llm(str(missing_dir))


def test_unreadable_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(LLMLoadError, match=r"could not load GGUF file 'broken.gguf'.*transformers \d"):
        load_frozen_llm(str(bad))
    with pytest.raises(LLMLoadError, match="does not exist"):
        load_frozen_llm(str(tmp_path / "missing.gguf"))


def test_local_directory_roundtrip(tmp_path, tiny_llm):
    """A saved model folder loads through the generic from_pretrained path, reserved tokens kept as they were."""
    model, tok = tiny_llm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_frozen_llm(str(tmp_path))
    assert len(loaded_tok) == len(tok) and reserved_token_ids(loaded_tok) == reserved_token_ids(tok)
    assert loaded_tok.pad_token == PAD_TOKEN
    info = get_llm_info(loaded)
    assert info.added_tokens == {} and info.source == str(tmp_path)
    get_llm_info(model).check_matches(info.to_dict())  # same architecture and vocabulary
    ids = tok("user record: <USER_EMBED>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_llm_info_check_matches(tiny_llm, tiny_llm_gqa):
    mha, gqa = get_llm_info(tiny_llm[0]), get_llm_info(tiny_llm_gqa[0])
    saved = mha.to_dict()
    mha.check_matches(saved)
    mha.check_matches({**saved, "dtype": "bfloat16", "name": "elsewhere", "source": "x"})
    with pytest.raises(LLMLoadError, match="num_kv_heads: checkpoint has 4, loaded LLM has 2"):
        gqa.check_matches(saved)
    with pytest.raises(LLMLoadError, match="reserved_token_ids"):
        mha.check_matches({**saved, "reserved_token_ids": {"<USER_EMBED>": 5}})
    mha.check_matches({**saved, "added_tokens": {}})  # who added the tokens does not matter
    assert isinstance(LLMInfo(**saved), LLMInfo)  # round-trips through a plain dict (hparams)


def test_get_llm_info_foreign_model():
    model, _ = build_tiny_llm()
    with pytest.raises(ValueError, match="load_frozen_llm"):
        get_llm_info(model)
    with pytest.raises(ValueError, match="reserved tokens"):
        reserved_token_ids(build_tiny_tokenizer())


def test_builtin_names_reject_gguf_and_quantization():
    with pytest.raises(LLMLoadError, match="takes no gguf_file"):
        load_frozen_llm("tiny-random", gguf_file="x.gguf")
    with pytest.raises(LLMLoadError, match="takes no gguf_file"):
        load_frozen_llm("embedded", gguf_file="x.gguf")


# ---------------------------------------------------------------- embedded-model cache, with the tiny model standing in


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """Make the 'embedded' path load the tiny model from a fake GGUF (counts the slow loads)."""
    gguf = tmp_path / "pkg" / "Fake.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"fake")
    slow_loads = []
    real = llm_loading._from_pretrained

    def fake_from_pretrained(path, torch_dtype, quant_kwargs, **kwargs):
        if kwargs.get("gguf_file"):
            slow_loads.append(path)
            model, tok = build_tiny_llm()
            model.config.quantization_config = {"quant_method": "gguf"}  # as transformers leaves it
            return model, tok
        return real(path, torch_dtype, quant_kwargs, **kwargs)

    monkeypatch.setattr(llm_loading, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setattr(llm_loading, "_from_pretrained", fake_from_pretrained)
    monkeypatch.setenv("XREC_PL_CACHE", str(tmp_path / "cache"))
    return gguf, slow_loads


def test_embedded_cache_roundtrip(fake_embedded, tmp_path):
    gguf, slow_loads = fake_embedded
    cold, cold_tok = load_frozen_llm("embedded")
    assert len(slow_loads) == 1
    cache = llm_loading.embedded_cache_dir(gguf)
    assert cache.parent == tmp_path / "cache" / "gguf" and (cache / "xrec_pl_cache.json").is_file()
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    warm, warm_tok = load_frozen_llm("embedded")
    assert len(slow_loads) == 1 and "cached at" in get_llm_info(warm).source
    assert not hasattr(warm.config, "quantization_config")
    assert warm_tok.get_vocab() == cold_tok.get_vocab() and warm_tok.chat_template == cold_tok.chat_template
    get_llm_info(cold).check_matches(get_llm_info(warm).to_dict())
    for (name, p), q in zip(cold.state_dict().items(), warm.state_dict().values()):
        assert torch.equal(p, q), name
    # the same file installed elsewhere (another checkout's venv, another mtime) shares the cache: no second decode
    copy = tmp_path / "other-venv" / gguf.name
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    os.utime(copy, ns=(1, 1))
    assert llm_loading.embedded_cache_dir(copy) == cache
    # an unreadable file has no cache folder (the load reports it), not a traceback from the key
    assert llm_loading.embedded_cache_dir(tmp_path / "missing.gguf") is None
    # other content (same size) gets a new key
    gguf.write_bytes(bytes(b ^ 1 for b in gguf.read_bytes()))
    assert llm_loading.embedded_cache_dir(gguf) != cache


def test_embedded_first_load_equals_cached_load_in_bf16(fake_embedded):
    """The uncached load (decoded in fp32, then cast) gives the model the cached load gives: the rotary frequencies
    stay float32 in both (a plain ``model.to(bf16)`` rounded them, and a first run on a machine trained differently)."""
    gguf, slow_loads = fake_embedded
    cold, _ = load_frozen_llm("embedded", dtype="bfloat16")
    warm, _ = load_frozen_llm("embedded", dtype="bfloat16")
    assert len(slow_loads) == 1 and "cached at" in get_llm_info(warm).source
    cold_buffers, warm_buffers = dict(cold.named_buffers()), dict(warm.named_buffers())
    assert cold_buffers.keys() == warm_buffers.keys() and any("inv_freq" in k for k in cold_buffers)
    for name, buf in cold_buffers.items():
        assert buf.dtype == warm_buffers[name].dtype and torch.equal(buf, warm_buffers[name]), name
        if "inv_freq" in name:
            assert buf.dtype == torch.float32, name
    assert all(p.dtype == torch.bfloat16 for p in cold.parameters()) and cold.config.dtype == torch.bfloat16
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        assert torch.equal(cold(input_ids=ids).logits, warm(input_ids=ids).logits)


def test_cast_weights_keeps_non_weight_buffers():
    model, _ = build_tiny_llm()
    before = {k: v.clone() for k, v in model.named_buffers()}
    model = llm_loading.cast_weights(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for name, buf in model.named_buffers():
        assert buf.dtype == before[name].dtype and torch.equal(buf, before[name]), name
    # what the plain cast does (the bug): the frequencies are rounded
    rounded = build_tiny_llm()[0].to(torch.bfloat16)
    assert any(b.dtype == torch.bfloat16 for k, b in rounded.named_buffers() if "inv_freq" in k)


def test_embedded_cache_loads_safetensors_only(fake_embedded, caplog):
    """A pickle planted in the shared cache folder (in place of the safetensors we wrote) is never loaded."""
    gguf, slow_loads = fake_embedded
    model, _ = load_frozen_llm("embedded")
    cache = llm_loading.embedded_cache_dir(gguf)
    weights = cache / "model.safetensors"
    assert weights.is_file()
    torch.save(model.state_dict(), cache / "pytorch_model.bin")
    weights.unlink()
    with caplog.at_level(logging.WARNING, logger="xrec_pl.models.llm"):
        load_frozen_llm("embedded")
    assert len(slow_loads) == 2 and "ignoring unreadable LLM cache" in caplog.text  # decoded again, not unpickled
    assert (cache / "model.safetensors").is_file()  # and the folder rewritten as we write it


def test_embedded_cache_is_best_effort(fake_embedded, tmp_path, monkeypatch, caplog):
    gguf, slow_loads = fake_embedded
    load_frozen_llm("embedded")
    cache = llm_loading.embedded_cache_dir(gguf)
    (cache / "model.safetensors").write_bytes(b"corrupt")
    with caplog.at_level(logging.WARNING, logger="xrec_pl.models.llm"):
        model, _ = load_frozen_llm("embedded")
    assert len(slow_loads) == 2 and "ignoring unreadable LLM cache" in caplog.text
    # the broken folder was replaced: the next load is warm again
    load_frozen_llm("embedded")
    assert len(slow_loads) == 2
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # nothing left aside
    # an unwritable cache location only logs
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XREC_PL_CACHE", str(blocker))
    load_frozen_llm("embedded")
    assert len(slow_loads) == 3
    # disabled
    monkeypatch.setenv("XREC_PL_CACHE", "off")
    assert llm_loading.cache_root() is None and llm_loading.embedded_cache_dir(gguf) is None
    load_frozen_llm("embedded")
    assert len(slow_loads) == 4


def test_registered_llm_is_loaded_like_any_other_only_inside_its_block():
    from xrec_pl.models.llm import registered_llm
    from xrec_pl.models.tiny import build_tiny_llm

    def build():
        model, tokenizer = build_tiny_llm()
        return model, tokenizer, "a test builder"

    with registered_llm("my-test-llm", build):
        model, _ = load_frozen_llm("my-test-llm")
        info = get_llm_info(model)
        assert info.name == "my-test-llm" and info.source == "a test builder"
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
        with pytest.raises(ValueError, match="already known"), registered_llm("tiny-random", build):
            pass
    with pytest.raises(LLMLoadError):
        load_frozen_llm("my-test-llm")


def test_cpu_bf16_detection_reads_the_flags(tmp_path):
    from xrec_pl.models.llm import cpu_has_native_bf16

    with_bf16, without, odd = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    odd.write_text("Processor\t: ARMv8\nFeatures\t: fp asimd\n")  # no x86 flags line: unknown
    assert cpu_has_native_bf16(str(with_bf16)) is True
    assert cpu_has_native_bf16(str(without)) is False
    assert cpu_has_native_bf16(str(odd)) is None
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is None
