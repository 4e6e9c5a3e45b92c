"""Learning curve (callbacks.learning_curve, callbacks.learning_curve): merged CSV versions, PNG at fit end."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from callbacks.learning_curve import LearningCurve, plot_learning_curve, read_curve
from data_modules.explanations import ExplanationDataModule
from tests.helpers import quiet_trainer
from xrec_pl.lit.explainer import ExplainerModule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "epoch,step,train/loss,val/loss,val/bertscore_f1\n"
    path.write_text(header + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_read_curve_merges_resumed_versions(tmp_path):
    _csv(tmp_path / "version_0" / "metrics.csv", [(0, 0, 3.0, "", ""), (0, 1, 2.8, "", ""), (0, 1, "", 2.9, 0.40)])
    _csv(tmp_path / "version_1" / "metrics.csv", [(0, 1, 2.7, "", ""), (0, 2, 2.5, "", ""), (1, 3, "", 2.6, 0.45)])
    curve = read_curve(tmp_path)
    assert curve["train/loss"] == [(0, 3.0), (1, 2.7), (2, 2.5)]  # the resumed version wins for step 1
    assert curve["val/bertscore_f1"] == [(1, 0.40), (3, 0.45)]
    out = plot_learning_curve(tmp_path, tmp_path / "curve.png", records_per_step=8)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert plot_learning_curve(tmp_path / "version_9", tmp_path / "none.png", 8) is None  # no logs: nothing
    assert not (tmp_path / "none.png").exists()


def test_callback_writes_png_after_fit(synthetic_dir, tmp_path, one_thread):
    pl.seed_everything(0)
    module = ExplainerModule(llm="tiny-random", embedding_source="random", graph_dim=8, lr=1e-2, num_experts=2)
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4, eval_batch_size=4)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        limit_val_batches=1,
        val_check_interval=2,
        logger=CSVLogger(str(tmp_path), name="logs"),
        log_every_n_steps=1,
        callbacks=[LearningCurve()],
    )
    trainer.fit(module, dm)
    png = tmp_path / "learning_curve.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    curve = read_curve(tmp_path / "logs")
    assert len(curve["train/loss"]) == 4 and curve["val/loss"]
    assert LearningCurve.records_per_step(trainer) == 4
