"""The explainer's loss on a frozen causal LM: cross-entropy of the labelled tokens, LM head at those only.

The LM head is applied to the hidden states of the labelled positions only (``(N, H) @ (H, V)`` instead of
``(B, T, H) @ (H, V)``), the same loss as the model's full-logits forward (tested) at a fraction of the cost for long
prompts. This assumes a plain linear head (Llama family); models with logit soft-capping get it applied too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from xrec_pl.models.kv_cache import cache_keyword

IGNORE_INDEX = -100  # the label of positions without a loss (prompt, padding)


def causal_suffices(mask: Tensor | None) -> Tensor | None:
    """``None`` for a right-padded ``(B, T)`` mask, else the mask.

    With right padding the causal mask alone hides every trailing pad from every real token (positions are 0..n-1 in
    both cases), so the real tokens' hidden states are the same without the padding mask; only the pad positions'
    own states change, and no loss reads them. SDPA then takes its ``is_causal`` kernel: with an explicit
    ``(B, 1, T, T)`` mask the CPU kernel was several times slower (tests/unit/test_speedups.py checks equality).
    """
    if mask is None or bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None
    return mask


def decoder_hidden_states(llm: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Last hidden states ``(B, T, H)`` of the decoder (no LM head, no cache), with :func:`teacher_forcing_attention`."""
    with attention_implementation(llm, teacher_forcing_attention(llm, input_ids.device)):
        return llm.get_decoder()(
            input_ids=input_ids, attention_mask=causal_suffices(attention_mask), use_cache=False
        ).last_hidden_state


def teacher_forcing_attention(llm: nn.Module, device: torch.device) -> str | None:
    """The attention kernel of a plain teacher-forced forward (training, losses): ``"eager"`` on a CPU, else
    ``None`` (the kernel the LLM was loaded with, SDPA).

    Measured on a 2-core CPU with avx512_bf16 (docs/PERFORMANCE.md): with bf16 weights the CPU flash-attention
    kernel's backward took ~4x its forward, and eager attention made a training step 9-17 % faster (a forward alone
    8 %); with fp32 weights the two were equally fast. Generation keeps SDPA: its cached steps with a padding mask were
    slower under eager. Not switched under activation checkpointing, which re-runs the layers' forward during
    backward, outside the switch.
    """
    if not _CPU_EAGER.get() or device.type != "cpu" or _checkpointing(llm):
        return None
    return "eager"


_CPU_EAGER: ContextVar[bool] = ContextVar("cpu_eager_teacher_forcing", default=True)


@contextmanager
def cpu_eager_teacher_forcing(on: bool) -> Iterator[None]:
    """Switch :func:`teacher_forcing_attention`'s CPU rule (and with it the shared-prefix split of training) on or
    off inside the block: the bench's ablation measures what each buys."""
    token = _CPU_EAGER.set(on)
    try:
        yield
    finally:
        _CPU_EAGER.reset(token)


def _checkpointing(llm: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in llm.modules())


@contextmanager
def attention_implementation(llm: nn.Module, name: str | None) -> Iterator[None]:
    """Run ``llm``'s attention with the kernel ``name`` inside the block (``None`` or unsupported: unchanged).

    The same maths under another kernel (floating-point order aside); the setting is put back on leaving.
    """
    config = getattr(llm, "config", None)
    current = getattr(config, "_attn_implementation", None)
    setter = getattr(llm, "set_attn_implementation", None)
    if name is None or current is None or current == name or setter is None:
        yield
        return
    setter(name)
    try:
        yield
    finally:
        setter(current)


def token_nll(llm: nn.Module, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of every labelled token ``(N,)`` and the batch row it belongs to ``(N,)``.

    Args:
        llm: the causal LM whose output embeddings (LM head) and ``final_logit_softcapping`` apply.
        hidden: last hidden states ``(B, T, H)``.
        labels: ``(B, T)`` token ids, ``IGNORE_INDEX`` where there is no loss.
    """
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted from position t
    mask = targets != IGNORE_INDEX
    picked = hidden[:, :-1][mask]  # (N, H)
    logits = llm.get_output_embeddings()(picked).float()  # (N, V)
    cap = getattr(llm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    rows = torch.arange(targets.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (N,)
    return F.cross_entropy(logits, targets[mask], reduction="none"), rows


def common_prefix_lengths(input_ids: Tensor, lengths: Tensor, group: int) -> Tensor:
    """Tokens shared at the start by the rows of each group of ``group`` consecutive rows ``(B / group,)``.

    Capped one below the group's shortest row, so that every row keeps at least one token of its own.
    """
    rows, width = input_ids.shape
    ids = input_ids.view(rows // group, group, width)
    lengths = lengths.view(-1, group)
    same = (ids == ids[:, :1]).all(1)  # (G, T)
    differs = torch.cat([~same, torch.ones_like(same[:, :1])], dim=1)  # a sentinel column past the end
    shared = differs.int().argmax(1)  # first position where the group's rows differ
    return torch.minimum(shared, lengths.min(1).values - 1)


def grouped_hidden_states(
    llm: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    group: int,
    prefix_lengths: Tensor,
    prefix_context: Callable[[Tensor], AbstractContextManager],
    rest_context: Callable[[], AbstractContextManager] | None = None,
) -> Tensor:
    """Last hidden states ``(B, T, H)`` of a right-padded batch whose rows come in groups sharing a token prefix.

    The shared prefix of each group runs once (one row per group, inside ``prefix_context(first_rows)``, e.g. the
    group's injection), and each row's own continuation runs on a copy of that prefix's KV cache (outside the
    context: nothing in a continuation is injected). The result equals :func:`decoder_hidden_states` of the whole
    batch up to floating-point order, for ``group`` times less prefix work: the forced-choice community test scores
    four variants of one explanation that differ only from the community's name on, and training runs the prompt's
    shared start once per batch (one group of the whole batch, the injection paused in the prefix and shifted in the
    continuations by ``rest_context``).

    Args:
        llm: the causal LM.
        input_ids: ``(B, T)`` right-padded ids, ``B`` a multiple of ``group``.
        attention_mask: ``(B, T)`` 1 for tokens, 0 for right padding.
        group: rows per group.
        prefix_lengths: ``(B / group,)`` tokens each group shares (:func:`common_prefix_lengths`), each at least 1
            and below every row length of its group.
        prefix_context: context for the prefix forward, given the ``(G,)`` batch rows that represent each group.
        rest_context: context for the continuations' forward (default: none).
    """
    rows, width = input_ids.shape
    groups = rows // group
    lengths = attention_mask.sum(1)
    firsts = torch.arange(groups, device=input_ids.device) * group
    longest_prefix = int(prefix_lengths.max())
    prefix_ids = input_ids[firsts, :longest_prefix]  # right-padded beyond each group's prefix: the causal mask suffices
    decoder = llm.get_decoder()
    cache = DynamicCache(config=llm.config)
    keyword = cache_keyword(decoder)
    with prefix_context(firsts):
        prefix_hidden = decoder(input_ids=prefix_ids, use_cache=True, **{keyword: cache}).last_hidden_state
    cache.batch_repeat_interleave(group)  # (B, heads, P, d): each row continues its group's prefix
    own = prefix_lengths.repeat_interleave(group)  # (B,)
    longest_rest = int((lengths - own).max())
    steps = torch.arange(longest_rest, device=input_ids.device)
    take = (own[:, None] + steps).clamp(max=width - 1)  # (B, S)
    rest_ids = input_ids.gather(1, take)
    cached = torch.arange(longest_prefix, device=input_ids.device)[None] < own[:, None]  # (B, P) the real prefix
    mask = torch.cat([cached, torch.ones_like(take, dtype=torch.bool)], dim=1).long()  # continuations' pads: causal
    with rest_context() if rest_context is not None else nullcontext():
        rest_hidden = decoder(
            input_ids=rest_ids,
            attention_mask=mask,
            position_ids=own[:, None] + steps,
            use_cache=True,
            **{keyword: cache},
        ).last_hidden_state
    # position t of row b: the group's prefix state below own[b], the row's continuation state from there to its end
    t = torch.arange(width, device=input_ids.device)[None]  # (1, T)
    size = rest_hidden.shape[-1]
    from_prefix = prefix_hidden.repeat_interleave(group, 0).gather(
        1, t.clamp(max=longest_prefix - 1).expand(rows, -1)[..., None].expand(-1, -1, size)
    )
    from_rest = rest_hidden.gather(1, (t - own[:, None]).clamp(0, longest_rest - 1)[..., None].expand(-1, -1, size))
    hidden = torch.where((t < own[:, None])[..., None], from_prefix, from_rest)
    return hidden.masked_fill((t >= lengths[:, None])[..., None], 0.0)  # (B, T, H); right padding stays zero
