"""ExplanationMetricsCallback with a fake generating module and a fake datamodule (the generation contract)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.explanation_metrics import ExplanationMetricsCallback, select_subset, shard_indices
from tests.unit.test_metrics import FakeScorer
from xrec_pl.tools.evaluate import evaluate

N_RECORDS = 20


def prediction_for(index: int) -> str:
    return f"the user would enjoy item {index % 7} because of its plot"  # repeats: USR < 1


def reference_for(index: int) -> str:
    return f"the user enjoys the plot of item {index}"


class FakeDataModule(pl.LightningDataModule):
    """Implements the generation contract: ``generation_dataloader(split, indices)`` + ``num_records(split)``."""

    def __init__(self, n: int = N_RECORDS, batch_size: int = 3) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size
        self.requested: list[list[int]] = []

    def num_records(self, split: str) -> int:
        return self.n

    def generation_dataloader(self, split: str = "val", indices=None, batch_size=None):
        indices = list(range(self.n)) if indices is None else list(indices)
        self.requested.append(indices)
        bs = batch_size or self.batch_size
        for start in range(0, len(indices), bs):
            idx = indices[start : start + bs]
            yield {
                "index": torch.tensor(idx),
                "user_id": torch.tensor([100 + i for i in idx]),
                "item_id": torch.tensor([200 + i for i in idx]),
                "input_ids": torch.zeros(len(idx), 4, dtype=torch.long),
                "reference": [reference_for(i) for i in idx],
            }

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4)


class FakeExplainer(pl.LightningModule):
    """Trains a linear layer; ``generate_explanations`` is a pure function of the batch indices."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.generated = 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def generate_explanations(self, batch) -> list[str]:
        assert not self.training
        self.generated += len(batch["index"])
        return [prediction_for(int(i)) for i in batch["index"]]


def _callback(**kw) -> ExplanationMetricsCallback:
    kw.setdefault("metric_kwargs", {"bertscore": {"scorer": FakeScorer()}})
    return ExplanationMetricsCallback(num_samples=8, seed=0, metrics=("usr", "bertscore"), **kw)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_subset_is_seeded_and_sharding_pads_like_distributed_sampler():
    assert select_subset(20, 8, 0) == select_subset(20, 8, 0)
    assert select_subset(20, 8, 0) != select_subset(20, 8, 1)
    assert select_subset(5, 8, 0) == [0, 1, 2, 3, 4]
    assert shard_indices([0, 1, 2, 3, 4], 0, 2) == [0, 2, 4]
    assert shard_indices([0, 1, 2, 3, 4], 1, 2) == [1, 3, 0]  # padded with a duplicate of 0
    assert shard_indices([7], 1, 3) == [7]


def test_fit_logs_metrics_and_writes_sample_tables(tmp_path):
    cb = _callback()
    module, dm = FakeExplainer(), FakeDataModule()
    trainer = _trainer(tmp_path, max_epochs=2, num_sanity_val_steps=1, callbacks=[cb])
    trainer.fit(module, datamodule=dm)

    subset = select_subset(N_RECORDS, 8, 0)
    assert dm.requested == [subset, subset]  # same subset every epoch; sanity check skipped
    expected = evaluate(
        [prediction_for(i) for i in subset],
        [reference_for(i) for i in subset],
        ("usr", "bertscore"),
        bertscore={"scorer": FakeScorer()},
    )
    logged = trainer.callback_metrics
    for key in ("usr", "bertscore_f1", "bertscore_f1_std", "bertscore_precision", "bertscore_recall"):
        assert logged[f"val/{key}"].item() == pytest.approx(expected[key], abs=1e-6)

    for epoch in (0, 1):
        rows = [
            json.loads(line) for line in (tmp_path / "samples" / f"val_epoch{epoch}.jsonl").read_text().splitlines()
        ]
        assert [r["index"] for r in rows] == subset
        assert rows[0] == {
            "index": subset[0],
            "uid": 100 + subset[0],
            "iid": 200 + subset[0],
            "prediction": prediction_for(subset[0]),
            "reference": reference_for(subset[0]),
        }
    assert not list((tmp_path / "samples").glob(".*.tmp"))  # atomic writes leave no temp files
    csv_text = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "val/bertscore_f1" in csv_text and "val/usr" in csv_text


def test_every_n_epochs_and_validate(tmp_path):
    cb = _callback(every_n_epochs=2)
    module, dm = FakeExplainer(), FakeDataModule()
    trainer = _trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0, callbacks=[cb])
    trainer.fit(module, datamodule=dm)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["val_epoch1.jsonl"]
    trainer.validate(module, datamodule=dm)  # trainer.validate always runs the callback
    assert len(dm.requested) == 2


def test_rejects_module_without_generate(tmp_path):
    class Plain(FakeExplainer):
        generate_explanations = None

    trainer = _trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0, callbacks=[_callback()])
    with pytest.raises(TypeError, match="generate_explanations"):
        trainer.fit(Plain(), datamodule=FakeDataModule())


def test_wandb_table_is_logged_with_max_rows():
    class RecordingWandb(WandbLogger):
        def __init__(self) -> None:  # no wandb run: only record the calls
            self.tables = []

        def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
            self.tables.append((key, columns, data, step))

    logger = RecordingWandb()
    cb = _callback(max_table_rows=2)
    rows = [
        {"index": i, "uid": i, "iid": i, "prediction": prediction_for(i), "reference": reference_for(i)}
        for i in range(5)
    ]
    cb.log_table(SimpleNamespace(loggers=[CSVLogger("unused"), logger], global_step=7), rows)
    (key, columns, data, step) = logger.tables[0]
    assert key == "val/samples" and step == 7
    assert columns == ["index", "uid", "iid", "prediction", "reference"]
    assert len(data) == 2 and data[1][3] == prediction_for(1)


def test_generate_and_score_without_trainer():
    cb = _callback()
    scores, rows = cb.generate_and_score(FakeExplainer().eval(), FakeDataModule())
    assert len(rows) == 8 and 0 < scores["usr"] <= 1
    # metrics are reset after compute: a second run gives the same numbers
    assert cb.generate_and_score(FakeExplainer().eval(), FakeDataModule())[0] == scores


def test_submodule_modes_are_restored(tmp_path):
    class WithFrozen(FakeExplainer):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = torch.nn.Dropout(0.5)

        def on_fit_start(self) -> None:
            self.frozen.eval()  # like a frozen LLM kept in eval mode while the adapter trains

        def on_train_epoch_end(self) -> None:
            assert self.layer.training and not self.frozen.training

    trainer = _trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0, callbacks=[_callback()])
    trainer.fit(WithFrozen(), datamodule=FakeDataModule())


def test_subset_is_drawn_from_the_datamodules_eval_subset(synthetic_dir, tiny_tokenizer):
    """``--data.eval_subset`` bounds the generated records too; without it the draw is the one over all records."""
    from data_modules.explanations import ExplanationDataModule

    small = ExplanationDataModule(str(synthetic_dir), eval_subset=6, tokenizer=tiny_tokenizer)
    small.setup("fit")
    rows = small.subset_rows("val").tolist()
    drawn = ExplanationMetricsCallback(num_samples=16, metrics=["usr"]).subset(small)
    assert sorted(drawn) == sorted(rows) and len(drawn) == 6
    assert ExplanationMetricsCallback(num_samples=4, metrics=["usr"]).subset(small) == [
        rows[i] for i in select_subset(6, 4, 0)
    ]

    full = ExplanationDataModule(str(synthetic_dir), tokenizer=tiny_tokenizer)
    full.setup("fit")
    n = full.num_records("val")
    assert ExplanationMetricsCallback(num_samples=16, metrics=["usr"]).subset(full) == select_subset(n, 16, 0)
