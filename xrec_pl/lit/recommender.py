"""LightGCNModule: stage 1 training (BPR) and full-ranking evaluation of LightGCN."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from xrec_pl.data.graph import ItemSets
from xrec_pl.data.ranking import rank_metrics
from xrec_pl.models.lightgcn import LightGCN, bpr_loss
from xrec_pl.utils import check_choice

__all__ = ["LightGCNModule"]


def _gather(sets: Sequence[ItemSets], users: Tensor) -> tuple[Tensor, Tensor]:
    parts = [s.gather(users) for s in sets]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class LightGCNModule(pl.LightningModule):
    """Trains :class:`~xrec_pl.models.lightgcn.LightGCN` with BPR on ``(user, pos, neg)`` triples.

    Every training step propagates all embeddings once through the graph from the current parameters (as XRec), then
    takes one optimizer step on the batch's BPR loss. Validation/test rank every item for each evaluated user with the
    already-known items masked (train for val, train + val for test; see :mod:`xrec_pl.data.ranking`) and log the
    per-user means ``{split}/{recall,ndcg,precision,mrr}@K`` (``eval_protocol="masked"``, the default).
    ``eval_protocol="xrec"`` is the reference's: nothing is masked (training items compete), every row of the split's
    interaction file counts once (a user with ``n`` held-out rows weighs ``n``; each row is scored against all of the
    user's held-out items), and ``mrr`` sums the reciprocal ranks of all hits. Early stopping and checkpoint selection
    monitor whatever this logs, so the protocol also decides which epoch is exported.

    The graph, the relevant items and the items to mask come from the datamodule
    (:class:`~data_modules.graph.InteractionDataModule`); ``num_users``/``num_items`` are taken from it in
    ``setup()`` when not given and stored in ``hparams``, so ``load_from_checkpoint`` rebuilds the model.

    Args:
        num_users: Number of users; ``None`` = from the datamodule.
        num_items: Number of items; ``None`` = from the datamodule.
        dim: Embedding size (XRec: 64).
        num_layers: Propagation layers (XRec: 4).
        combine: ``"sum"`` over layers (XRec) or ``"mean"`` (LightGCN paper, PyG).
        lr: Adam learning rate (XRec: 1e-3).
        weight_decay: Weight of the L2 penalty in the BPR loss (XRec: 1e-6), not Adam's weight decay.
        reg_on: Embeddings the penalty applies to: ``"ego"`` = the batch's layer-0 (trainable) embeddings
            (LightGCN paper), ``"final"`` = the batch's propagated embeddings (what XRec's code does).
        ks: Cut-offs of the ranking metrics.
        fused_adam: Use the fused Adam kernel (same maths, ~1.5 ms less per step on this graph).
        eval_protocol: ``"masked"`` (per user, known items masked) or ``"xrec"`` (the reference's, see above).
        encoder: ``"lightgcn"`` or ``"ngcf"`` (:class:`~xrec_pl.models.ngcf.NGCF`, as ReXRec compared).
    """

    def __init__(
        self,
        num_users: int | None = None,
        num_items: int | None = None,
        dim: int = 64,
        num_layers: int = 4,
        combine: Literal["sum", "mean"] = "sum",
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        reg_on: Literal["ego", "final"] = "ego",
        ks: Sequence[int] = (20, 40),
        fused_adam: bool = True,
        eval_protocol: Literal["masked", "xrec"] = "masked",
        encoder: Literal["lightgcn", "ngcf"] = "lightgcn",
    ) -> None:
        super().__init__()
        check_choice("reg_on", reg_on, Literal["ego", "final"])
        if not lr > 0 or weight_decay < 0 or not ks or min(ks) <= 0:
            raise ValueError(f"lr must be positive, weight_decay >= 0 and ks positive; got {lr}, {weight_decay}, {ks}")
        check_choice("eval_protocol", eval_protocol, Literal["masked", "xrec"])
        check_choice("encoder", encoder, Literal["lightgcn", "ngcf"])
        self.save_hyperparameters()
        self.ks = tuple(int(k) for k in ks)
        self.model: LightGCN | None = None
        self._adj: Tensor | None = None
        self._eval_emb: tuple[Tensor, Tensor] | None = None
        self._eval_sums: dict[str, Tensor] = {}
        self._eval_count = 0
        if num_users is not None and num_items is not None:
            self._build(num_users, num_items)

    def _build(self, num_users: int, num_items: int) -> None:
        hp = self.hparams
        if hp.get("encoder", "lightgcn") == "ngcf":
            from xrec_pl.models.ngcf import NGCF

            self.model = NGCF(num_users, num_items, hp.dim, hp.num_layers)
        else:
            self.model = LightGCN(num_users, num_items, hp.dim, hp.num_layers, hp.combine)

    # ----------------------------------------------------------------------------------------------------------------
    # data plumbing
    @property
    def datamodule(self):
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "adjacency"):
            raise RuntimeError("LightGCNModule needs an InteractionDataModule passed to the Trainer (datamodule=...)")
        return dm

    def setup(self, stage: str) -> None:
        dm = self.datamodule
        if self.hparams.num_users is None or self.hparams.num_items is None:
            self.hparams.num_users, self.hparams.num_items = dm.num_users, dm.num_items
        if (self.hparams.num_users, self.hparams.num_items) != (dm.num_users, dm.num_items):
            raise ValueError(
                f"model sizes ({self.hparams.num_users} users, {self.hparams.num_items} items) do not match the data "
                f"in {dm.data_dir} ({dm.num_users}, {dm.num_items})"
            )
        if self.model is None:
            self._build(self.hparams.num_users, self.hparams.num_items)
        self._adj = dm.adjacency()

    def adjacency(self) -> Tensor:
        """The normalised adjacency on this module's device."""
        if self._adj is None:
            self._adj = self.datamodule.adjacency()
        if self._adj.device != self.device:
            self._adj = self._adj.to(self.device)
        return self._adj

    # ----------------------------------------------------------------------------------------------------------------
    # training
    def forward(self) -> tuple[Tensor, Tensor]:
        """Final ``(user_emb (U, D), item_emb (I, D))`` from the current parameters."""
        return self.model(self.adjacency())

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        users, pos, neg = batch  # (B,) each
        b, offset = users.numel(), self.model.num_users
        nodes = torch.cat([users, pos + offset, neg + offset])  # (3B,) node ids: one gather, one scatter in backward
        final = self.model.propagate(self.adjacency())[nodes]  # (3B, D)
        reg = self.model.ego(nodes) if self.hparams.reg_on == "ego" else final
        loss = bpr_loss(*final.split(b), *reg.split(b), weight_decay=self.hparams.weight_decay)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=b)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        fused = self.hparams.fused_adam and self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, fused=fused or None)

    # ----------------------------------------------------------------------------------------------------------------
    # evaluation
    @torch.no_grad()
    def get_embeddings(self) -> tuple[Tensor, Tensor]:
        """Final user ``(U, D)`` and item ``(I, D)`` embeddings, detached (what stage 2 consumes)."""
        user_emb, item_emb = self()
        return user_emb.detach(), item_emb.detach()

    def _eval_start(self) -> None:
        self._eval_emb = self.get_embeddings()

    def _eval_step(self, users: Tensor, split: str) -> dict[str, Tensor]:
        if self._eval_emb is None:
            self._eval_start()
        user_emb, item_emb = self._eval_emb
        dm = self.datamodule
        scores = self.model.score(user_emb[users], item_emb)  # (B, I)
        xrec = self.hparams.get("eval_protocol", "masked") == "xrec"
        metrics = rank_metrics(
            scores,
            dm.targets(split).gather(users),
            ks=self.ks,
            exclude=None if xrec else _gather(dm.known_items(split), users),
            mrr="sum" if xrec else "first",
        )
        weight = self._row_counts(split)[users.cpu()].to(scores.device) if xrec else torch.ones_like(scores[:, 0])
        for name, value in metrics.items():  # per-user values (B,), weighted, summed in float64
            self._eval_sums[name] = self._eval_sums.get(name, 0.0) + (value.double() * weight.double()).sum()
        self._eval_count += float(weight.double().sum())
        return {f"{split}/{name}": value.mean() for name, value in metrics.items()}

    def _row_counts(self, split: str) -> Tensor:
        """``(U,)`` rows per user in the split's interaction file (``total_val.csv`` / ``total_tst.csv``)."""
        cache = self.__dict__.setdefault("_rows", {})
        if split not in cache:
            rows = self.datamodule.interactions({"val": "val", "test": "tst"}[split])[:, 0]
            cache[split] = torch.bincount(torch.as_tensor(rows), minlength=self.model.num_users).float()
        return cache[split]

    def _eval_end(self, split: str) -> None:
        """Log the per-user means over all users of all ranks: sums and counts all-reduced, then divided.

        Exactly the single-process value under DDP (each user is evaluated by one rank, uneven shards allowed),
        unlike a mean of per-rank means.
        """
        self._eval_emb = None
        names = sorted(self._eval_sums)
        if not names:
            return
        totals = torch.stack([self._eval_sums[n] for n in names] + [torch.tensor(float(self._eval_count))])
        totals = self.trainer.strategy.reduce(totals.to(self.device), reduce_op="sum")  # (M + 1,)
        means = {f"{split}/{n}": (totals[i] / totals[-1]).float() for i, n in enumerate(names)}
        self.log_dict(means, on_step=False, on_epoch=True, sync_dist=False)
        self._eval_sums, self._eval_count = {}, 0

    def on_validation_epoch_start(self) -> None:
        self._eval_start()
        self._eval_sums, self._eval_count = {}, 0

    def validation_step(self, users: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(users, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()
        self._eval_sums, self._eval_count = {}, 0

    def test_step(self, users: Tensor, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(users, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
