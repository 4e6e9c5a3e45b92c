"""ResumableSampler / ResumableDataLoader: determinism, DDP sharding, exact mid-epoch resume (also under Lightning)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.data import Dataset

from xrec_pl.data.sampler import ResumableDataLoader, ResumableSampler
from xrec_pl.utils import epoch_seed


class _Range(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


class _EpochAware(_Range):
    """Items depend on the epoch, like re-drawn negatives."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, self.epoch])


def _batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


def test_epoch_seed_distinct():
    assert epoch_seed(0, 1) != epoch_seed(1, 0)
    assert epoch_seed(3, 4) == epoch_seed(3, 4)


def test_permutation_deterministic_per_seed_epoch():
    a, b = ResumableSampler(50, seed=7), ResumableSampler(50, seed=7)
    for e in range(3):
        a.set_epoch(e)
        b.set_epoch(e)
        assert list(a) == list(b)
        assert sorted(a) == list(range(50))
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(ResumableSampler(50, seed=8)) != first
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (2, 3)])
def test_ddp_shards(n, world, drop_last):
    shards = [list(ResumableSampler(n, seed=1, num_replicas=world, rank=r, drop_last=drop_last)) for r in range(world)]
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1  # equal length on every rank
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(flat) == (n // world) * world and len(set(flat)) == len(flat)
    else:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("consumed", [0, 1, 3, 4])
def test_resume_yields_exactly_the_remaining_batches(num_workers, consumed):
    def make():
        return ResumableDataLoader(_EpochAware(37), batch_size=8, shuffle=True, seed=3, num_workers=num_workers)

    full = make()
    full.sampler.set_epoch(2)
    expected = _batches(full)
    assert len(expected) == len(full) == 5

    first = make()
    first.sampler.set_epoch(2)
    it = iter(first)
    head = [next(it).tolist() for _ in range(consumed)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches_consumed"] == consumed

    resumed = make()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # what Lightning does after loading
    tail = _batches(resumed)
    assert head + tail == expected
    # the next epoch starts from the beginning again
    resumed.sampler.set_epoch(3)
    assert len(_batches(resumed)) == 5


def test_state_is_dropped_when_epoch_moves_on():
    loader = ResumableDataLoader(_Range(20), batch_size=5, shuffle=True)
    loader.load_state_dict({"epoch": 0, "batches_consumed": 4, "batch_size": 5, "num_replicas": 1})
    loader.sampler.set_epoch(1)
    assert len(_batches(loader)) == 4


def test_generic_sampler_fallback_skips_by_drawing():
    loader = ResumableDataLoader(_Range(10), batch_size=3, sampler=list(range(9, -1, -1)))
    loader.load_state_dict({"epoch": 0, "batches_consumed": 2, "batch_size": 3, "num_replicas": 1})
    assert _batches(loader) == [[3, 2, 1], [0]]


def test_persistent_workers_refused_for_epoch_aware_dataset():
    with pytest.raises(ValueError, match="persistent_workers"):
        ResumableDataLoader(_EpochAware(4), batch_size=2, num_workers=1, persistent_workers=True)


# ---------------------------------------------------------------------------------------------------------------------
# Under Lightning: kill mid-epoch, resume from the checkpoint, compare the batches seen with an uninterrupted run.


class _Killed(RuntimeError):
    pass


def _lightning_run(tmp_path, num_workers: int, kill_at: int | None, ckpt_path=None) -> list[list[int]]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    seen: list[list[int]] = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append(batch[:, 0].tolist() + [int(batch[0, 1])])  # indices + epoch of the dataset
            if kill_at is not None and self.global_step == kill_at:
                raise _Killed
            return (self.w * batch[:, 0].float()).sum() * 0.0 + self.w.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return ResumableDataLoader(_EpochAware(21), batch_size=4, shuffle=True, seed=5, num_workers=num_workers)

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
    )
    with contextlib.suppress(_Killed):
        trainer.fit(Module(), ckpt_path=ckpt_path)
    return seen


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("kill_at", [3, 6, 8])  # mid-epoch, first batch of epoch 1, mid epoch 1
def test_lightning_mid_epoch_resume_is_exact(tmp_path, num_workers, kill_at):
    straight = _lightning_run(tmp_path / "a", num_workers, kill_at=None)
    assert len(straight) == 18  # 3 epochs x 6 batches
    before = _lightning_run(tmp_path / "b", num_workers, kill_at=kill_at)
    # the killed step's batch was not consumed: the last checkpoint is after step kill_at - 1
    before = before[:-1]
    last = tmp_path / "b" / f"step={kill_at}.ckpt"
    assert last.exists()
    after = _lightning_run(tmp_path / "c", num_workers, kill_at=None, ckpt_path=str(last))
    assert before + after == straight
