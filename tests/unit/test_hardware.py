"""The computed hardware table: exact parameter counts on meta tensors, the activation formula, consistency."""

from __future__ import annotations

import json

import pytest
import torch

from xrec_pl.cli import main
from xrec_pl.models.adapters import MoEAdapter, count_parameters
from xrec_pl.tools import hardware as hw

# published counts: Llama-2-7B 6,738,415,616; Llama-3-8B "8.03B" (model card); SmolLM2-135M "135M" (model card;
# its fp32 safetensors file in the embedded cache is 538,090,408 bytes = 4 x 134,515,008 + a 30 kB header)
PUBLISHED = {"llama2-7b": 6_738_415_616, "llama3-8b": 8_030_261_248, "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_are_the_published_ones(name):
    assert hw.model_sizes(name, added_tokens=0).params == PUBLISHED[name]
    with_tokens = hw.model_sizes(name)  # + <USER_EMBED>, <ITEM_EMBED>, <|pad|> rows (input and, untied, output)
    tied = hw.MODELS[name].config["tie_word_embeddings"]
    assert with_tokens.params - PUBLISHED[name] == 3 * with_tokens.hidden * (1 if tied else 2)


def test_published_rounded_sizes_agree():
    assert round(PUBLISHED["llama3-8b"] / 1e9, 2) == 8.03
    assert round(PUBLISHED["smollm2-135m"] / 1e6) == 135


def test_adapter_counts_match_the_adapter_module_and_the_readme():
    assert hw.adapter_params(4096) == 2 * count_parameters(MoEAdapter(64, 4096, num_experts=8)) == 4_197_376
    assert hw.adapter_params(576) == 592_896


def test_sizes_split_into_layers_and_root():
    s = hw.model_sizes("llama3-8b", added_tokens=0)
    assert s.kv_dim == 1024 and s.vocab == 128256
    assert s.params == s.layers * s.layer_params + s.root_params
    assert s.root_params == s.embed_params + s.head_params + s.hidden  # + the final norm
    assert s.largest_tensor == s.embed_params


def _saved_bytes(config_kwargs, batch, seq_len, checkpointing):
    """Bytes of the tensors autograd saves in a forward of an HF Llama (bf16, CPU), weights excluded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, attn_implementation="sdpa", **config_kwargs))
    model = model.to(torch.bfloat16).requires_grad_(False)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    embeds = model.get_input_embeddings()(torch.randint(0, 128, (batch, seq_len))).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(inputs_embeds=embeds, attention_mask=torch.ones(batch, seq_len, dtype=torch.long), use_cache=False)
    return sum(seen.values()), hw.sizes_of(model)


@pytest.mark.parametrize(
    "config",
    [
        {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 3, "num_attention_heads": 4},
        {
            "hidden_size": 128,
            "intermediate_size": 448,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
        },
    ],
)
def test_activation_formula_matches_the_saved_tensors(config):
    batch, seq_len = 2, 48
    tokens = batch * seq_len
    measured, sizes = _saved_bytes(config, batch, seq_len, checkpointing=False)
    formula = hw.activation_bytes(sizes, batch, seq_len, label_tokens=0, checkpointing=False)
    assert abs(measured - formula) / formula < 0.03  # the rotary cos/sin tables (4 x head_dim per position) aside
    kept, _ = _saved_bytes(config, batch, seq_len, checkpointing=True)
    # with checkpointing the forward keeps each layer's input; backward recomputes one layer at a time on top
    recompute = tokens * hw.layer_activation_bytes(sizes)
    assert abs(kept + recompute - hw.activation_bytes(sizes, batch, seq_len, 0, checkpointing=True)) < 0.03 * kept
    assert kept < measured / 2


def test_table_is_consistent():
    rows = hw.hardware_table(num_gpus=8, batch=16, seq_len=512)
    assert len(rows) == 3 * 3 * 2
    by = {(r["model"], r["precision"], r["checkpointing"]): r for r in rows}
    for name in ("llama2-7b", "llama3-8b"):
        for ckpt in (True, False):
            bf16, int8, nf4 = (by[(name, p, ckpt)] for p in hw.PRECISIONS)
            assert nf4["single"] < int8["single"] < bf16["single"]
            assert bf16["zero3"] < bf16["single"] and bf16["fsdp"] < bf16["single"]
            assert int8["fsdp"] is None and int8["zero3"] is None
            assert bf16["ddp"] >= bf16["single"]
        assert by[(name, "bf16", True)]["single"] < by[(name, "bf16", False)]["single"]
    assert by[("smollm2-135m", "8bit", True)]["single"] is None  # the embedded model is never quantized
    s = hw.model_sizes("llama2-7b")
    parts = hw.gpu_bytes(s, "bf16", "single")
    assert parts["total"] == parts["weights"] + parts["adapters"] + parts["activations"]
    assert parts["weights"] == 2 * s.params and parts["adapters"] == 16 * 4_197_376
    fsdp = [hw.gpu_bytes(s, "bf16", "fsdp", num_gpus=n)["weights"] for n in (2, 4, 8)]
    assert fsdp == sorted(fsdp, reverse=True)
    assert hw.weight_bytes(s, "8bit") < 0.55 * hw.weight_bytes(s, "bf16")


def test_host_ram_per_rank():
    for name in ("llama2-7b", "llama3-8b"):
        host = hw.host_ram_per_rank(hw.model_sizes(name))
        assert host["page_cache"] == 2 * PUBLISHED[name]  # the safetensors shards on disk (2 bytes per parameter)
        assert host["rank_peak"] < host["host_first"] / 3
    assert hw.host_ram_per_rank(hw.model_sizes("llama2-7b"))["rank_peak"] == 4 * 2 * 32003 * 4096


def test_cli_prints_the_table(capsys):
    assert main(["hardware", "--models", "[llama2-7b]", "--num_gpus", "4", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["model"] for r in out["rows"]} == {"llama2-7b"} and out["sizes"][0]["params"] == 6_738_440_192
    assert main(["hardware", "--models", "[llama2-7b]"]) == 0
    assert "| llama2-7b (6,738,440,192) | bf16 | on |" in capsys.readouterr().out
    assert main(["hardware", "--num_gpus", "0"]) == 2
    assert "--num_gpus" in capsys.readouterr().err
