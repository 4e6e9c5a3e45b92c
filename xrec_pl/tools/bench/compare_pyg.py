"""Stage-1 accuracy check: xrec-pl's LightGCN against PyG's ``LightGCN`` trained the same way.

Both sides see the same training loader (same order, same negatives re-drawn per epoch), the same BPR loss with
1e-6 x L2 of the batch's layer-0 embeddings, Adam 1e-3, batch 1024 and the same evaluation (per-user full ranking,
training items masked). PyG's model averages its layers (``alpha = 1/(L+1)``), so it is compared with
``combine: mean``; ``sum`` (XRec) is reported too.

    python -m xrec_pl.tools.bench.compare_pyg ../shared/data/amazon --epochs 20 --out bench_results/compare_pyg.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any

import torch

from xrec_pl.outputs import refuse_data_output
from xrec_pl.utils import dump_json


def _validation_metrics(user_emb: torch.Tensor, item_emb: torch.Tensor, dm: Any) -> dict[str, float]:
    from xrec_pl.data.ranking import rank_metrics

    users = torch.nonzero(dm.val_items.counts() > 0).flatten()
    sums: dict[str, float] = {}
    for batch in users.split(2048):
        scores = user_emb[batch] @ item_emb.T  # (B, I)
        metrics = rank_metrics(scores, dm.val_items.gather(batch), (20, 40), dm.train_items.gather(batch))
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value.sum())
    return {f"val/{k}": v / users.numel() for k, v in sums.items()}


def train_ours(data_dir: str, epochs: int, combine: str, seed: int = 0) -> dict[str, Any]:
    """xrec-pl's LightGCNModule through a Lightning Trainer."""
    import lightning.pytorch as pl

    from data_modules.graph import InteractionDataModule
    from xrec_pl.lit.recommender import LightGCNModule

    pl.seed_everything(seed, verbose=False)
    dm = InteractionDataModule(data_dir, seed=seed)
    model = LightGCNModule(combine=combine)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    user, item = model.get_embeddings()
    return {**_validation_metrics(user, item, dm), "fit_seconds": seconds}


def train_pyg(data_dir: str, epochs: int, seed: int = 0) -> dict[str, Any]:
    """``torch_geometric.nn.models.LightGCN`` on the same normalised adjacency, loader, loss and optimizer."""
    import lightning.pytorch as pl
    from torch_geometric.nn.models import LightGCN as PygLightGCN

    from data_modules.graph import InteractionDataModule
    from xrec_pl.models.lightgcn import bpr_loss

    pl.seed_everything(seed, verbose=False)
    dm = InteractionDataModule(data_dir, seed=seed)
    dm.setup("fit")
    num_users = dm.num_users
    adj = dm.adjacency()
    adj = torch.sparse_csr_tensor(adj.crow_indices().long(), adj.col_indices().long(), adj.values(), size=adj.shape)
    model = PygLightGCN(dm.num_users + dm.num_items, 64, 4, normalize=False)  # adj is already D^-1/2 A D^-1/2
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = dm.train_dataloader()
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for users, pos, neg in loader:
            emb = model.get_embedding(adj)
            ego = model.embedding.weight
            pos, neg = pos + num_users, neg + num_users
            loss = bpr_loss(emb[users], emb[pos], emb[neg], ego[users], ego[pos], ego[neg], 1e-6)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        emb = model.get_embedding(adj)
    return {**_validation_metrics(emb[:num_users], emb[num_users:], dm), "fit_seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", nargs="+", default=["ours-sum", "ours-mean", "pyg-mean"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench_results/compare_pyg.json")
    args = parser.parse_args(argv)
    refuse_data_output(parser, args.out, args.data_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    results: dict[str, Any] = {"epochs": args.epochs, "seed": args.seed, "data_dir": args.data_dir}
    for side in args.sides:
        if side == "pyg-mean":
            results[side] = train_pyg(args.data_dir, args.epochs, args.seed)
        else:
            results[side] = train_ours(args.data_dir, args.epochs, side.split("-", 1)[1], args.seed)
        sys.stdout.write(f"{side}: {json.dumps(results[side])}\n")
        sys.stdout.flush()
        dump_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
