"""EmbeddingExport: write stage 1's user/item embeddings into the run folder for stage 2."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from xrec_pl import run_layout
from xrec_pl.data.embeddings import save_embeddings
from xrec_pl.data.pickles import require_inside, safe_torch_load
from xrec_pl.errors import DataError
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

    def _best_path(self, trainer: pl.Trainer) -> Path | None:
        ckpt = trainer.checkpoint_callback
        path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if self.source != "best" or not path:
            return None
        # On resume, best_model_path comes from the checkpoint file: it must name a file in this run's folder.
        folder = getattr(ckpt, "dirpath", None) or trainer.default_root_dir
        best = require_inside(path, folder, "best checkpoint named by the resumed checkpoint")
        return best if best.is_file() else None

    @staticmethod
    def _best_state(best: Path) -> dict:
        checkpoint = safe_torch_load(best, "checkpoint")
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise DataError(f"{best}: not a Lightning checkpoint (no state_dict)")
        return state

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        best = self._best_path(trainer) if stage == "fit" else None
        state = self._best_state(best) if best is not None else None  # read (and checked) before any weight moves
        saved = None
        if state is not None:
            saved = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        try:
            if state is not None:
                try:
                    pl_module.load_state_dict(state)
                except RuntimeError as err:
                    raise DataError(f"{best}: weights of another model ({str(err).splitlines()[0][:200]})") from None
            user, item = pl_module.get_embeddings()
        finally:
            if saved is not None:
                pl_module.load_state_dict(saved)
        path = Path(trainer.default_root_dir) / self.filename
        meta = {"stage": stage, "epoch": str(trainer.current_epoch), "source": str(best) if best else "current weights"}
        save_embeddings(path, user.float().cpu(), item.float().cpu(), metadata=meta)
        self.last_path = path
        rank_zero_info(
            f"EmbeddingExport: wrote {tuple(user.shape)} user / {tuple(item.shape)} item embeddings to {path}"
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer, pl_module, "fit")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer, pl_module, "test")
