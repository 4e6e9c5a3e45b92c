"""Stage 1 speed: one LightGCN training epoch, ours vs a re-implementation of the XRec reference's loop.

Both sides use the same graph, batch size (1024 triples per optimizer step), 4 layers, dim 64, Adam 1e-3, and every
step propagates all embeddings from the current parameters. They differ in how:

- **ours**: :class:`~xrec_pl.lit.recommender.LightGCNModule` + :class:`~data_modules.graph.InteractionDataModule`
  under a real ``Trainer`` (its per-step overhead included); CSR adjacency with int32 indices, symmetric custom
  backward, fused Adam, batched triple gathers, negatives re-drawn (vectorised) at the start of the epoch — inside the
  timed region.
- **reference-style** (as XRec's ``encoder/``): COO ``torch.spmm`` through 4 layers with autograd, ``stack().sum()``,
  ``-log(sigmoid)`` BPR with L2 on the batch's final embeddings, a per-sample ``Dataset`` with the default collate,
  ``torch.autograd.set_detect_anomaly(True)`` during training, plain Adam; negatives drawn once before training by a
  per-row Python loop (timed separately, not part of the epoch).

Runs alternate (reference, ours, reference, ours, ...) in one process so that load from other processes hits both.
With ``max_steps`` only that many steps per run are timed and the epoch time is extrapolated linearly
(``extrapolated: true`` in the output); ``max_steps=None`` times full epochs.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from xrec_pl.outputs import refuse_data_output
from xrec_pl.tools.bench.clock import EpochClock
from xrec_pl.utils import dump_json

__all__ = ["run_stage1_bench"]


# --------------------------------------------------------------------------------------------------------------------
# reference-style implementation (written for the comparison; mirrors XRec's encoder loop)
class _RefTriples(torch.utils.data.Dataset):
    def __init__(self, users: list[int], pos: list[int], neg: list[int]) -> None:
        self.users, self.pos, self.neg = users, pos, neg

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        return self.users[index], self.pos[index], self.neg[index]


class _RefLightGCN(nn.Module):
    def __init__(self, num_users: int, num_items: int, adj: torch.Tensor, dim: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.num_users, self.layers, self.adj = num_users, layers, adj
        self.user_embeds = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_users, dim)))
        self.item_embeds = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_items, dim)))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = [torch.cat([self.user_embeds, self.item_embeds], 0)]
        for _ in range(self.layers):
            embeds.append(torch.spmm(self.adj, embeds[-1]))
        out = torch.stack(embeds, 0).sum(0)
        return out[: self.num_users], out[self.num_users :]

    def cal_loss(self, batch: list[torch.Tensor], weight_decay: float = 1e-6) -> torch.Tensor:
        user_embeds, item_embeds = self()
        ancs, poss, negs = batch
        a, p, n = user_embeds[ancs], item_embeds[poss], item_embeds[negs]
        diff = (a * p).sum(1) - (a * n).sum(1)
        loss = -torch.mean(torch.log(torch.sigmoid(diff)))
        return loss + weight_decay * (a.norm(2).pow(2) + p.norm(2).pow(2) + n.norm(2).pow(2))


def _reference_adjacency(pairs: np.ndarray, num_users: int, num_items: int) -> torch.Tensor:
    import scipy.sparse as sp

    r = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(num_users, num_items))
    mat = sp.vstack(
        [sp.hstack([sp.csr_matrix((num_users, num_users)), r]), sp.hstack([r.T, sp.csr_matrix((num_items, num_items))])]
    )
    mat = (mat != 0) * 1.0
    deg = np.asarray(mat.sum(axis=-1)).reshape(-1)
    with np.errstate(divide="ignore"):
        d = np.power(deg, -0.5)
    d[np.isinf(d)] = 0.0
    dm = sp.diags(d)
    mat = mat.dot(dm).transpose().dot(dm).tocoo()
    idx = torch.from_numpy(np.vstack([mat.row, mat.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(mat.data.astype(np.float32)), mat.shape).coalesce()


def _reference_negatives(pairs: np.ndarray, seed: int) -> list[int]:
    rnd = random.Random(seed)
    all_items = np.unique(pairs[:, 1]).tolist()
    interacted: dict[int, set[int]] = {}
    for u, i in pairs.tolist():
        interacted.setdefault(u, set()).add(i)
    negatives = []
    for u, _ in pairs.tolist():  # one Python iteration per training row, as the reference
        seen = interacted[u]
        item = rnd.choice(all_items)
        while item in seen:
            item = rnd.choice(all_items)
        negatives.append(item)
    return negatives


def _time_reference(model: _RefLightGCN, loader, max_steps: int | None) -> tuple[float, int]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 0
    with torch.autograd.set_detect_anomaly(True):
        start = time.perf_counter()
        for batch in loader:
            opt.zero_grad()
            loss = model.cal_loss(batch)
            loss.backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        return time.perf_counter() - start, steps


# --------------------------------------------------------------------------------------------------------------------
# ours
def _time_ours(data_dir: Path, seed: int, batch_size: int, max_steps: int | None, epoch: int) -> tuple[float, int]:
    import lightning.pytorch as pl

    from data_modules.graph import InteractionDataModule
    from xrec_pl.lit.recommender import LightGCNModule

    class _Epoch(pl.Callback):  # bench epoch `epoch` of the data order (negatives are re-drawn for it)
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            trainer.train_dataloader.sampler.set_epoch(epoch)

    clock = EpochClock()
    dm = InteractionDataModule(data_dir, batch_size=batch_size, seed=seed)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=max_steps if max_steps is not None else 1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Epoch(), clock],
    )
    trainer.fit(LightGCNModule(), dm)
    return clock.stop - clock.start, clock.steps


# --------------------------------------------------------------------------------------------------------------------
def run_stage1_bench(
    data_dir: str | os.PathLike,
    repeats: int = 2,
    max_steps: int | None = 40,
    out_json: str | os.PathLike | None = None,
    seed: int = 0,
    batch_size: int = 1024,
    num_threads: int | None = None,
) -> dict:
    """Time one training epoch, ours vs reference-style, alternating ``repeats`` times; return (and save) the figures.

    Args:
        data_dir: XRec data folder (e.g. ``../shared/data/amazon``).
        repeats: Timed runs per side (median reported).
        max_steps: Steps timed per run (the epoch time is extrapolated); ``None`` = full epochs.
        out_json: Where to write the result (JSON), if given.
        seed: Seed of data order, negatives and init.
        batch_size: Triples per step (XRec: 1024).
        num_threads: ``torch.set_num_threads`` for both sides (default: leave as is).

    Returns:
        ``{"ours_epoch_s", "reference_epoch_s", "ratio", "ours_step_ms", "reference_step_ms", "steps_per_epoch",
        "steps_timed", "extrapolated", "reference_negatives_s", "runs", "threads", ...}``.
    """
    from xrec_pl.data.io import read_interactions, read_para_dict

    if num_threads:
        torch.set_num_threads(num_threads)
    data_dir = Path(data_dir)
    para = read_para_dict(data_dir)
    num_users, num_items = int(para["user_num"]), int(para["item_num"])
    pairs = read_interactions(data_dir, "trn", num_users, num_items)
    steps_per_epoch = math.ceil(len(pairs) / batch_size)

    t = time.perf_counter()
    ref_neg = _reference_negatives(pairs, seed)
    ref_neg_s = time.perf_counter() - t
    adj = _reference_adjacency(pairs, num_users, num_items)
    ref_data = _RefTriples(pairs[:, 0].tolist(), pairs[:, 1].tolist(), ref_neg)

    runs: list[dict[str, Any]] = []
    for r in range(repeats):
        torch.manual_seed(seed + r)
        ref_model = _RefLightGCN(num_users, num_items, adj)
        loader = torch.utils.data.DataLoader(ref_data, batch_size=batch_size, shuffle=True)
        ref_s, ref_steps = _time_reference(ref_model, loader, max_steps)
        torch.manual_seed(seed + r)
        ours_s, ours_steps = _time_ours(data_dir, seed, batch_size, max_steps, epoch=r)
        runs.append({"reference_s": ref_s, "reference_steps": ref_steps, "ours_s": ours_s, "ours_steps": ours_steps})
        rank_zero_info(
            f"stage1 bench run {r}: reference {ref_s:.2f} s / {ref_steps} steps, ours {ours_s:.2f} s / {ours_steps} steps"
        )

    ref_step = statistics.median(run["reference_s"] / run["reference_steps"] for run in runs)
    ours_step = statistics.median(run["ours_s"] / run["ours_steps"] for run in runs)
    result = {
        "data_dir": str(data_dir),
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "steps_timed": runs[0]["ours_steps"],
        "extrapolated": max_steps is not None and max_steps < steps_per_epoch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "reference_step_ms": ref_step * 1e3,
        "ours_step_ms": ours_step * 1e3,
        "reference_epoch_s": ref_step * steps_per_epoch,
        "ours_epoch_s": ours_step * steps_per_epoch,
        "ratio": ref_step / ours_step,
        "reference_negatives_s": ref_neg_s,
        "runs": runs,
        "torch": torch.__version__,
    }
    how = f"extrapolated from {result['steps_timed']} steps" if result["extrapolated"] else "full epoch"
    rank_zero_info(
        f"stage1 epoch ({how}, {steps_per_epoch} steps of {batch_size}): reference {result['reference_epoch_s']:.1f} s, "
        f"ours {result['ours_epoch_s']:.1f} s, ratio {result['ratio']:.1f}x "
        f"(reference negatives, once before training: {ref_neg_s:.1f} s)"
    )
    if out_json is not None:
        dump_json(out_json, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    """``python -m xrec_pl.tools.bench.stage1 DATA_DIR [--repeats N] [--max-steps S|0] [--out FILE]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=40, help="steps timed per run; 0 = full epoch")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    refuse_data_output(parser, args.out, args.data_dir)
    return run_stage1_bench(args.data_dir, args.repeats, args.max_steps or None, args.out, num_threads=args.threads)


if __name__ == "__main__":
    main()
