"""LightGCN: propagation and symmetric backward against a dense D^-1/2 A D^-1/2 reference; BPR loss by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xrec_pl.data.graph import normalized_adjacency
from xrec_pl.models.lightgcn import LightGCN, bpr_loss, layer_weights

NU, NI = 4, 6
PAIRS = np.array([[0, 0], [0, 2], [1, 2], [1, 3], [2, 5], [3, 0], [3, 1], [3, 5], [0, 2]])  # one duplicate


def _dense_reference(weight: torch.Tensor, num_layers: int, combine: str) -> torch.Tensor:
    n = NU + NI
    a = torch.zeros(n, n, dtype=torch.float64)
    for u, i in PAIRS:
        a[u, NU + i] = a[NU + i, u] = 1.0
    d = a.sum(1)
    d_inv = torch.where(d > 0, d.pow(-0.5), torch.zeros_like(d))
    norm = d_inv[:, None] * a * d_inv[None, :]
    layers, h = [weight], weight
    for _ in range(num_layers):
        h = norm @ h
        layers.append(h)
    stacked = torch.stack(layers)
    return stacked.sum(0) if combine == "sum" else stacked.mean(0)


@pytest.mark.parametrize("combine", ["sum", "mean"])
@pytest.mark.parametrize("num_layers", [0, 1, 4])
def test_forward_and_symmetric_backward_match_dense(combine, num_layers):
    torch.manual_seed(0)
    adj = normalized_adjacency(PAIRS, NU, NI, dtype=torch.float64)
    model = LightGCN(NU, NI, dim=3, num_layers=num_layers, combine=combine).double()
    grad_out = torch.randn(NU + NI, 3, dtype=torch.float64)

    user, item = model(adj)
    assert user.shape == (NU, 3) and item.shape == (NI, 3)
    (torch.cat([user, item]) * grad_out).sum().backward()
    ours = model.embedding.weight.grad.clone()

    weight = model.embedding.weight.detach().clone().requires_grad_(True)
    ref = _dense_reference(weight, num_layers, combine)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(torch.cat([user, item]).detach(), ref.detach())
    torch.testing.assert_close(ours, weight.grad)


def test_gradcheck_custom_function():
    adj = normalized_adjacency(PAIRS, NU, NI, dtype=torch.float64)
    model = LightGCN(NU, NI, dim=2, num_layers=2).double()
    from xrec_pl.models.lightgcn import _SymmetricPropagation

    w = model.embedding.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _SymmetricPropagation.apply(adj, x, model.alphas), (w,))


def test_bpr_loss_hand_case():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # pos scores 2, 2
    n = torch.tensor([[1.0, 5.0], [3.0, 0.5]])  # neg scores 1, 1
    expected = math.log1p(math.exp(-1.0))  # -log sigmoid(2 - 1), same for both rows
    torch.testing.assert_close(bpr_loss(u, p, n, u, p, n, weight_decay=0.0), torch.tensor(expected))
    l2 = (1 + 4) + (4 + 1) + (1 + 25 + 9 + 0.25)
    torch.testing.assert_close(bpr_loss(u, p, n, u, p, n, weight_decay=0.1), torch.tensor(expected + 0.1 * l2))


def test_init_recommend_repr_and_errors():
    torch.manual_seed(0)
    model = LightGCN(NU, NI, dim=8, num_layers=2, combine="mean")
    bound_u = math.sqrt(6 / (NU + 8))
    assert model.embedding.weight[:NU].abs().max() <= bound_u
    assert "combine='mean'" in repr(model) and "num_layers=2" in repr(model)
    assert layer_weights(2, "mean") == [1 / 3] * 3
    adj = normalized_adjacency(PAIRS, NU, NI)
    top = model.recommend(adj, torch.tensor([0, 3]), k=3, exclude=(torch.tensor([0, 0]), torch.tensor([0, 2])))
    assert top.shape == (2, 3) and not ({0, 2} & set(top[0].tolist()))
    with pytest.raises(ValueError, match="combine"):
        LightGCN(NU, NI, combine="max")
    with pytest.raises(ValueError, match="CSR"):
        model(adj.to_dense())
    with pytest.raises(ValueError, match="shape"):
        LightGCN(NU + 1, NI)(adj)
