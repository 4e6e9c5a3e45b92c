"""Adapters that map a collaborative (graph) embedding to the LLM's hidden size.

``MoEAdapter`` follows XRec's Mixture-of-Experts adapter: ``E`` experts, each
``dropout -> subtract a learned bias -> linear (no bias)``, mixed by a softmax gate with optional
noisy gating during training. All adapters compute in fp32 whatever their input dtype; the cast to
the LLM dtype happens once, at the injection point (``EmbeddingInjector``).

Torch only: importing this module does not import transformers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xrec_pl.utils import check_choice

AdapterKind = Literal["moe", "linear", "none"]


class MoEAdapter(nn.Module):
    r"""Mixture-of-Experts adapter (XRec).

    For an input ``x`` (``in_dim``), expert ``e`` computes
    ``y_e = W_e (dropout_e(x) - b_e)`` with ``b_e`` init 0 and ``W_e`` init ``N(0, 0.02)``.
    The gate is ``g = softmax(x W_gate + n)`` with ``W_gate`` init 0, where in training (and with
    ``noisy_gating``) ``n ~ N(0, softplus(x W_noise) + 0.01)`` and ``W_noise`` init 0; in eval ``n = 0``.
    The output is ``sum_e g_e y_e``. At initialisation the gate is uniform (``1/E``) in eval.

    Each expert draws its own dropout mask, as in the reference (one dropout module per expert).

    Args:
        in_dim: size of the graph embedding (64 in XRec).
        out_dim: size of the output (the LLM hidden size).
        num_experts: number of experts ``E``.
        dropout: dropout probability applied to the input of every expert.
        noisy_gating: add input-dependent Gaussian noise to the gate logits in training.
    """

    noise_epsilon: float = 1e-2

    def __init__(
        self, in_dim: int, out_dim: int, num_experts: int = 8, dropout: float = 0.2, noisy_gating: bool = True
    ) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0 or num_experts <= 0:
            raise ValueError(f"MoEAdapter needs positive sizes, got {in_dim=}, {out_dim=}, {num_experts=}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MoEAdapter dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_experts = num_experts
        self.dropout = dropout
        self.noisy_gating = noisy_gating
        # Experts stacked into one tensor so that all E run as one einsum.
        self.expert_bias = nn.Parameter(torch.empty(num_experts, in_dim))  # (E, in)
        self.expert_weight = nn.Parameter(torch.empty(num_experts, out_dim, in_dim))  # (E, out, in), like nn.Linear
        self.w_gate = nn.Parameter(torch.empty(in_dim, num_experts))  # (in, E)
        self.w_noise = nn.Parameter(torch.empty(in_dim, num_experts))  # (in, E)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """XRec init: expert weights ``N(0, 0.02)``; expert biases and both gate matrices zero."""
        nn.init.normal_(self.expert_weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.expert_bias)
        nn.init.zeros_(self.w_gate)
        nn.init.zeros_(self.w_noise)

    def gates(self, x: Tensor) -> Tensor:
        """Gate weights for ``x`` of shape ``(..., in_dim)``: ``(..., E)``, rows sum to one."""
        x = x.float()
        logits = x @ self.w_gate.float()  # (..., E)
        if self.noisy_gating and self.training:
            noise_std = F.softplus(x @ self.w_noise.float()) + self.noise_epsilon  # (..., E)
            logits = logits + torch.randn_like(logits) * noise_std
        return torch.softmax(logits, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(..., in_dim)`` to ``(..., out_dim)`` in fp32."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"MoEAdapter expected last dim {self.in_dim}, got shape {tuple(x.shape)}")
        x = x.float()
        gates = self.gates(x)  # (..., E)
        xe = x.unsqueeze(-2).expand(*x.shape[:-1], self.num_experts, self.in_dim)  # (..., E, in)
        xe = F.dropout(xe, p=self.dropout, training=self.training)  # independent mask per expert
        xe = xe - self.expert_bias.float()  # (..., E, in)
        ye = torch.einsum("...ei,eoi->...eo", xe, self.expert_weight.float())  # (..., E, out)
        return (gates.unsqueeze(-1) * ye).sum(dim=-2)  # (..., out)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_experts={self.num_experts}, "
            f"dropout={self.dropout}, noisy_gating={self.noisy_gating}"
        )


class LinearAdapter(nn.Module):
    """A single affine map (the "no MoE" ablation), computed in fp32.

    Weight init ``N(0, 0.02)`` (the scale of one MoE expert) and bias zero, so that it starts as small as
    the MoE adapter.

    Args:
        in_dim: size of the graph embedding.
        out_dim: size of the output (the LLM hidden size).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"LinearAdapter needs positive sizes, got {in_dim=}, {out_dim=}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))  # (out, in)
        self.bias = nn.Parameter(torch.empty(out_dim))  # (out,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(..., in_dim)`` to ``(..., out_dim)`` in fp32."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"LinearAdapter expected last dim {self.in_dim}, got shape {tuple(x.shape)}")
        return F.linear(x.float(), self.weight.float(), self.bias.float())

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"


def build_adapter(kind: AdapterKind, in_dim: int, out_dim: int, **kwargs) -> nn.Module | None:
    """Build an adapter by name.

    Args:
        kind: ``"moe"`` (``MoEAdapter``), ``"linear"`` (``LinearAdapter``) or ``"none"`` (returns ``None``:
            no adapter, the reserved tokens keep their own token embeddings).
        in_dim: size of the graph embedding.
        out_dim: size of the output (the LLM hidden size).
        **kwargs: passed to ``MoEAdapter`` (``num_experts``, ``dropout``, ``noisy_gating``).

    Returns:
        The adapter module, or ``None`` for ``"none"``.
    """
    kind = kind.lower()
    check_choice("adapter", kind, AdapterKind)
    if kind == "moe":
        return MoEAdapter(in_dim, out_dim, **kwargs)
    if kwargs:
        raise ValueError(f"adapter {kind!r} takes no options, got {sorted(kwargs)}")
    if kind == "linear":
        return LinearAdapter(in_dim, out_dim)
    return None  # "none"


def count_parameters(module: nn.Module | None) -> int:
    """Number of trainable parameters of ``module`` (0 for ``None``)."""
    if module is None:
        return 0
    return sum(math.prod(p.shape) for p in module.parameters() if p.requires_grad)


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put ``modules`` (``None`` skipped) in eval mode inside the block, then restore each one's own mode."""
    present = [m for m in modules if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(present, modes):
            m.train(mode)
