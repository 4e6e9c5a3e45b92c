"""Greedy (or sampled) decoding with a KV cache that drops finished rows from the batch.

``llm.generate`` keeps every row of a batch in every decoding step until the last row stops, so a batch costs
``batch x longest explanation`` token steps whatever the other rows' lengths. :func:`greedy_generate` removes a row
from the batch (and from the cache) as soon as it emits a stop token, so the batch shrinks while it decodes; it
also skips ``generate``'s per-step machinery (logits processors, stopping criteria, output bookkeeping). It returns
the same tokens as ``llm.generate(do_sample=False, num_beams=1, suppress_tokens=...)`` (tested on the embedded model
and a tiny random one): same positions from the attention mask, same suppressed tokens, same stop rule, and rows
that stopped are filled with ``pad_id``.

Forward hooks (the embedding injector) see a multi-token prefill followed by one-token steps, exactly as under
``generate``.

Sampling (:class:`Sampling`, the reference recipe): ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
``repetition_penalty`` and ``no_repeat_ngram_size`` act on each step's logits in ``generate``'s order (repetition
penalty and n-gram ban on the raw scores, then temperature, top-k, top-p, then a multinomial draw):

- repetition penalty ``p`` over every token already in the row: ``s / p`` where ``s > 0``, ``s * p`` otherwise;
- n-gram ban ``n``: a token that would repeat an ``n``-gram already in the row gets ``-inf``;
- top-p keeps the smallest set of most likely tokens whose probability reaches ``p`` (at least one).

What "the row" is, is ``penalty_scope``: ``"generated"`` (the project's default) counts only the new tokens;
``"all"`` counts the prompt too, as ``generate`` does for a decoder-only model. With ``"all"`` an explanation may not
repeat any ``n``-gram of its own prompt: on Amazon, whose instruction reads "Explain why the user would buy the
book", a ban of 3-grams forbade "user would buy" and the trained explainer opened 309 of 329 test explanations with
"The user would purchase" although 98 % of its training targets say "would buy"; titles and phrases of the
user/item profiles were banned the same way.

:func:`resolve_sampling` builds the settings from a model's ``generation_config`` (the reference called
``generate`` without decoding arguments, so Llama-2-chat's own config, which samples, applied) and overrides.
With ``do_sample=False`` and no penalty or ban the step is the plain ``argmax`` of before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from xrec_pl.models.kv_cache import cache_keyword, preallocated_cache


@torch.no_grad()
def greedy_generate(
    llm: nn.Module,
    attention_mask: Tensor,
    *,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    suppress_ids: Sequence[int] = (),
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Greedy (or, with ``sampling``, sampled) new tokens ``(B, N)``, ``N <= max_new_tokens``, for a left-padded prompt batch.

    Args:
        llm: a Hugging Face causal LM (``forward`` accepts ``past_key_values``, ``position_ids``,
            ``logits_to_keep``).
        attention_mask: ``(B, T)``, 1 for prompt tokens, 0 for left padding.
        input_ids: ``(B, T)`` prompt ids; or
        inputs_embeds: ``(B, T, H)`` prompt embeddings (virtual tokens prepended, for example).
        max_new_tokens: at most this many new tokens per row.
        stop_ids: a row stops after emitting one of these (the stop token is kept in the output).
        pad_id: what fills a row after it stopped.
        suppress_ids: token ids never emitted (their logits are set to ``-inf``).
        sampling: decoding settings (:class:`Sampling`); ``None`` = greedy.
        generator: random source of the draws (``None``: the global one).

    Returns:
        ``(B, N)`` long, ``N`` = the longest row (rows that stopped earlier are padded with ``pad_id``).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = input_ids if input_ids is not None else inputs_embeds
    batch, device = prompt.shape[0], prompt.device
    mask = attention_mask.to(device=device, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding shifts nothing
    stops = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    banned = torch.tensor(sorted(set(suppress_ids)), device=device, dtype=torch.long)
    result = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    sampling = sampling if sampling is not None and not sampling.is_greedy else None
    history = None  # (A, L) ids each row holds so far (the prompt's too with "all"), for the penalty and the ban
    if sampling is not None and sampling.needs_history:
        if sampling.penalty_scope == "generated":
            history = torch.empty(batch, 0, dtype=torch.long, device=device)
        elif input_ids is None:
            raise ValueError("penalty_scope='all' needs input_ids (not inputs_embeds): the prompt's ids are counted")
        else:
            history = input_ids.to(device).masked_fill(mask == 0, -1)
    alive = torch.arange(batch, device=device)  # (A,) original row of each live row
    next_position = positions[:, -1] + 1  # (A,)
    cache = preallocated_cache(llm.config, prompt.shape[1] + max_new_tokens)  # written in place, no per-step copy
    cache_kw = cache_keyword(llm)
    steps = 0
    with cpu_decoding_layout(llm, device):  # on a CPU: weights column-major while decoding (see there)
        with padded_attention_kernels(device):  # on a GPU: no cuDNN plan per new shape (see there)
            out = llm(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: cache},
            )
        logits = out.logits[:, -1].float()  # (A, V)
        for step in range(max_new_tokens):
            if banned.numel():
                logits.index_fill_(1, banned, float("-inf"))
            if sampling is None:
                token = logits.argmax(-1)  # (A,)
            else:
                token = next_token(logits, sampling, history, generator)
                if history is not None:
                    history = torch.cat([history, token[:, None]], dim=1)
            result[alive, step] = token
            steps = step + 1
            done = torch.isin(token, stops)
            if step == max_new_tokens - 1:
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                alive, token, mask, next_position = alive[keep], token[keep], mask[keep], next_position[keep]
                if history is not None:
                    history = history[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            with padded_attention_kernels(device):
                out = llm(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=next_position[:, None],
                    use_cache=True,
                    **{cache_kw: cache},
                )
            logits = out.logits[:, -1].float()
            next_position = next_position + 1
    return result[:, :steps]


def padded_attention_kernels(device: torch.device) -> AbstractContextManager[None]:
    """SDPA without the cuDNN backend on a CUDA device, inside the block (elsewhere: unchanged).

    Decoding attends with a padding mask, over a key length that grows by one each step and a batch that shrinks as
    rows finish. With such a mask PyTorch's SDPA picks cuDNN attention on Hopper GPUs, and cuDNN builds an execution
    plan for every new shape: on one H200 (torch 2.11) a 7B-shape decoding step of 8 rows took 118 ms whenever its
    shapes were new, 24 ms when they had been seen before (docs/PERFORMANCE.md). FlashAttention, the memory-efficient
    kernel and the math kernel need no per-shape plan; SDPA chooses among them as usual.
    """
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@contextmanager
def cpu_decoding_layout(llm: nn.Module, device: torch.device) -> Iterator[int]:
    """Inside the block, the frozen fp32 ``nn.Linear`` weights of ``llm`` on a CPU are stored transposed (column-major).

    Decoding multiplies a few rows (the batch's live rows) by every weight matrix. On a 2-core x86 CPU without bf16
    instructions (torch 2.13, docs/PERFORMANCE.md) ``F.linear`` of 8 rows ran 2-5x slower with the usual row-major
    ``(out, in)`` weight than with the same weight stored ``(in, out)``: 576x576 483 vs 91 us, 1536x576 815 vs 229 us,
    the 49152-row LM head 27.4 vs 14.3 ms. Each weight keeps its shape, values and ``Parameter`` object (ties hold);
    only ``.data`` gets transposed storage, and the row-major storage comes back on leaving (also on an error), so
    training and every other forward see the model unchanged. The values are the same numbers; a matrix product may
    sum them in another order (last-bit differences in the logits). Elsewhere (CUDA, bf16/fp16 weights, trainable
    weights, several processes, a switch set off with :func:`decoding_layout_switch`) nothing changes; inside an
    enclosing block nothing is left to change (0 weights), so the blocks nest.

    Measured (docs/PERFORMANCE.md): re-laying and restoring the embedded LLM's 211 weights take ~0.8 s each way, a
    training step was as fast with either layout (14.4 vs 14.6 s), generation of 8 Amazon records 1.18x faster with
    the re-laying inside each call; :class:`~xrec_pl.lit.frozen_lm.FrozenLMModule` keeps the layout while the module
    is in eval mode, so a validation/test/predict loop pays it once.

    Yields:
        The number of weights re-laid (0 when nothing changed).
    """
    if device.type != "cpu" or not _DECODING_LAYOUT.get() or _distributed():
        yield 0
        return
    weights = {}
    for module in llm.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, nn.Linear)
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and not weight.requires_grad
            and weight.is_contiguous()
        ):
            weights[id(weight)] = weight
    # the new storage is made outside inference mode: Lightning evaluates under ``torch.inference_mode``, and an
    # inference tensor as a weight could not be saved for backward by the next training step
    relaid = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for weight in weights.values():
                weight.data = weight.data.t().contiguous().t()
                relaid.append(weight)
        yield len(relaid)
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for weight in relaid:
                weight.data = weight.data.contiguous()


_DECODING_LAYOUT: ContextVar[bool] = ContextVar("cpu_decoding_layout", default=True)


def _distributed() -> bool:
    """Several processes (DDP/FSDP on CPUs): their strategies own the parameters' storage; leave it alone."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def decoding_layout_switch(on: bool) -> Iterator[None]:
    """Switch :func:`cpu_decoding_layout` on or off inside the block (the bench's comparison)."""
    token = _DECODING_LAYOUT.set(on)
    try:
        yield
    finally:
        _DECODING_LAYOUT.reset(token)


def stop_ids(tokenizer: Any, llm: nn.Module, extra: Sequence[int] = ()) -> list[int]:
    """The token ids that end an explanation: the tokenizer's EOS, the LLM's generation config's, and ``extra``."""
    ids = {int(tokenizer.eos_token_id), *(int(i) for i in extra)}
    extra = getattr(llm.generation_config, "eos_token_id", None)
    if extra is not None:
        ids.update(int(i) for i in (extra if isinstance(extra, (list, tuple)) else [extra]))
    return sorted(ids)


def greedy_config(
    tokenizer: Any,
    llm: nn.Module,
    max_new_tokens: int,
    suppress_ids: Sequence[int],
    sampling: Sampling | None = None,
    extra_stops: Sequence[int] = (),
) -> Any:
    """A cached ``GenerationConfig``: stop at :func:`stop_ids` (plus ``extra_stops``), pad with the tokenizer's pad
    token, never emit ``suppress_ids`` (e.g. the reserved tokens and the added pad token, untrained rows of a tied LM
    head); greedy unless ``sampling`` says otherwise."""
    from transformers import GenerationConfig

    sampling = sampling or Sampling()
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        **sampling.generate_kwargs(),
        num_beams=1,
        eos_token_id=stop_ids(tokenizer, llm, extra_stops),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        suppress_tokens=sorted(set(suppress_ids)),
    )


def greedy_with_config(llm: nn.Module, config: Any, attention_mask: Tensor, **prompt: Tensor) -> Tensor:
    """:func:`greedy_generate` with the stop, pad and suppressed tokens and the decoding settings of a config."""
    stops = config.eos_token_id
    return greedy_generate(
        llm,
        attention_mask,
        max_new_tokens=config.max_new_tokens,
        stop_ids=list(stops) if isinstance(stops, (list, tuple)) else [stops],
        pad_id=config.pad_token_id,
        suppress_ids=config.suppress_tokens or (),
        sampling=Sampling.from_generation_config(config),
        **prompt,
    )


PENALTY_SCOPES = ("generated", "all")


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one generation (``generate``'s names and meanings).

    Attributes:
        do_sample: draw from the processed distribution (``False``: argmax of the processed scores).
        temperature: divides the scores before top-k/top-p (sampling only).
        top_k: keep the ``k`` most likely tokens (0: all; sampling only; 50 as ``generate``'s default).
        top_p: nucleus mass (1.0: all; sampling only).
        repetition_penalty: 1.0 = none.
        no_repeat_ngram_size: 0 = none.
        penalty_scope: what the penalty and the ban count: ``"generated"`` (the new tokens only) or ``"all"``
            (the prompt too, as ``generate``).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    penalty_scope: str = "generated"

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling settings {self} (temperature > 0, 0 < top_p <= 1, top_k >= 0)")
        if self.repetition_penalty <= 0 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"bad sampling settings {self} (repetition_penalty > 0, no_repeat_ngram_size >= 0)")
        if self.penalty_scope not in PENALTY_SCOPES:
            raise ValueError(f"penalty_scope must be one of {list(PENALTY_SCOPES)}, got {self.penalty_scope!r}")

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    @property
    def is_greedy(self) -> bool:
        """Plain argmax: nothing here changes the greedy choice."""
        return not self.do_sample and not self.needs_history

    @classmethod
    def from_generation_config(cls, config: Any) -> Sampling:
        """The settings a ``GenerationConfig`` asks for (``generate``'s defaults where unset, so the penalty and the
        ban count the prompt unless the config carries ``penalty_scope``, as :func:`greedy_config` writes it)."""
        sample = bool(getattr(config, "do_sample", False))
        return cls(
            do_sample=sample,
            temperature=float(getattr(config, "temperature", None) or 1.0) if sample else 1.0,
            top_k=int(50 if getattr(config, "top_k", None) is None else config.top_k) if sample else 50,
            top_p=float(getattr(config, "top_p", None) or 1.0) if sample else 1.0,
            repetition_penalty=float(getattr(config, "repetition_penalty", None) or 1.0),
            no_repeat_ngram_size=int(getattr(config, "no_repeat_ngram_size", None) or 0),
            penalty_scope=str(getattr(config, "penalty_scope", None) or "all"),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """The same settings as ``GenerationConfig`` keywords (``penalty_scope`` is the project's own key: ``generate``
        ignores it and always counts the prompt, so ``decoder="hf"`` refuses ``"generated"`` when it matters)."""
        kw: dict[str, Any] = {"do_sample": self.do_sample, "penalty_scope": self.penalty_scope}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            kw["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kw


# the decoding settings a module takes as overrides (``resolve_sampling``); they shape what is generated, not trained
DECODING_FIELDS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "penalty_scope",
)


def resolve_sampling(defaults: str, model_config: Any = None, overrides: Mapping[str, Any] | None = None) -> Sampling:
    """Decoding settings from a starting point and explicit overrides (``None`` values are ignored).

    Args:
        defaults: ``"greedy"`` (argmax; the project default) or ``"model"`` (the LLM's own ``generation_config``:
            what the reference got by calling ``generate`` without decoding arguments, so penalties count the prompt
            too unless ``penalty_scope`` is overridden).
        model_config: the model's ``generation_config`` (needed for ``"model"``).
        overrides: any of ``do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size,
            penalty_scope``.
    """
    if defaults not in ("greedy", "model"):
        raise ValueError(f"generation defaults must be 'greedy' or 'model', got {defaults!r}")
    settings = Sampling()
    if defaults == "model":
        settings = replace(settings, penalty_scope="all")
    if defaults == "model" and model_config is not None:
        found = {f: getattr(model_config, f, None) for f in DECODING_FIELDS}
        settings = replace(settings, **{f: type(getattr(settings, f))(v) for f, v in found.items() if v is not None})
    extra = {f: v for f, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(extra) - set(DECODING_FIELDS))
    if unknown:
        raise ValueError(f"unknown decoding settings {unknown}; known: {list(DECODING_FIELDS)}")
    return replace(settings, **{f: type(getattr(settings, f))(v) for f, v in extra.items()})


def check_hf_scope(sampling: Sampling) -> None:
    """``ValueError`` when ``llm.generate`` cannot do what ``sampling`` asks: it always counts the prompt in the
    repetition penalty and the n-gram ban, so ``penalty_scope="generated"`` needs the compact decoder."""
    if sampling.needs_history and sampling.penalty_scope != "all":
        raise ValueError(
            "decoder='hf' counts the prompt in repetition_penalty / no_repeat_ngram_size (generate's behaviour); "
            "set penalty_scope='all' or use decoder='compact'"
        )


def next_token(
    logits: Tensor, sampling: Sampling, history: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """One decoding step: ``(A, V)`` float scores (suppressed tokens already ``-inf``) -> ``(A,)`` token ids.

    ``history`` ``(A, L)`` holds the ids of each row so far (``-1`` where padded); needed for the penalty and ban.
    """
    scores = logits.clone()
    if sampling.repetition_penalty != 1.0 and history is not None:
        counts = torch.zeros_like(scores).scatter_add_(1, history.clamp(min=0), (history >= 0).to(scores.dtype))
        penalised = torch.where(scores > 0, scores / sampling.repetition_penalty, scores * sampling.repetition_penalty)
        scores = torch.where(counts > 0, penalised, scores)
    if sampling.no_repeat_ngram_size and history is not None:
        for row, banned in enumerate(banned_ngram_tokens(history, sampling.no_repeat_ngram_size)):
            if banned:
                scores[row, banned] = float("-inf")
    if not sampling.do_sample:
        return scores.argmax(-1)
    scores = scores / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.shape[-1])
        kth = scores.topk(k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=False)
        cum = ordered.softmax(-1).cumsum(-1)
        drop = cum <= 1 - sampling.top_p
        drop[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def banned_ngram_tokens(history: Tensor, n: int) -> list[list[int]]:
    """Per row, the tokens that would complete an ``n``-gram already present (``-1`` entries are skipped)."""
    out: list[list[int]] = []
    for row in history.tolist():
        ids = [t for t in row if t >= 0]
        if len(ids) < n:
            out.append([])
            continue
        prefix = tuple(ids[len(ids) - n + 1 :]) if n > 1 else ()
        out.append(sorted({ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i : i + n - 1]) == prefix}))
    return out


def bracket_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the ordinary tokens whose text contains ``[`` (special tokens are skipped when decoding, so excluded).

    Stopping at the first of these gives the same text as the reference's "cut at the first ``[``" (nothing after
    it survives the cut) and so also stops on ``[/INST]``.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for token_id in range(len(tokenizer)):
        if token_id not in special and "[" in tokenizer.decode([token_id]):
            out.append(token_id)
    return out


def cut_at_bracket(text: str) -> str:
    """The reference's post-processing: the text before its first ``[`` (all of it when there is none)."""
    end = text.find("[")
    return text if end == -1 else text[:end]
