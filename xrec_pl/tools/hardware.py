"""GPU memory and host RAM of stage 2 on real LLMs, computed from exact parameter counts (``xrec-pl hardware``).

Nothing is downloaded: the models are built on the ``meta`` device (no storage) from the values of their published
``config.json``, typed in below, and their parameters are counted; the MoE adapters are built from
:mod:`xrec_pl.models.adapters` the same way. The memory model is a computation, not a measurement on a GPU:

- **frozen weights**: bf16 2 bytes per parameter. ``8bit`` (bitsandbytes LLM.int8): the decoder's linear layers 1 byte
  per weight plus one fp32 scale per output row; embeddings, norms and the LM head stay bf16 (transformers does not
  quantize the output embedding). ``4bit`` (NF4, no double quantization, as ``quantization_kwargs`` builds it):
  0.5 byte per weight plus one fp32 absmax per block of 64; the rest bf16.
- **adapters**: two MoE adapters (user, item), fp32 weight + fp32 gradient + two fp32 AdamW moments = 16 bytes per
  parameter (an upper bound: the ``bf16-true`` FSDP/DeepSpeed configs hold them in bf16); DDP adds a 4-byte gradient
  bucket per parameter; ZeRO-3 divides the 16 bytes by the number of GPUs.
- **activations**: the graph injection reaches every layer (q/k/v) and the input, so backward runs through the whole
  frozen LLM and its activations are kept although no LLM weight gets a gradient. Bytes per token (bf16, SDPA with a
  kernel that stores no attention matrix: flash / memory-efficient on CUDA, flash on CPU) per decoder layer
  ``A = 12 h + 4 kv + 6 i + 4 heads + 8`` (h hidden size, kv = kv_heads x head_dim, i MLP width), plus
  ``4 h + 4`` for the final norm. Without gradient checkpointing ``tokens x (L A + 4 h + 4)``; with it
  ``tokens x (2 h L + A + 4 h + 4)`` (each layer keeps its bf16 input; one layer is recomputed at a time). Tokens =
  batch x sequence length. The LM head runs at the labelled tokens only: ``10 V`` bytes each (bf16 logits, their
  fp32 copy and log-softmax). The per-layer constants were fitted to the saved tensors of HF Llama layers
  (``torch.autograd.graph.saved_tensors_hooks``); ``tests/unit/test_hardware.py`` checks the formula against that
  measurement on CPU. Backward's transient gradient buffers, the CUDA context (~0.5-1 GB per process) and allocator
  fragmentation are not counted.
- **strategies** (N GPUs): single GPU and DDP hold everything per GPU. FSDP ``FULL_SHARD`` (``configs/trainer/
  fsdp.yaml``, decoder layers wrapped): ``(W - W_root) / N`` plus ``W_root`` (embeddings, final norm, LM head: the
  root unit stays gathered during the step) plus two gathered layers (the running one and the prefetched one).
  DeepSpeed ZeRO-3: ``W / N`` plus two gathered layers plus the larger of embedding and LM head. Quantized weights
  with FSDP / ZeRO-3 are not supported (bitsandbytes parameters do not shard there): ``None``.
- **loading**: on CUDA the LLM loads straight onto its rank's GPU in its dtype (``xrec_pl.models.llm_loading``), so
  every strategy briefly holds the full bf16 (or quantized) weights on each GPU before FSDP / ZeRO-3 shard them.
  Host RAM per rank: transformers 5 reads the safetensors shards through mmap and copies tensor by tensor to the
  device with 4 loader threads, so a rank's own host memory peaks near 4 x the largest tensor; the shard files'
  page cache (their total size, 2 bytes per parameter) is shared by all ranks of a node. Loading to host RAM first
  (the old path, and still the CPU path) holds the whole model per rank.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from xrec_pl.errors import ConfigError
from xrec_pl.models.adapters import MoEAdapter, count_parameters

Precision = Literal["bf16", "8bit", "4bit"]
Strategy = Literal["single", "ddp", "fsdp", "zero3"]
PRECISIONS: tuple[Precision, ...] = ("bf16", "8bit", "4bit")
STRATEGIES: tuple[Strategy, ...] = ("single", "ddp", "fsdp", "zero3")
LOADER_THREADS = 4  # transformers.core_model_loading.GLOBAL_WORKERS (min(4, cpu_count))
ADDED_TOKENS = 3  # <USER_EMBED>, <ITEM_EMBED>, <|pad|> (Llama-2, Llama-3 and SmolLM2 have no separate pad token)
GIB = 1024**3


@dataclass(frozen=True)
class ModelSpec:
    """A published model: hub id, the ``LlamaConfig`` values of its ``config.json``, its published size."""

    hub_id: str
    config: dict[str, Any]
    published: str
    quantizable: bool = True  # the embedded model is never quantized (load_frozen_llm refuses it)


MODELS: dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec(
        "meta-llama/Llama-2-7b-chat-hf",
        {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
        "6,738,415,616 parameters (the Llama-2-7B count)",
    ),
    "llama3-8b": ModelSpec(
        "meta-llama/Meta-Llama-3-8B-Instruct",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
        },
        "8.03B parameters (model card)",
    ),
    "smollm2-135m": ModelSpec(
        "embedded (HuggingFaceTB/SmolLM2-135M-Instruct)",
        {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "tie_word_embeddings": True,
        },
        "135M parameters (model card); the embedded fp32 cache is 538,090,408 bytes = 4 x 134,515,008 + header",
        quantizable=False,
    ),
}


@dataclass(frozen=True)
class ModelSizes:
    """Exact sizes of a model built on ``meta``, after adding ``added_tokens`` embedding rows."""

    name: str
    params: int  # all parameters (tied embeddings counted once)
    linear_params: int  # weights of the decoder's linear layers (what bitsandbytes quantizes)
    linear_rows: int  # their output rows (one 8-bit scale each)
    layer_params: int  # one decoder layer
    root_params: int  # everything outside the decoder layers: embeddings, final norm, LM head
    embed_params: int
    head_params: int  # 0 when tied to the embeddings
    largest_tensor: int  # elements of the largest tensor
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int


_ANY = ModelSpec("", {}, "")


def build_meta_model(name: str, added_tokens: int = 0) -> nn.Module:
    """``LlamaForCausalLM`` of a model of :data:`MODELS` on the ``meta`` device (no weights are allocated)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    config = LlamaConfig(**MODELS[name].config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        if added_tokens:
            model.resize_token_embeddings(config.vocab_size + added_tokens, mean_resizing=False)
    return model


def model_sizes(name: str, added_tokens: int = ADDED_TOKENS) -> ModelSizes:
    """Count the parameters of model ``name`` (see :data:`MODELS`) on the meta device."""
    return sizes_of(build_meta_model(name, added_tokens), name)


def sizes_of(model: nn.Module, name: str = "") -> ModelSizes:
    """The :class:`ModelSizes` of a Llama-style ``*ForCausalLM`` (on any device, ``meta`` included)."""
    config = model.config
    layers = model.model.layers
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    linears = [m for m in layers.modules() if isinstance(m, nn.Linear)]
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    layer_params = sum(p.numel() for p in layers[0].parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelSizes(
        name=name,
        params=params,
        linear_params=sum(m.weight.numel() for m in linears),
        linear_rows=sum(m.out_features for m in linears),
        layer_params=layer_params,
        root_params=params - layer_params * len(layers),
        embed_params=embed.numel(),
        head_params=0 if head is embed else head.numel(),
        largest_tensor=max(p.numel() for p in model.parameters()),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_dim=config.num_key_value_heads * head_dim,
        vocab=model.get_input_embeddings().weight.shape[0],
    )


def adapter_params(hidden: int, graph_dim: int = 64, num_experts: int = 8) -> int:
    """Trainable parameters of the two MoE adapters (user, item) of the explainer for an LLM of width ``hidden``."""
    with torch.device("meta"):
        one = MoEAdapter(graph_dim, hidden, num_experts=num_experts)
    return 2 * count_parameters(one)


def weight_bytes(sizes: ModelSizes, precision: Precision) -> int:
    """Bytes of the frozen weights in ``precision`` (see the module docstring)."""
    rest = sizes.params - sizes.linear_params
    if precision == "bf16":
        return 2 * sizes.params
    if precision == "8bit":
        return sizes.linear_params + 4 * sizes.linear_rows + 2 * rest
    if precision == "4bit":
        return sizes.linear_params // 2 + 4 * math.ceil(sizes.linear_params / 64) + 2 * rest
    raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


def layer_activation_bytes(sizes: ModelSizes) -> int:
    """Bytes per token one decoder layer keeps for backward (bf16, no stored attention matrix)."""
    return 12 * sizes.hidden + 4 * sizes.kv_dim + 6 * sizes.intermediate + 4 * sizes.heads + 8


def activation_bytes(sizes: ModelSizes, batch: int, seq_len: int, label_tokens: int, checkpointing: bool) -> int:
    """Activation bytes of one training step: decoder layers, final norm, LM head at the labelled tokens."""
    tokens = batch * seq_len
    per_layer = layer_activation_bytes(sizes)
    final = 4 * sizes.hidden + 4
    body = 2 * sizes.hidden * sizes.layers + per_layer if checkpointing else sizes.layers * per_layer
    return tokens * (body + final) + batch * label_tokens * 10 * sizes.vocab


def gpu_bytes(
    sizes: ModelSizes,
    precision: Precision,
    strategy: Strategy,
    num_gpus: int = 8,
    batch: int = 16,
    seq_len: int = 512,
    label_tokens: int = 128,
    checkpointing: bool = True,
) -> dict[str, int] | None:
    """Per-GPU bytes of a training step (``weights``, ``adapters``, ``activations``, ``total``); ``None`` if unsupported.

    ``batch`` is the batch per GPU (``data.batch_size``); ``num_gpus`` matters for FSDP and ZeRO-3 only.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if precision != "bf16" and (strategy in ("fsdp", "zero3") or not MODELS.get(sizes.name, _ANY).quantizable):
        return None
    n = max(1, num_gpus)
    trainable = adapter_params(sizes.hidden)
    weights = weight_bytes(sizes, precision)
    adapters = 16 * trainable
    if strategy == "ddp":
        adapters += 4 * trainable
    elif strategy == "fsdp":
        root = 2 * sizes.root_params
        weights = (2 * sizes.params - root) // n + root + 2 * 2 * sizes.layer_params
    elif strategy == "zero3":
        weights = 2 * sizes.params // n + 2 * 2 * sizes.layer_params + 2 * max(sizes.embed_params, sizes.head_params)
        adapters //= n
    acts = activation_bytes(sizes, batch, seq_len, label_tokens, checkpointing)
    return {"weights": weights, "adapters": adapters, "activations": acts, "total": weights + adapters + acts}


def host_ram_per_rank(sizes: ModelSizes) -> dict[str, int]:
    """Host bytes while loading: ``rank_peak`` (to the GPU directly), ``page_cache`` (per node), ``host_first``."""
    return {
        "rank_peak": LOADER_THREADS * 2 * sizes.largest_tensor,
        "page_cache": 2 * (sizes.params - ADDED_TOKENS * sizes.hidden * (1 if sizes.head_params == 0 else 2)),
        "host_first": 2 * sizes.params,
    }


def hardware_table(
    models: list[str] | None = None,
    num_gpus: int = 8,
    batch: int = 16,
    seq_len: int = 512,
    label_tokens: int = 128,
) -> list[dict[str, Any]]:
    """One row per model x precision x gradient checkpointing: GiB per GPU for each strategy, and host RAM."""
    rows = []
    for name in models or list(MODELS):
        sizes = model_sizes(name)
        host = host_ram_per_rank(sizes)
        for precision in PRECISIONS:
            for checkpointing in (True, False):
                row: dict[str, Any] = {
                    "model": name,
                    "params": sizes.params,
                    "adapter_params": adapter_params(sizes.hidden),
                    "precision": precision,
                    "checkpointing": checkpointing,
                }
                for strategy in STRATEGIES:
                    parts = gpu_bytes(sizes, precision, strategy, num_gpus, batch, seq_len, label_tokens, checkpointing)
                    row[strategy] = None if parts is None else round(parts["total"] / GIB, 1)
                row["host_ram_rank_gib"] = round(host["rank_peak"] / GIB, 2)
                row["host_ram_host_first_gib"] = round(host["host_first"] / GIB, 1)
                rows.append(row)
    return rows


def format_markdown(rows: list[dict[str, Any]], num_gpus: int) -> str:
    """The table as Markdown (GiB per GPU; ``-`` where the combination is not supported)."""
    head = (
        f"| model (parameters) | weights | grad. ckpt | 1 GPU | DDP (per GPU) | FSDP, {num_gpus} GPUs | "
        f"ZeRO-3, {num_gpus} GPUs | host RAM per rank (to GPU / host first) |"
    )
    lines = [head, "|" + "---|" * 8]
    for row in rows:
        cells = [f"{row[s]:.1f}" if row[s] is not None else "-" for s in STRATEGIES]
        lines.append(
            f"| {row['model']} ({row['params']:,}) | {row['precision']} | {'on' if row['checkpointing'] else 'off'} | "
            + " | ".join(cells)
            + f" | {row['host_ram_rank_gib']:.2f} / {row['host_ram_host_first_gib']:.1f} GiB |"
        )
    return "\n".join(lines) + "\n"


def hardware(
    models: list[str] | None = None,
    num_gpus: int = 8,
    batch_size: int = 16,
    seq_len: int = 512,
    label_tokens: int = 128,
    format: Literal["markdown", "json"] = "markdown",
) -> list[dict[str, Any]]:
    """Print the computed GPU memory table (GiB per GPU) for stage 2 on Llama-2-7B, Llama-3-8B and SmolLM2-135M.

    Args:
        models: Any of ``llama2-7b``, ``llama3-8b``, ``smollm2-135m`` (default: all).
        num_gpus: GPUs that FSDP / ZeRO-3 shard over.
        batch_size: Records per GPU and step (``data.batch_size``).
        seq_len: Tokens per record (prompt + profiles + explanation; ``data.max_length`` caps it at 1024).
        label_tokens: Labelled (explanation) tokens per record, where the LM head runs.
        format: ``markdown`` or ``json``.
    """
    for name, value in (("num_gpus", num_gpus), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    rows = hardware_table(models, num_gpus, batch_size, seq_len, label_tokens)
    if format == "json":
        sys.stdout.write(json.dumps({"rows": rows, "sizes": [asdict(model_sizes(m)) for m in models or MODELS]}) + "\n")
    else:
        sys.stdout.write(format_markdown(rows, num_gpus))
    return rows
