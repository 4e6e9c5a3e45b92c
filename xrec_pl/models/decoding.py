"""Greedy decoding with a KV cache that drops finished rows from the batch.

``llm.generate`` keeps every row of a batch in every decoding step until the last row stops, so a batch costs
``batch x longest explanation`` token steps whatever the other rows' lengths. :func:`greedy_generate` removes a row
from the batch (and from the cache) as soon as it emits a stop token, so the batch shrinks while it decodes; it
also skips ``generate``'s per-step machinery (logits processors, stopping criteria, output bookkeeping). It returns
the same tokens as ``llm.generate(do_sample=False, num_beams=1, suppress_tokens=...)`` (tested on the embedded model
and a tiny random one): same positions from the attention mask, same suppressed tokens, same stop rule, and rows
that stopped are filled with ``pad_id``.

Forward hooks (the embedding injector) see a multi-token prefill followed by one-token steps, exactly as under
``generate``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


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
) -> Tensor:
    """Greedy new tokens ``(B, N)``, ``N <= max_new_tokens``, for a left-padded prompt batch.

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

    Returns:
        ``(B, N)`` long, ``N`` = the longest row (rows that stopped earlier are padded with ``pad_id``).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    from transformers import DynamicCache

    prompt = input_ids if input_ids is not None else inputs_embeds
    batch, device = prompt.shape[0], prompt.device
    mask = attention_mask.to(device=device, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding shifts nothing
    cache = DynamicCache(config=llm.config)
    cache_kw = _cache_keyword(llm)
    out = llm(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kw: cache},
    )
    stops = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    banned = torch.tensor(sorted(set(suppress_ids)), device=device, dtype=torch.long)
    result = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    alive = torch.arange(batch, device=device)  # (A,) original row of each live row
    next_position = positions[:, -1] + 1  # (A,)
    logits = out.logits[:, -1].float()  # (A, V)
    steps = 0
    for step in range(max_new_tokens):
        if banned.numel():
            logits.index_fill_(1, banned, float("-inf"))
        token = logits.argmax(-1)  # (A,)
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
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
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


def _cache_keyword(llm: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older releases), whichever ``forward`` takes."""
    params = inspect.signature(llm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def stop_ids(tokenizer: Any, llm: nn.Module) -> list[int]:
    """The token ids that end an explanation: the tokenizer's EOS and the LLM's generation config's."""
    ids = {int(tokenizer.eos_token_id)}
    extra = getattr(llm.generation_config, "eos_token_id", None)
    if extra is not None:
        ids.update(int(i) for i in (extra if isinstance(extra, (list, tuple)) else [extra]))
    return sorted(ids)


def greedy_config(tokenizer: Any, llm: nn.Module, max_new_tokens: int, suppress_ids: Sequence[int]) -> Any:
    """A greedy, cached ``GenerationConfig``: stop at :func:`stop_ids`, pad with the tokenizer's pad token, never emit
    ``suppress_ids`` (e.g. the reserved tokens and the added pad token, untrained rows of a tied LM head)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stop_ids(tokenizer, llm),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        suppress_tokens=sorted(set(suppress_ids)),
    )


def greedy_with_config(llm: nn.Module, config: Any, attention_mask: Tensor, **prompt: Tensor) -> Tensor:
    """:func:`greedy_generate` with the stop, pad and suppressed tokens of a greedy ``GenerationConfig``."""
    stops = config.eos_token_id
    return greedy_generate(
        llm,
        attention_mask,
        max_new_tokens=config.max_new_tokens,
        stop_ids=list(stops) if isinstance(stops, (list, tuple)) else [stops],
        pad_id=config.pad_token_id,
        suppress_ids=config.suppress_tokens or (),
        **prompt,
    )
