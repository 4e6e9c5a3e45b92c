"""RNGState, PreemptionCheckpoint, PeriodicCheckpoint and CheckpointCheck on a tiny in-process model."""

from __future__ import annotations

import io
import os
import signal
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.resumption import (
    CheckpointCheck,
    PeriodicCheckpoint,
    PreemptionCheckpoint,
    RNGState,
    _parse_interval,
    capture_rng,
    restore_rng,
)
from xrec_pl.errors import DataError


class Tiny(pl.LightningModule):
    """Draws from the global generator in training (recorded) and, a lot, in validation."""

    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGUSR1) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.draws: list[float] = []
        self.signal_at, self.signum = signal_at, signum

    def training_step(self, batch, batch_idx):
        noise = torch.rand(3)
        self.draws.append(float(noise.sum()))
        if self.global_step == self.signal_at:
            os.kill(os.getpid(), self.signum)
        return ((self.w - noise) ** 2).sum() + batch.sum() * 0

    def validation_step(self, batch, batch_idx):
        torch.rand(100)  # e.g. "redrawn" embeddings, generation

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    return pl.Trainer(
        accelerator="cpu",
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def test_capture_restore_survives_weights_only_checkpoint():
    state = capture_rng()
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"]
    expected = torch.rand(4), __import__("random").random()
    restore_rng(loaded)
    assert torch.equal(torch.rand(4), expected[0]) and __import__("random").random() == expected[1]


@pytest.mark.parametrize("with_rng_state", [True, False])
def test_validation_does_not_shift_the_training_stream(tmp_path, with_rng_state):
    def draws(val: bool) -> list[float]:
        pl.seed_everything(0)
        module = Tiny()
        extra = {} if val else {"limit_val_batches": 0}
        _trainer(tmp_path, [RNGState()] if with_rng_state else [], num_sanity_val_steps=0, **extra).fit(module)
        return module.draws

    same = draws(val=True) == draws(val=False)
    assert same is with_rng_state  # without the callback, validation's draws change later training batches


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_saves_last_at_the_current_step(tmp_path, signum):
    module = Tiny(signal_at=2, signum=signum)  # the signal arrives during the third step
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=0)
    with pytest.raises(SIGTERMException):
        _trainer(tmp_path, [ckpt, RNGState(), PreemptionCheckpoint()], limit_val_batches=0).fit(module)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3 and len(module.draws) == 3
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.default_int_handler) or signum == signal.SIGTERM


def test_periodic_checkpoint_writes_last_into_the_run_checkpoint_folder(tmp_path):
    best = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor=None, save_top_k=0)
    periodic = PeriodicCheckpoint(every_n_train_steps=3)
    _trainer(tmp_path, [best, periodic], max_epochs=1, limit_val_batches=0).fit(Tiny())
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert (
        _parse_interval("0:30:00")
        == timedelta(minutes=30)
        == PeriodicCheckpoint(train_time_interval="30:00")._train_time_interval
    )
    with pytest.raises(ValueError, match="every_n_train_steps or train_time_interval"):
        PeriodicCheckpoint()


def test_checkpoint_check_refuses_damaged_and_changed(tmp_path):
    ckpt = tmp_path / "a.ckpt"
    trainer = _trainer(tmp_path, [], max_steps=2, limit_val_batches=0)
    trainer.fit(Tiny())
    trainer.save_checkpoint(ckpt)
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.ckpt: unreadable checkpoint"):
        _trainer(tmp_path, [CheckpointCheck()], max_steps=4).fit(Tiny(), ckpt_path=tmp_path / "cut.ckpt")

    class Wider(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(5))

    with pytest.raises(DataError, match="w has shape"):
        _trainer(tmp_path, [CheckpointCheck()], max_steps=4).fit(Wider(), ckpt_path=ckpt)


def test_resume_may_change_decoding_but_not_training():
    """Decoding settings only shape what validation/predict write, so a resume may change them; the lr may not."""
    from callbacks.resumption import RESUME_MAY_CHANGE, _changed

    saved = {"lr": 5e-4, "no_repeat_ngram_size": None, "penalty_scope": None, "do_sample": None}
    now = {"lr": 5e-4, "no_repeat_ngram_size": 3, "penalty_scope": "all", "do_sample": True}
    assert _changed(saved, now, "model", RESUME_MAY_CHANGE) == []
    assert _changed(saved, {**now, "lr": 1e-3}, "model", RESUME_MAY_CHANGE) == ["model.lr: 0.0005 -> 0.001"]
