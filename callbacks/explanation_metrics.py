"""Generate explanations for a fixed validation subset and log explanation metrics (+ a sample table).

At the end of every ``every_n_epochs``-th validation epoch (and on every ``trainer.validate``), the callback
draws -- once, from ``seed`` -- ``num_samples`` record indices of the split, gives each rank its shard
(padded like a ``DistributedSampler``, the padding recognised later by sample id), and calls only
``pl_module.generate_explanations(batch) -> list[str]`` on the datamodule's
``generation_dataloader(split=..., indices=shard)`` batches. The metrics gather per-sample tensors across ranks;
every rank logs the same scalars (``val/bertscore_f1``, ``val/bertscore_f1_std``, ``val/usr``, ...). The text
rows are gathered to rank zero with ``all_gather_object`` (table only), which writes
``samples/val_epoch{E}.jsonl`` (``index, uid, iid, prediction, reference``) into ``trainer.default_root_dir``
and, when a ``WandbLogger`` is attached, a ``wandb.Table`` of the first ``max_table_rows`` rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from xrec_pl.utils import write_jsonl

log = logging.getLogger(__name__)

_SPLIT_PREFIX = {"val": "val", "validation": "val", "tst": "test", "test": "test", "trn": "train", "train": "train"}


@runtime_checkable
class ExplanationGenerator(Protocol):
    """What the callback needs from the LightningModule."""

    def generate_explanations(self, batch: dict[str, Any]) -> list[str]: ...


def select_subset(num_records: int, num_samples: int, seed: int) -> list[int]:
    """``num_samples`` distinct record indices (sorted), drawn from ``seed``; all records if there are fewer."""
    if num_samples >= num_records:
        return list(range(num_records))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_records, generator=g)[:num_samples].tolist())


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s strided share of ``indices``, padded (by wrapping) to equal length on every rank."""
    indices = list(indices)
    if world_size <= 1 or not indices:
        return indices
    total = -(-len(indices) // world_size) * world_size
    padded = indices + [indices[i % len(indices)] for i in range(total - len(indices))]
    return padded[rank::world_size]


def _as_list(value: Any, n: int) -> list[Any]:
    if value is None:
        return [None] * n
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().flatten().tolist()
    return list(value)


class ExplanationMetricsCallback(Callback):
    """Explanation metrics on a fixed, seeded subset of a split, every N validation epochs.

    Args:
        every_n_epochs: run after validation epochs ``N-1, 2N-1, ...`` (always on ``trainer.validate``).
        num_samples: size of the subset (all records if the split is smaller).
        seed: seed of the subset draw; the subset is the same every epoch.
        metrics: metric names for :func:`xrec_pl.metrics.build_metric` (``usr``, ``bertscore``, ``bleurt``,
            ``bartscore``, ``llm_judge``).
        metric_kwargs: per-metric constructor options, e.g. ``{"bertscore": {"batch_size": 32}}``.
        split: split to generate for (``val``; ``test`` works too). Keys are logged as ``{split}/{name}``.
        batch_size: generation batch size (``None``: the datamodule's default).
        max_table_rows: rows in the W&B table (the JSONL file gets all rows).
        write_samples: write ``samples/{split}_epoch{E}.jsonl`` on rank zero.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 32,
        seed: int = 0,
        metrics: Sequence[str] = ("usr", "bertscore"),
        metric_kwargs: dict[str, dict[str, Any]] | None = None,
        split: str = "val",
        batch_size: int | None = None,
        max_table_rows: int = 32,
        write_samples: bool = True,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.seed = seed
        self.metric_names = tuple(metrics)
        self.metric_kwargs = dict(metric_kwargs or {})
        self.split = split
        self.prefix = _SPLIT_PREFIX.get(split, split)
        self.batch_size = batch_size
        self.max_table_rows = max_table_rows
        self.write_samples = write_samples
        self._metrics: dict[str, Any] | None = None
        self._subset: list[int] | None = None
        self.last_scores: dict[str, float] = {}

    # -- pieces (usable without a Trainer) ------------------------------------------------------------------
    def build_metrics(self, device: str | torch.device | None = None) -> dict[str, Any]:
        """The metric objects, built once (scorer backends load lazily on their first update).

        ``device`` (the module's) becomes the default backbone device of the model-based metrics, so under
        multi-GPU DDP each rank scores on its own GPU.
        """
        if self._metrics is None:
            from xrec_pl.metrics import build_metric

            self._metrics = {}
            for name in self.metric_names:
                kwargs = dict(self.metric_kwargs.get(name, {}))
                if device is not None and name in ("bertscore", "bleurt", "bartscore") and "scorer" not in kwargs:
                    kwargs.setdefault("device", str(device))
                self._metrics[name] = build_metric(name, **kwargs)
        return self._metrics

    def subset(self, datamodule: Any) -> list[int]:
        """The fixed subset of record indices for this split (drawn once)."""
        if self._subset is None:
            if hasattr(datamodule, "subset_rows"):  # the rows the DataModule evaluates on (its ``eval_subset``)
                rows = [int(r) for r in datamodule.subset_rows(self.split)]
                self._subset = [rows[i] for i in select_subset(len(rows), self.num_samples, self.seed)]
                return self._subset
            if hasattr(datamodule, "num_records"):
                n = int(datamodule.num_records(self.split))
            else:  # fall back on the size of the full generation loader's dataset
                n = len(datamodule.generation_dataloader(split=self.split).dataset)
            self._subset = select_subset(n, self.num_samples, self.seed)
        return self._subset

    def generate_and_score(
        self,
        module: ExplanationGenerator,
        datamodule: Any,
        rank: int = 0,
        world_size: int = 1,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Generate for this rank's shard, update the metrics, compute (synced under DDP) and reset them.

        ``progress(done, total)`` (if given) is called with this rank's records generated, before and after each
        batch. Returns the scores (identical on every rank) and this rank's sample rows.
        """
        shard = shard_indices(self.subset(datamodule), rank, world_size)
        kwargs = {} if self.batch_size is None else {"batch_size": self.batch_size}
        rows: list[dict[str, Any]] = []
        metrics = self.build_metrics()
        if progress is not None:
            progress(0, len(shard))
        for batch in datamodule.generation_dataloader(split=self.split, indices=shard, **kwargs):
            predictions = list(module.generate_explanations(batch))
            references = list(batch["reference"])
            ids = _as_list(batch["index"], len(references))
            if len(predictions) != len(references):
                raise RuntimeError(f"generate_explanations returned {len(predictions)} texts for {len(references)}")
            for metric in metrics.values():
                metric.update(predictions, references, ids)
            uids = _as_list(batch.get("user_id"), len(ids))
            iids = _as_list(batch.get("item_id"), len(ids))
            for i, u, it, p, r in zip(ids, uids, iids, predictions, references):
                rows.append({"index": int(i), "uid": u, "iid": it, "prediction": p, "reference": r})
            if progress is not None:
                progress(len(rows), len(shard))
        scores: dict[str, float] = {}
        for metric in metrics.values():
            scores.update(metric.compute())  # every rank joins the gather
            metric.reset()
        return scores, rows

    # -- Lightning hooks ------------------------------------------------------------------------------------
    def _should_run(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn == "validate":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_run(trainer):
            return
        if not isinstance(pl_module, ExplanationGenerator):
            raise TypeError(f"{type(pl_module).__name__} has no generate_explanations(batch) -> list[str]")
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "generation_dataloader"):
            raise TypeError("ExplanationMetricsCallback needs a datamodule with generation_dataloader(split, indices)")
        for metric in self.build_metrics(pl_module.device).values():
            metric.to(pl_module.device)
        # The validation loop has already put the module in eval mode; restore every submodule's own mode anyway
        # (never a blanket .train(), which would un-freeze a deliberately eval-mode LLM's dropout).
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            scores, rows = self.generate_and_score(
                pl_module, datamodule, trainer.global_rank, trainer.world_size, self._progress(trainer)
            )
        finally:
            for module, mode in modes:
                module.training = mode
        self.last_scores = scores
        for key, value in scores.items():
            # already identical on every rank (synced inside compute): no further reduction
            pl_module.log(f"{self.prefix}/{key}", float(value), sync_dist=False, rank_zero_only=False)
        rows = self._gather_rows(trainer, rows)
        if trainer.is_global_zero:
            self._write(trainer, rows)

    def _progress(self, trainer: pl.Trainer) -> Callable[[int, int], None] | None:
        """Generation progress for a progress bar that takes it (``LogProgress.note_progress``), else ``None``."""
        note = getattr(getattr(trainer, "progress_bar_callback", None), "note_progress", None)
        if note is None:
            return None
        return lambda done, total: note(f"{self.prefix} generation", done, total, unit="records")

    def _gather_rows(self, trainer: pl.Trainer, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        unique = {}
        for row in rows:  # padded duplicates carry the same index
            unique.setdefault(row["index"], row)
        return [unique[i] for i in sorted(unique)]

    def _write(self, trainer: pl.Trainer, rows: list[dict[str, Any]]) -> None:
        epoch = trainer.current_epoch
        if self.write_samples:
            path = Path(trainer.default_root_dir) / "samples" / f"{self.split}_epoch{epoch}.jsonl"
            write_jsonl(path, rows)
        self.log_table(trainer, rows)

    def log_table(self, trainer: Any, rows: list[dict[str, Any]]) -> None:
        """Log the first ``max_table_rows`` rows as a ``wandb.Table`` on every attached ``WandbLogger``."""
        from lightning.pytorch.loggers import WandbLogger

        columns = ["index", "uid", "iid", "prediction", "reference"]
        data = [[row[c] for c in columns] for row in rows[: self.max_table_rows]]
        for logger in getattr(trainer, "loggers", []):
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{self.prefix}/samples", columns=columns, data=data, step=trainer.global_step)
