"""ExplanationDataModule: the XRec text records, tokenised once, for stage 2.

Loaders and their batches (``B`` rows, ``T`` the longest row of the batch):

============  ===============================  =======  =========================================================
loader        split                            padding  keys
============  ===============================  =======  =========================================================
train         ``trn`` (length-bucketed)        right    input_ids, attention_mask, labels, user_pos, item_pos,
                                                        user_id, item_id, index
val / test    ``val`` / ``tst``                right    the train keys + ``reference`` (list[str])
predict       ``predict_split`` (``tst``)      left     input_ids, attention_mask, user_pos, item_pos, user_id,
generation    any split, optional indices      left     item_id, index, reference (prompt only, no labels)
============  ===============================  =======  =========================================================

``input_ids``/``attention_mask``/``labels`` are ``(B, T)`` int64 (labels ``-100`` on prompt and padding);
``user_pos``/``item_pos`` ``(B,)`` are the reserved-token positions *after* padding; ``user_id``/``item_id``/``index``
``(B,)`` (``index`` = row of the record in its split file). Val/test batches are teacher-forced (``val/loss``,
``test/loss``); generated text for metrics comes from :meth:`ExplanationDataModule.generation_dataloader`.

Train order: with ``bucket_by_length`` the records are sorted by length (ties broken at random per epoch), cut into
buckets of ``batch_size`` (``batch_size * world_size`` under DDP, split into one contiguous slice per rank so that
every rank sees similar lengths), and the bucket order is shuffled from ``(seed, epoch)``. The sampler is a
:class:`~xrec_pl.data.sampler.ResumableSampler` (a ``DistributedSampler``, so Lightning leaves it in place) inside a
:class:`~xrec_pl.data.sampler.ResumableDataLoader`: a run killed mid-epoch resumes at the next unseen batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from data_modules.batching import BucketSampler, ListDataset, PadCollator
from xrec_pl.data.io import read_para_dict, read_records
from xrec_pl.data.prompts import Domain, PromptBuilder, PromptStyle
from xrec_pl.data.sampler import ResumableDataLoader, ResumableSampler
from xrec_pl.utils import epoch_seed

__all__ = ["ExplanationDataModule"]

_SPLIT_ALIASES = {"trn": "trn", "train": "trn", "val": "val", "validation": "val", "tst": "tst", "test": "tst"}


def _split_name(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; use one of trn/train, val, tst/test") from None


class ExplanationDataModule(pl.LightningDataModule):
    """Tokenised XRec records for the explainer (stage 2).

    The tokenizer comes from the LightningModule (``trainer.lightning_module.tokenizer``) in :meth:`setup`, so the
    prompt is always built with the tokenizer of the LLM being trained; pass ``tokenizer`` to use the module alone.
    Each split is read and tokenised once (per process) on first use.

    Args:
        data_dir: XRec data folder (``trn/val/tst`` records, ``para_dict``).
        batch_size: training batch size per process.
        eval_batch_size: batch size of the val/test/predict/generation loaders.
        style: prompt style, ``"chat"`` (tokenizer chat template) or ``"xrec"`` (reference layout).
        domain: ``"books"`` or ``"business"`` (system sentence and item noun).
        profiles: include user/item profiles in the prompt (``False``: title only).
        max_length: longest sequence in tokens; longer records get their profiles truncated (see
            ``xrec_pl.data.prompts``).
        num_workers: DataLoader worker processes.
        seed: seed of the training order (epoch ``e`` uses ``(seed, e)``).
        bucket_by_length: batch records of similar length together (less padding); otherwise a plain shuffle.
        train_subset: use only this many training records (seeded random choice; ``None``: all).
        eval_subset: use only this many val/test/predict records (seeded random choice; ``None``: all).
        predict_split: split used by ``predict`` (``"tst"``, ``"val"`` or ``"trn"``).
        tokenizer: tokenizer to use instead of the LightningModule's (direct use, tests).
        chat_template: ``chat`` style: ``None`` (the tokenizer's own; ChatML with a warning where it has none),
            ``"chatml"`` or a Jinja template string.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        style: PromptStyle = "chat",
        domain: Domain = "books",
        profiles: bool = True,
        max_length: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        bucket_by_length: bool = True,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        predict_split: str = "tst",
        tokenizer: Any = None,
        chat_template: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.style = style
        self.domain = domain
        self.profiles = profiles
        self.max_length = max_length
        self.num_workers = num_workers
        self.seed = seed
        self.bucket_by_length = bucket_by_length
        self.train_subset = train_subset
        self.eval_subset = eval_subset
        self.predict_split = _split_name(predict_split)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.builder: PromptBuilder | None = None
        self._sizes: tuple[int | None, int | None] | None = None
        self._table_sizes: tuple[int | None, int | None] = (None, None)
        self._records: dict[str, Any] = {}
        self._fixed_rows: dict[str, np.ndarray] = {}
        self._teacher: dict[str, list[dict[str, Any]]] = {}
        self._prompts: dict[tuple[str, int], dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------------ sizes
    def _para_sizes(self) -> tuple[int | None, int | None]:
        if self._sizes is None:
            if any((self.data_dir / f"para_dict.{ext}").is_file() for ext in ("json", "pickle")):
                para = read_para_dict(self.data_dir)
                self._sizes = (para["user_num"], para["item_num"])
            else:
                self._sizes = (None, None)
        return self._sizes

    @property
    def num_users(self) -> int | None:
        """Number of users of the dataset (``para_dict``), ``None`` without one."""
        return self._para_sizes()[0]

    @property
    def num_items(self) -> int | None:
        """Number of items of the dataset (``para_dict``), ``None`` without one."""
        return self._para_sizes()[1]

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Take the tokenizer (and embedding-table sizes) from the LightningModule and build the prompt builder."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = self.tokenizer
        if tokenizer is None and module is not None:
            tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "ExplanationDataModule needs a tokenizer: attach it to a LightningModule with a `tokenizer` "
                "attribute (ExplainerModule) or pass tokenizer=..."
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; load the LLM with load_frozen_llm (it adds one)")
        if self.builder is None or self.builder.tokenizer is not tokenizer:
            self.tokenizer = tokenizer
            self.builder = PromptBuilder(
                tokenizer, self.style, self.domain, self.profiles, self.max_length, chat_template=self.chat_template
            )
            self._teacher.clear()
            self._prompts.clear()
        # ids must index the embedding tables the module holds (fall back to the dataset's own sizes)
        para_users, para_items = self._para_sizes()
        table_users = getattr(module, "num_users", None) if module is not None else None
        table_items = getattr(module, "num_items", None) if module is not None else None
        self._table_sizes = (table_users or para_users, table_items or para_items)
        if stage in ("fit", None):
            self._teacher_items("trn")
            self._teacher_items("val")
        elif stage == "validate":
            self._teacher_items("val")
        elif stage == "test":
            self._teacher_items("tst")
        elif stage == "predict":
            self._prompt_items(self.predict_split, None)

    def split_records(self, split: str) -> Any:
        """All records of ``split`` (``"trn"``, ``"val"`` or ``"tst"``) as a DataFrame, read and checked once."""
        if split not in self._records:
            n_users, n_items = self._table_sizes
            self._records[split] = read_records(self.data_dir, split, num_users=n_users, num_items=n_items)
        return self._records[split]

    def subset_rows(self, split: str) -> np.ndarray:
        """Row numbers of ``split`` the loaders use: the rows set by :meth:`use_rows`, else the seeded subset
        (``train_subset`` / ``eval_subset``), else every row. ``split``: ``trn``/``train``, ``val``, ``tst``/``test``."""
        split = _split_name(split)
        if split in self._fixed_rows:
            return self._fixed_rows[split]
        n = len(self.split_records(split))
        limit = self.train_subset if split == "trn" else self.eval_subset
        if limit is None or limit >= n:
            return np.arange(n)
        if limit < 1:
            raise ValueError(f"{'train' if split == 'trn' else 'eval'}_subset must be positive, got {limit}")
        rng = np.random.default_rng(epoch_seed(self.seed, 0, stream=1 if split == "trn" else 2))
        return np.sort(rng.choice(n, size=limit, replace=False))

    def use_rows(self, split: str, rows: list[int]) -> None:
        """Use exactly these row numbers of ``split`` instead of the seeded subset (benchmarks pick their own rows)."""
        self._fixed_rows[split] = np.asarray(rows, dtype=np.int64)
        self._teacher.pop(split, None)

    def record(self, split: str, row: int) -> dict[str, Any]:
        """Record ``row`` of ``split`` as a dict of its columns."""
        return self.split_records(split).iloc[int(row)].to_dict()

    @property
    def prompt_builder(self) -> PromptBuilder:
        """The prompt builder made in :meth:`setup` (``RuntimeError`` before it)."""
        if self.builder is None:
            raise RuntimeError("ExplanationDataModule.setup() has not run (no tokenizer yet)")
        return self.builder

    def _teacher_items(self, split: str) -> list[dict[str, Any]]:
        if split not in self._teacher:
            builder = self.prompt_builder
            items = []
            for row in self.subset_rows(split):
                rec = self.record(split, row)
                enc = builder.encode_train(rec)
                enc.update(
                    user_id=int(rec["uid"]), item_id=int(rec["iid"]), index=int(row), reference=str(rec["explanation"])
                )
                items.append(enc)
            self._teacher[split] = items
        return self._teacher[split]

    def _prompt_items(self, split: str, indices: list[int] | None) -> list[dict[str, Any]]:
        builder = self.prompt_builder
        n = len(self.split_records(split))
        rows = self.subset_rows(split) if indices is None else np.asarray(list(indices), dtype=np.int64)
        bad = rows[(rows < 0) | (rows >= n)]
        if bad.size:
            raise IndexError(f"{split}: record index {int(bad[0])} outside [0, {n})")
        items = []
        for row in rows.tolist():
            key = (split, row)
            if key not in self._prompts:
                rec = self.record(split, row)
                enc = builder.encode_prompt(rec)
                enc.update(
                    user_id=int(rec["uid"]), item_id=int(rec["iid"]), index=row, reference=str(rec["explanation"])
                )
                self._prompts[key] = enc
            items.append(self._prompts[key])
        return items

    # ------------------------------------------------------------------------------------------------ loaders
    @property
    def pad_id(self) -> int:
        """The tokenizer's pad token id (after :meth:`setup`)."""
        return int(self.prompt_builder.tokenizer.pad_token_id)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def train_dataloader(self) -> ResumableDataLoader:
        items = [{k: v for k, v in it.items() if k != "reference"} for it in self._teacher_items("trn")]
        dataset = ListDataset(items)
        collate = PadCollator(self.pad_id, side="right")
        if self.bucket_by_length:
            sampler = BucketSampler([len(it["input_ids"]) for it in items], self.batch_size, seed=self.seed)
            return ResumableDataLoader(
                dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate, **self._loader_kwargs()
            )
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            collate_fn=collate,
            **self._loader_kwargs(),
        )

    def _eval_loader(
        self, items: list[dict[str, Any]], side: str, batch_size: int | None = None, shard: bool = True
    ) -> DataLoader:
        # longest first: similar lengths share a batch and a too-long batch fails at once, not at the end
        items = sorted(items, key=lambda it: -len(it["input_ids"]))
        dataset = ListDataset(items)
        # under DDP each record goes to exactly one rank (strided, no padding duplicates), so summed metrics are exact
        sampler = ResumableSampler(dataset, shuffle=False, pad=False) if shard else None
        return DataLoader(
            dataset,
            batch_size=batch_size or self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=PadCollator(self.pad_id, side=side),
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._teacher_items("val"), "right")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._teacher_items("tst"), "right")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self._prompt_items(self.predict_split, None), "left")

    def generation_dataloader(
        self, split: str = "val", indices: list[int] | None = None, batch_size: int | None = None
    ) -> DataLoader:
        """Left-padded prompt-only batches for generation (metrics callbacks, predict).

        Args:
            split: ``"val"``, ``"test"``/``"tst"`` or ``"train"``/``"trn"``.
            indices: rows of the split file to use (the batch key ``index``); ``None``: the ``eval_subset`` (or all).
            batch_size: defaults to ``eval_batch_size``.

        Returns:
            A DataLoader (longest prompts first) whose batches carry ``reference`` (list[str]).
        """
        # not sharded: callers pass each rank's own indices
        return self._eval_loader(self._prompt_items(_split_name(split), indices), "left", batch_size, shard=False)

    def num_records(self, split: str) -> int:
        """Number of records in a split file (before any subset)."""
        return len(self.split_records(_split_name(split)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_dir={os.fspath(self.data_dir)!r}, style={self.style!r})"
