"""Stage 1 on the real Amazon-books graph: a short fit, full-ranking validation, embedding export (< 2 min on 2 cores)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

pytestmark = pytest.mark.integration


def test_short_fit_on_amazon(amazon_dir, tmp_path):
    from callbacks.embedding_export import EmbeddingExport
    from data_modules.graph import InteractionDataModule
    from xrec_pl.data.embeddings import load_embeddings
    from xrec_pl.lit.recommender import LightGCNModule

    pl.seed_everything(0, verbose=False)
    dm = InteractionDataModule(amazon_dir, seed=0)
    assert (dm.num_users, dm.num_items) == (15349, 15247)
    model = LightGCNModule()
    common = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "default_root_dir": tmp_path}
    before = pl.Trainer(**common, enable_checkpointing=False).validate(model, dm, verbose=False)[0]
    trainer = pl.Trainer(
        **common,
        max_epochs=2,
        limit_train_batches=40,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[EmbeddingExport(source="last")],
    )
    trainer.fit(model, dm)
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert after["val/recall@20"] > 2 * before["val/recall@20"]
    assert after["val/ndcg@20"] > before["val/ndcg@20"]
    assert 0 < after["val/precision@20"] < 1 and 0 < after["val/mrr@20"] <= 1
    user, item = load_embeddings(tmp_path / "embeddings.safetensors")
    assert user.shape == (15349, 64) and item.shape == (15247, 64)
