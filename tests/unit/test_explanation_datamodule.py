"""ExplanationDataModule: batch keys, padding sides, positions, bucketing, resumable order, id checks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_modules.batching import BucketSampler
from data_modules.explanations import ExplanationDataModule
from xrec_pl.data.prompts import IGNORE_INDEX
from xrec_pl.errors import DataError

TRAIN_KEYS = {"input_ids", "attention_mask", "labels", "user_pos", "item_pos", "user_id", "item_id", "index"}


@pytest.fixture
def dm(synthetic_dir, tiny_tokenizer):
    module = ExplanationDataModule(str(synthetic_dir), batch_size=4, eval_batch_size=3, tokenizer=tiny_tokenizer)
    module.setup("fit")
    return module


def _reserved(tok):
    return tok.convert_tokens_to_ids(["<USER_EMBED>", "<ITEM_EMBED>"])


def test_train_batches_right_padded(dm, tiny_tokenizer):
    user_tok, item_tok = _reserved(tiny_tokenizer)
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == TRAIN_KEYS
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.dtype == torch.long
        assert bool((mask[:, 0] == 1).all())  # right padding: every row starts with a real token
        assert bool((labels[mask == 0] == IGNORE_INDEX).all())
        assert bool((ids[mask == 0] == tiny_tokenizer.pad_token_id).all())
        rows = torch.arange(ids.shape[0])
        assert bool((ids[rows, batch["user_pos"]] == user_tok).all())
        assert bool((ids[rows, batch["item_pos"]] == item_tok).all())
        # labelled tokens end with EOS in every row (chat target)
        last = mask.sum(1) - 1
        assert bool((labels[rows, last] == tiny_tokenizer.eos_token_id).all())
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(dm.num_records("trn")))


def test_generation_batches_left_padded_with_references(dm, tiny_tokenizer):
    user_tok, item_tok = _reserved(tiny_tokenizer)
    loader = dm.generation_dataloader("val", indices=[4, 0, 7, 2])
    batches = list(loader)
    assert sum(len(b["reference"]) for b in batches) == 4
    records = dm.split_records("val")
    for batch in batches:
        assert "labels" not in batch
        assert {"reference", "user_id", "item_id", "index"} <= set(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert bool((mask[:, -1] == 1).all())  # left padding: every row ends with its last prompt token
        rows = torch.arange(ids.shape[0])
        assert bool((ids[rows, batch["user_pos"]] == user_tok).all())
        assert bool((ids[rows, batch["item_pos"]] == item_tok).all())
        for j, idx in enumerate(batch["index"].tolist()):
            assert batch["reference"][j] == records.iloc[idx]["explanation"]
            assert batch["user_id"][j] == records.iloc[idx]["uid"]
        # the prompt ends with the generation prompt of the chat template
        assert tiny_tokenizer.decode(ids[0][mask[0] == 1]).endswith("<|im_start|>assistant\n")
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 2, 4, 7]


def test_val_test_predict_loaders(dm, tiny_tokenizer):
    val = next(iter(dm.val_dataloader()))
    assert TRAIN_KEYS | {"reference"} == set(val)
    assert bool((val["attention_mask"][:, 0] == 1).all())
    dm.setup("test")
    assert dm.test_dataloader().dataset.items[0]["labels"]
    dm.setup("predict")
    pred = next(iter(dm.predict_dataloader()))
    assert "labels" not in pred and bool((pred["attention_mask"][:, -1] == 1).all())


def test_bucket_sampler_deterministic_per_epoch_and_bucketed():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=103)
    s = BucketSampler(lengths, batch_size=8, seed=3)
    a0, a0b = s.indices(0), BucketSampler(lengths, batch_size=8, seed=3).indices(0)
    assert torch.equal(a0, a0b)
    assert not torch.equal(a0, s.indices(1))
    assert not torch.equal(a0, BucketSampler(lengths, batch_size=8, seed=4).indices(0))
    assert sorted(a0.tolist()) == list(range(103))
    # batches of consecutive indices are length buckets: far less spread than random batches
    spread = [np.ptp(lengths[a0[i : i + 8].numpy()]) for i in range(0, 96, 8)]
    assert max(spread) < 40


def test_bucket_sampler_ddp_shards():
    lengths = np.arange(50) % 17
    shards = [BucketSampler(lengths, batch_size=4, seed=0, num_replicas=2, rank=r) for r in range(2)]
    parts = [s.indices(2).tolist() for s in shards]
    assert len(parts[0]) == len(parts[1]) == len(shards[0]) == 25
    assert set(parts[0]) | set(parts[1]) == set(range(50))
    # the same step on both ranks holds neighbouring lengths
    for step in range(6):
        both = [lengths[p[step * 4 : step * 4 + 4]] for p in parts]
        assert abs(int(np.median(both[0])) - int(np.median(both[1]))) <= 6


def test_train_loader_resumes_mid_epoch(dm):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    full = [b["index"].tolist() for b in loader]
    loader.sampler.set_epoch(1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = [b["index"].tolist() for b in resumed]
    assert rest == full[3:]


def test_ids_checked_against_the_module_tables(synthetic_dir, tiny_tokenizer):
    dm = ExplanationDataModule(str(synthetic_dir))
    dm.trainer = SimpleNamespace(
        lightning_module=SimpleNamespace(tokenizer=tiny_tokenizer, num_users=2, num_items=None)
    )
    with pytest.raises(DataError, match=r"trn\.\w+: .*'uid' value\(s\) outside \[0, 2\)"):
        dm.setup("fit")


def test_needs_a_tokenizer(synthetic_dir):
    with pytest.raises(ValueError, match="tokenizer"):
        ExplanationDataModule(str(synthetic_dir)).setup("fit")


def test_subsets_and_sizes(synthetic_dir, tiny_tokenizer):
    dm = ExplanationDataModule(str(synthetic_dir), train_subset=10, eval_subset=4, tokenizer=tiny_tokenizer)
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 10
    assert len(dm.val_dataloader().dataset) == 4
    assert dm.num_users == 60 and dm.num_items == 50


def test_use_rows_replaces_the_seeded_subset(dm):
    first = [int(b) for batch in dm.train_dataloader() for b in batch["index"].tolist()]
    assert sorted(first) == list(range(dm.num_records("trn")))
    dm.use_rows("trn", [5, 1, 3])
    assert dm.subset_rows("trn").tolist() == [5, 1, 3]
    assert sorted(int(b) for batch in dm.train_dataloader() for b in batch["index"].tolist()) == [1, 3, 5]
    assert dm.record("trn", 3) == dm.split_records("trn").iloc[3].to_dict()
    assert dm.pad_id == dm.prompt_builder.tokenizer.pad_token_id
