"""LightGCNModule + InteractionDataModule + EmbeddingExport on the tiny synthetic dataset."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from callbacks.embedding_export import EmbeddingExport
from data_modules.graph import InteractionDataModule
from tests.helpers import quiet_trainer
from xrec_pl.data.embeddings import load_embeddings
from xrec_pl.lit.recommender import LightGCNModule

_trainer = quiet_trainer


def test_datamodule_triples(synthetic_dir):
    dm = InteractionDataModule(synthetic_dir, batch_size=16, seed=0)
    assert (dm.num_users, dm.num_items) == (60, 50)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = [torch.stack(b) for b in loader]
    again = [torch.stack(b) for b in dm.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # deterministic from (seed, epoch)
    triples = torch.cat(first, dim=1)  # (3, N)
    assert triples.shape[1] == len(dm.interactions("trn"))
    known = dm.train_items.contains(triples[0].numpy(), triples[2].numpy())
    assert not known.any() and dm.train_items.contains(triples[0].numpy(), triples[1].numpy()).all()
    loader.sampler.set_epoch(1)
    epoch1 = torch.cat([torch.stack(b) for b in loader], dim=1)
    assert not torch.equal(epoch1, triples)
    users = torch.cat(list(dm.val_dataloader()))
    assert torch.equal(users, torch.nonzero(dm.val_items.counts() > 0).flatten())
    assert dm.adjacency().shape == (110, 110)


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_fit_improves_recall_and_exports(synthetic_dir, tmp_path, combine):
    pl.seed_everything(0, verbose=False)
    dm = InteractionDataModule(synthetic_dir, batch_size=64, eval_batch_size=32)
    model = LightGCNModule(combine=combine, lr=1e-2, dim=16, num_layers=2)
    trainer = _trainer(tmp_path, max_epochs=4, callbacks=[EmbeddingExport()])
    before = trainer.validate(model, dm, verbose=False)[0]
    assert model.hparams.num_users == 60 and model.hparams.num_items == 50
    trainer = _trainer(tmp_path, max_epochs=4, callbacks=[EmbeddingExport(source="last")])
    trainer.fit(model, dm)
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert set(before) >= {f"val/{m}@{k}" for m in ("recall", "ndcg", "precision", "mrr") for k in (20, 40)}
    assert after["val/recall@20"] > before["val/recall@20"]
    assert after["val/ndcg@20"] > before["val/ndcg@20"]
    user, item = load_embeddings(tmp_path / "embeddings.safetensors")
    ref_user, ref_item = model.get_embeddings()
    torch.testing.assert_close(user, ref_user)
    assert item.shape == (50, 16)
    test = trainer.test(model, dm, verbose=False)[0]
    assert 0.0 <= test["test/recall@20"] <= 1.0


def test_checkpoint_roundtrip_and_best_export(synthetic_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    dm = InteractionDataModule(synthetic_dir, batch_size=64)
    model = LightGCNModule(dim=8, num_layers=1, lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/recall@20", mode="max")
    export = EmbeddingExport()
    trainer = _trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[ckpt, export])
    trainer.fit(model, dm)
    restored = LightGCNModule.load_from_checkpoint(ckpt.best_model_path)
    assert restored.hparams.num_users == 60 and restored.model is not None
    user, item = load_embeddings(export.last_path)
    restored_trainer = _trainer(tmp_path / "r")
    restored_trainer.validate(restored, dm, verbose=False)
    best_user, _ = restored.get_embeddings()
    torch.testing.assert_close(user, best_user)


def test_reg_on_final_and_bad_args(synthetic_dir, tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = InteractionDataModule(synthetic_dir, batch_size=128)
    model = LightGCNModule(dim=8, num_layers=1, reg_on="final", weight_decay=1e-3)
    _trainer(tmp_path, fast_dev_run=2).fit(model, dm)
    assert np.isfinite(float(_trainer(tmp_path).callback_metrics.get("train/loss", torch.tensor(0.0))))
    with pytest.raises(ValueError, match="reg_on"):
        LightGCNModule(reg_on="batch")
    wrong = LightGCNModule(num_users=3, num_items=4)
    with pytest.raises(ValueError, match="do not match"):
        _trainer(tmp_path, fast_dev_run=1).fit(wrong, dm)
