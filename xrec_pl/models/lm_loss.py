"""The explainer's loss on a frozen causal LM: cross-entropy of the labelled tokens, LM head at those only.

The LM head is applied to the hidden states of the labelled positions only (``(N, H) @ (H, V)`` instead of
``(B, T, H) @ (H, V)``), the same loss as the model's full-logits forward (tested) at a fraction of the cost for long
prompts. This assumes a plain linear head (Llama family); models with logit soft-capping get it applied too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """Last hidden states ``(B, T, H)`` of the decoder (no LM head, no cache)."""
    return llm.get_decoder()(
        input_ids=input_ids, attention_mask=causal_suffices(attention_mask), use_cache=False
    ).last_hidden_state


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
