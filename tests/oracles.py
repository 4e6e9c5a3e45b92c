"""Slow reference computations the tests compare the explainer modules against (never used by the library)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def full_logits_loss(module: Any, batch: dict[str, Any]) -> Tensor:
    """The explainer's loss through the model's own full-logits path (``llm(..., labels=labels).loss``)."""
    out = module.llm(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
    )
    return out.loss


@torch.no_grad()
def greedy_uncached(module: Any, batch: dict[str, Any], max_new_tokens: int | None = None) -> Tensor:
    """Greedy decoding of a ``PeftExplainerModule`` without a KV cache: the whole sequence recomputed at every step.

    Same rules as ``generate_explanations`` (reserved/pad tokens suppressed, a row stops at EOS and is then padded
    with the pad token, positions from the attention mask). Returns the new tokens ``(B, N)``.
    """
    device = module.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    base = module.llm.get_base_model()
    stop = torch.tensor(module.stop_ids(), device=device)
    banned = sorted(set(module.llm_info.reserved_token_ids.values()))
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    steps: list[Tensor] = []
    for _ in range(max_new_tokens or module.hparams.max_new_tokens):
        embeds, full_mask = module.with_virtual_tokens(ids, mask)
        positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P+T)
        out = base(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, use_cache=False)
        logits = out.logits[:, -1].float()  # (B, V)
        logits[:, banned] = float("-inf")
        token = torch.where(done, module.tokenizer.pad_token_id, logits.argmax(-1))  # (B,)
        steps.append(token)
        done |= torch.isin(token, stop)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if bool(done.all()):
            break
    return torch.stack(steps, dim=1)
