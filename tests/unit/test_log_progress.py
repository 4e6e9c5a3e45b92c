"""LogProgress: plain progress lines in a log file (no carriage returns), and when the stage CLI puts it in place."""

from __future__ import annotations

import io
import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from torch.utils.data import DataLoader, TensorDataset

from callbacks.log_progress import LogProgress
from tests.unit.test_explanation_callback import FakeDataModule, FakeExplainer, _callback
from xrec_pl.errors import ConfigError
from xrec_pl.progress import log_progress_every, log_progress_wanted

STEP_LINE = re.compile(
    r"^\[xrec-pl\] fit: epoch (\d)/2 step (\d+)/(\d+) \(\d+%\) \| global step (\d+) \| ([\d.e-]+) s/step"
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Regression(pl.LightningModule):
    """Six training and two validation batches; logs ``train/loss`` and ``val/loss`` to the progress bar."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        loss = (self.layer(batch[0]) - batch[1]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (self.layer(batch[0]) - batch[1]).pow(2).mean(), prog_bar=True)
        self.log("val/mae", (self.layer(batch[0]) - batch[1]).abs().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _loader(self, n: int) -> DataLoader:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 3, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)

    def train_dataloader(self):
        return self._loader(24)

    def val_dataloader(self):
        return self._loader(8)


def _fit(tmp_path, bar: ProgressBar, module: pl.LightningModule | None = None, **kw) -> pl.Trainer:
    fit_kwargs = kw.pop("fit_kwargs", {})
    callbacks = [bar, *kw.pop("callbacks", [])]
    options = {
        "max_epochs": 2,
        "num_sanity_val_steps": 1,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
    }
    options.update(kw)
    trainer = pl.Trainer(
        accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_model_summary=False, callbacks=callbacks,
        **options,
    )  # fmt: skip
    trainer.fit(module or _Regression(), **fit_kwargs)
    return trainer


def test_every_step_a_plain_line_with_counts_rate_and_metrics(tmp_path, capsys):
    trainer = _fit(tmp_path, LogProgress(every_s=0))
    assert isinstance(trainer.progress_bar_callback, LogProgress)  # Lightning added no bar of its own
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    steps = [STEP_LINE.match(line) for line in lines if STEP_LINE.match(line)]
    # one line per step: epoch e/2, step i/6, the global step counting on, a positive seconds-per-step rate
    assert [(int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in steps] == [
        (e, i, 6, (e - 1) * 6 + i) for e in (1, 2) for i in range(1, 7)
    ]
    assert all(float(m[5]) > 0 for m in steps)
    step_lines = [line for line in lines if STEP_LINE.match(line)]
    assert all("train/loss=" in line and "ETA " in line and "elapsed " in line for line in step_lines)
    assert "val/loss=" in step_lines[-1] and "val/loss=" not in step_lines[0]  # val loss once there is one
    assert lines[0] == "[xrec-pl] fit: start, _Regression"
    assert "[xrec-pl] fit: training from epoch 1/2, 6 steps per epoch | global step 0" in lines
    assert any(line.startswith("[xrec-pl] fit: sanity check done, 1 batches") for line in lines)
    val_done = [line for line in lines if line.startswith("[xrec-pl] fit: validation (epoch ")]
    assert len(val_done) == 2 and all("val/loss=" in line and "val/mae=" in line for line in val_done)
    assert "train/loss=" not in val_done[0]  # an evaluation's line shows its own metrics
    epoch_done = [line for line in lines if " done, 6/6 steps" in line]
    assert [line.split(" done")[0] for line in epoch_done] == ["[xrec-pl] fit: epoch 1/2", "[xrec-pl] fit: epoch 2/2"]
    assert "fit ETA" in epoch_done[0] and "global step 12" in epoch_done[1]
    assert lines[-1].startswith("[xrec-pl] fit: end after 2 epochs | global step 12")
    assert all(line.startswith("[xrec-pl] ") for line in lines)


def test_interval_limits_the_periodic_lines(tmp_path, capsys):
    _fit(tmp_path, LogProgress(every_s=3600))
    lines = capsys.readouterr().err.splitlines()
    assert not any(STEP_LINE.match(line) for line in lines)  # no periodic line within the hour
    assert sum(" done, 6/6 steps" in line for line in lines) == 2  # but every epoch's end
    assert lines[-1].startswith("[xrec-pl] fit: end after 2 epochs")


def test_an_epoch_resumed_in_its_middle_is_counted_on(tmp_path, capsys):
    """Lightning calls no on_train_epoch_start for an epoch resumed mid-way: its steps and end still get lines."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=9, save_top_k=-1, filename="{step}")
    _fit(tmp_path, LogProgress(every_s=3600), num_sanity_val_steps=0, callbacks=[saver])
    capsys.readouterr()
    _fit(
        tmp_path,
        LogProgress(every_s=0),
        num_sanity_val_steps=0,
        fit_kwargs={"ckpt_path": tmp_path / "ckpt" / "step=9.ckpt"},
    )
    lines = capsys.readouterr().err.splitlines()
    assert "[xrec-pl] fit: training from epoch 2/2, 6 steps per epoch | global step 9" in lines
    steps = [(int(m[1]), int(m[2]), int(m[4])) for m in map(STEP_LINE.match, lines) if m]
    assert steps == [(2, 4, 10), (2, 5, 11), (2, 6, 12)]
    assert any(line.startswith("[xrec-pl] fit: epoch 2/2 done, 6/6 steps | global step 12") for line in lines)


def test_disabled_bar_and_explicit_stream(tmp_path, capsys):
    stream = io.StringIO()
    bar = LogProgress(every_s=0, stream=stream)
    bar.disable()  # what Lightning does on ranks other than zero
    _fit(tmp_path, bar)
    assert stream.getvalue() == "" and "[xrec-pl]" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="every_s"):
        LogProgress(every_s=-1)


def test_test_and_predict_stages(tmp_path, capsys):
    class WithTest(_Regression):
        def test_step(self, batch, batch_idx):
            self.log("test/loss", (self.layer(batch[0]) - batch[1]).pow(2).mean())

        def predict_step(self, batch, batch_idx):
            return self.layer(batch[0])

        def test_dataloader(self):
            return self._loader(12)

        def predict_dataloader(self):
            return self._loader(12)

    stream = io.StringIO()
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[LogProgress(every_s=0, stream=stream)])
    trainer.test(WithTest())
    trainer.predict(WithTest())
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[xrec-pl] test: start, 3 batches"
    assert lines[1].startswith("[xrec-pl] test batch 1/3 (33%) | ") and " s/step" in lines[1]
    assert lines[3].startswith("[xrec-pl] test batch 3/3 (100%)")
    assert lines[4].startswith("[xrec-pl] test done, 3 batches") and "test/loss=" in lines[4]
    assert lines[5] == "[xrec-pl] predict: start, 3 batches"
    assert lines[-1].startswith("[xrec-pl] predict done, 3 batches")


def test_generation_in_a_validation_callback_reports_records(tmp_path, capsys):
    trainer = _fit(
        tmp_path, LogProgress(every_s=0), FakeExplainer(), max_epochs=1, num_sanity_val_steps=0,
        callbacks=[_callback(batch_size=3)], fit_kwargs={"datamodule": FakeDataModule()},
    )  # fmt: skip
    assert trainer.callback_metrics["val/usr"] > 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "val generation" in line]
    # 8 records in batches of 3: after each batch, with a per-record rate
    assert [line.split(" | ")[0] for line in lines] == [
        "[xrec-pl] fit: val generation 3/8 records (38%)",
        "[xrec-pl] fit: val generation 6/8 records (75%)",
        "[xrec-pl] fit: val generation 8/8 records (100%)",
    ]
    assert all(" s/record" in line for line in lines)


def test_generation_progress_is_optional():
    calls: list[tuple[int, int]] = []
    cb = _callback(batch_size=5)
    cb.generate_and_score(FakeExplainer().eval(), FakeDataModule(), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 8), (5, 8), (8, 8)]
    assert cb.generate_and_score(FakeExplainer().eval(), FakeDataModule())[1]  # no progress given: still runs


@pytest.mark.parametrize(
    ("env", "tty", "wanted"),
    [
        ({}, False, True),  # a log file / pipe
        ({}, True, False),  # a terminal: Lightning's bar, as before
        ({"CI": "true"}, False, False),  # CI logs stay quiet
        ({"XREC_PROGRESS": "1"}, False, False),  # bars forced: Lightning's bar
        ({"XREC_PROGRESS": "0"}, False, False),
        ({"XREC_PROGRESS": "log", "CI": "true"}, False, True),  # lines forced, CI too
        ({"XREC_PROGRESS": "log"}, True, True),
    ],
)
def test_log_progress_wanted(monkeypatch, env, tty, wanted):
    for name in ("CI", "XREC_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert log_progress_wanted(_Tty() if tty else io.StringIO()) is wanted


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("XREC_PROGRESS_EVERY", raising=False)
    assert log_progress_every() == 60.0
    monkeypatch.setenv("XREC_PROGRESS_EVERY", "2.5")
    assert log_progress_every() == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("XREC_PROGRESS_EVERY", bad)
        with pytest.raises(ConfigError, match="XREC_PROGRESS_EVERY"):
            log_progress_every()
