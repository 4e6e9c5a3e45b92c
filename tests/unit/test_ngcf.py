"""NGCF (model.encoder: ngcf): the layer formula against a dense computation, shapes, gradients, the module switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xrec_pl.data.graph import normalized_adjacency
from xrec_pl.models.ngcf import NGCF

PAIRS = np.array([[0, 0], [0, 1], [1, 1], [2, 2], [2, 0]])


def _dense_reference(model: NGCF, pairs: np.ndarray, num_users: int, num_items: int) -> torch.Tensor:
    """NGCF written out with a dense D^-1/2 A D^-1/2, layer by layer."""
    n = num_users + num_items
    a = torch.zeros(n, n)
    for u, i in pairs:
        a[u, num_users + i] = a[num_users + i, u] = 1.0
    d = a.sum(1).clamp(min=1).pow(-0.5)
    lap = d[:, None] * a * d[None, :]
    e = model.embedding.weight.detach()
    outs = [e]
    for w1, w2 in zip(model.w1, model.w2):
        m = lap @ e
        e = F.leaky_relu((m + e) @ w1.weight.T + w1.bias + (m * e) @ w2.weight.T + w2.bias, 0.2)
        outs.append(e / e.norm(dim=1, keepdim=True).clamp(min=1e-12))
    return torch.cat(outs, 1)


def test_matches_dense_reference_and_trains():
    torch.manual_seed(0)
    model = NGCF(3, 3, dim=4, num_layers=2)
    adj = normalized_adjacency(PAIRS, 3, 3)
    out = model.propagate(adj)
    assert out.shape == (6, 12) and model.out_dim == 12
    torch.testing.assert_close(out.detach(), _dense_reference(model, PAIRS, 3, 3), rtol=1e-5, atol=1e-6)
    users, items = model(adj)
    (users[0] @ items[1] - users[0] @ items[2]).backward()
    assert model.embedding.weight.grad.abs().sum() > 0 and model.w2[0].weight.grad.abs().sum() > 0
    torch.testing.assert_close(model.ego(torch.tensor([1])), model.embedding.weight[1:2])
    with pytest.raises(ValueError, match="adjacency"):
        model.propagate(torch.eye(5))


def test_module_switch_trains_one_epoch(synthetic_dir, tmp_path):
    import lightning.pytorch as pl

    from data_modules.graph import InteractionDataModule
    from xrec_pl.lit.recommender import LightGCNModule

    dm = InteractionDataModule(synthetic_dir, batch_size=64)
    module = LightGCNModule(dim=8, num_layers=2, encoder="ngcf", ks=(5,))
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(module, datamodule=dm)
    assert isinstance(module.model, NGCF)
    user, item = module.get_embeddings()
    assert user.shape == (dm.num_users, 24) and item.shape == (dm.num_items, 24)
    assert 0.0 <= trainer.callback_metrics["val/recall@5"] <= 1.0
    with pytest.raises(ValueError, match="encoder"):
        LightGCNModule(encoder="gcn")
