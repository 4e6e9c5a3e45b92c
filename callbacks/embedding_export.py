"""EmbeddingExport: write stage 1's user/item embeddings into the run folder for stage 2."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from xrec_pl import run_layout
from xrec_pl.data.embeddings import save_embeddings
from xrec_pl.utils import check_choice

__all__ = ["EmbeddingExport"]


class EmbeddingExport(pl.Callback):
    """After ``fit`` (and after ``test``), rank zero writes ``get_embeddings()`` to ``default_root_dir/filename``.

    The file is safetensors with keys ``user`` ``(U, D)`` and ``item`` ``(I, D)`` (:func:`xrec_pl.data.io.save_embeddings`),
    written atomically. With ``source="best"`` (default) and a ``ModelCheckpoint`` that tracked a best model, the
    embeddings after ``fit`` come from that checkpoint's weights, as XRec keeps the embeddings of its best validation
    epoch; the module's own weights are restored afterwards. ``source="last"`` exports the weights as they are.

    Args:
        filename: File name inside the run folder.
        source: ``"best"`` checkpoint when there is one, else the current weights; or always ``"last"``.
    """

    def __init__(self, filename: str = run_layout.EMBEDDINGS, source: Literal["best", "last"] = "best") -> None:
        check_choice("source", source, Literal["best", "last"])
        self.filename = filename
        self.source = source
        self.last_path: Path | None = None

    def _best_path(self, trainer: pl.Trainer) -> str | None:
        ckpt = trainer.checkpoint_callback
        path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        return path if self.source == "best" and path and Path(path).is_file() else None

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        best = self._best_path(trainer) if stage == "fit" else None
        saved = None
        if best is not None:
            saved = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            # written by this very run's ModelCheckpoint (hparams are plain Python objects, hence weights_only=False)
            state = torch.load(best, map_location=pl_module.device, weights_only=False)["state_dict"]
            pl_module.load_state_dict(state)
        try:
            user, item = pl_module.get_embeddings()
        finally:
            if saved is not None:
                pl_module.load_state_dict(saved)
        path = Path(trainer.default_root_dir) / self.filename
        meta = {"stage": stage, "epoch": str(trainer.current_epoch), "source": best or "current weights"}
        save_embeddings(path, user.float().cpu(), item.float().cpu(), metadata=meta)
        self.last_path = path
        rank_zero_info(
            f"EmbeddingExport: wrote {tuple(user.shape)} user / {tuple(item.shape)} item embeddings to {path}"
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer, pl_module, "fit")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer, pl_module, "test")
