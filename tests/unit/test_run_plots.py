"""Per-run plots from CSV logs: merged versions of a resumed run, stage-1 ranking curves, the callback and W&B."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from xrec_pl.run_plots import plot_run, read_metrics


def _csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _stage1_logs(root: Path) -> None:
    _csv(root / "version_0" / "metrics.csv", [
        {"step": 4, "epoch": 0, "train/loss": 0.7},
        {"step": 4, "epoch": 0, "val/recall@20": 0.1, "val/ndcg@20": 0.05, "val/recall@40": 0.2},
        {"step": 9, "epoch": 1, "train/loss": 0.9},  # repeated by the resumed version below, which wins
    ])  # fmt: skip
    _csv(root / "version_1" / "metrics.csv", [
        {"step": 9, "epoch": 1, "train/loss": 0.6},
        {"step": 9, "epoch": 1, "val/recall@20": 0.15, "val/ndcg@20": 0.08, "val/recall@40": 0.25},
        {"step": 14, "epoch": 2, "val/loss": 1.5, "val/recall@20": 0.2, "val/ndcg@20": 0.1, "val/recall@40": 0.3},
    ])  # fmt: skip


def test_read_metrics_merges_versions(tmp_path):
    _stage1_logs(tmp_path / "logs")
    metrics = read_metrics(tmp_path / "logs")
    assert metrics["train/loss"] == [(4, 0, 0.7), (9, 1, 0.6)]
    assert [e for _, e, _ in metrics["val/recall@20"]] == [0, 1, 2]
    assert read_metrics(tmp_path / "nothing") == {}


def test_plot_run_writes_the_three_plots(tmp_path):
    _stage1_logs(tmp_path / "logs")
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["train_loss.png", "val_metrics.png", "stage1_ranking.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert plot_run(tmp_path / "empty") == [] and not (tmp_path / "empty" / "plots").exists()


def test_callback_writes_plots_and_logs_them_to_wandb(tmp_path, monkeypatch):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from callbacks.run_plots import RunPlots
    from xrec_pl.loggers import XrecWandbLogger

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, idx):
            loss = (self.w * batch[0]).pow(2).mean()
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, idx):
            self.log("val/recall@20", self.w.detach().abs().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1)), batch_size=2)
    csv_logger = CSVLogger(str(tmp_path), name="logs")
    trainer = pl.Trainer(
        max_epochs=2, default_root_dir=str(tmp_path), logger=[csv_logger], callbacks=[RunPlots()],
        log_every_n_steps=1, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Tiny(), data, data)
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["stage1_ranking.png", "train_loss.png"]

    # with W&B on, the images go to W&B too (log_image stubbed: no W&B run is started in the test process)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb = XrecWandbLogger(mode="offline", save_dir=str(tmp_path))
    logged = []
    monkeypatch.setattr(wandb, "log_image", lambda key, images, **kw: logged.append((key, images)))
    fake = SimpleNamespace(loggers=[csv_logger, wandb], default_root_dir=str(tmp_path))
    assert len(RunPlots().plot(fake)) == 2
    assert sorted(k for k, _ in logged) == ["plots/stage1_ranking", "plots/train_loss"]
    assert all(Path(images[0]).is_file() for _, images in logged)
    assert wandb._experiment is None


@pytest.mark.parametrize("config", ["stage1/synthetic.yaml", "stage2/synthetic.yaml", "stage2/llama2_7b.yaml"])
def test_shipped_configs_plot(repo_root, config):
    assert "callbacks.run_plots.RunPlots" in (repo_root / "configs" / config).read_text()
