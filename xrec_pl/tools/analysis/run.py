"""Load a trained stage-2 run for analysis, and score records under chosen injected vectors.

Everything here goes through the explainer's public surface: ``graph_vectors``, the two adapters, the injector's
``injecting`` context manager and ``token_nll``. The adapters are put in eval mode (no dropout, no gate noise), so a
record's vectors, and therefore its scores, are deterministic.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xrec_pl.errors import DataError

__all__ = ["LoadedRun", "adapter_vectors", "find_checkpoint", "load_run", "record_nll", "teacher_batches"]


@dataclass
class LoadedRun:
    """A stage-2 run ready for analysis.

    Attributes:
        run_dir: the run folder (``trainer.default_root_dir`` of the stage-2 fit).
        checkpoint: the checkpoint the adapters came from.
        module: the ``ExplainerModule`` (adapters in eval mode).
        datamodule: its ``ExplanationDataModule`` (set up with the module's tokenizer).
    """

    run_dir: Path
    checkpoint: Path
    module: Any
    datamodule: Any


def find_checkpoint(run_dir: str | Path, checkpoint: str | None = None) -> Path:
    """``checkpoint`` if given, else ``run_dir/checkpoints/last.ckpt``; ``DataError`` when it does not exist."""
    path = Path(checkpoint) if checkpoint else Path(run_dir) / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise DataError(f"{path}: no stage-2 checkpoint (train the run first, or pass --checkpoint)")
    return path


def load_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    data_dir: str | None = None,
    embeddings_path: str | None = None,
    eval_subset: int | None = None,
    batch_size: int | None = None,
    llm_dtype: str | None = None,
) -> LoadedRun:
    """The explainer and the datamodule of a trained stage-2 run, both rebuilt from its checkpoint.

    Args:
        run_dir: stage-2 run folder.
        checkpoint: checkpoint to load (default ``run_dir/checkpoints/last.ckpt``).
        data_dir: override the data folder stored in the checkpoint.
        embeddings_path: override the stage-1 embeddings stored in the checkpoint.
        eval_subset: score only this many (seeded) records of the split.
        batch_size: teacher-forced / generation batch size (default: the run's ``eval_batch_size``).
        llm_dtype: hold the frozen LLM in this dtype instead of the run's (``bfloat16`` is about twice as fast on a
            CPU with bf16 instructions).

    The checkpoint is read once, weights-only (:func:`~xrec_pl.data.pickles.safe_torch_load`), and validated
    against the rebuilt module (LLM identity, arm, adapter keys and shapes) before its weights are loaded.

    Raises:
        DataError: missing, unsafe or foreign checkpoint.
    """
    from data_modules.explanations import ExplanationDataModule
    from xrec_pl.data.pickles import safe_torch_load
    from xrec_pl.lit.explainer import ExplainerModule

    ckpt = find_checkpoint(run_dir, checkpoint)
    meta = safe_torch_load(ckpt, "checkpoint")
    if not isinstance(meta, dict):
        raise DataError(f"{ckpt}: not a Lightning checkpoint (a {type(meta).__name__})")
    hp = dict(meta.get("hyper_parameters") or {})
    dm_hp = dict(meta.get("datamodule_hyper_parameters") or {})
    if not hp or "embedding_source" not in hp:
        raise DataError(f"{ckpt}: not an ExplainerModule checkpoint (no explainer hyper-parameters)")
    if not dm_hp and data_dir is None:
        raise DataError(f"{ckpt}: no datamodule hyper-parameters stored; pass --data_dir")
    accepted = set(inspect.signature(ExplanationDataModule.__init__).parameters) - {"self", "tokenizer"}
    dm_hp = {k: v for k, v in dm_hp.items() if k in accepted}  # drops LightningCLI's _class_path etc.
    if data_dir is not None:
        dm_hp["data_dir"] = data_dir
    if eval_subset is not None:
        dm_hp["eval_subset"] = eval_subset
    if batch_size is not None:
        dm_hp["eval_batch_size"] = batch_size
    try:
        datamodule = ExplanationDataModule(**dm_hp)
    except (TypeError, ValueError) as err:
        raise DataError(f"{ckpt}: its stored datamodule settings are not valid: {err}") from None
    overrides: dict[str, Any] = {"num_users": datamodule.num_users, "num_items": datamodule.num_items}
    if embeddings_path is not None:
        overrides["embeddings_path"] = embeddings_path
    if llm_dtype is not None:
        overrides["llm_dtype"] = llm_dtype
    accepted = set(inspect.signature(ExplainerModule.__init__).parameters) - {"self"}
    try:
        module = ExplainerModule(**{**{k: v for k, v in hp.items() if k in accepted}, **overrides})
    except (TypeError, ValueError) as err:  # an edited or foreign checkpoint: one line, not a traceback
        raise DataError(f"{ckpt}: its stored explainer settings are not valid: {err}") from None
    module.accept_checkpoint(meta, str(ckpt))  # LLM identity, arm, adapter keys and shapes (old key layouts renamed)
    module.load_state_dict(meta["state_dict"], strict=False)
    module.eval()
    datamodule.tokenizer = module.tokenizer
    return LoadedRun(Path(run_dir), ckpt, module, datamodule)


def teacher_batches(run: LoadedRun, split: str = "tst") -> Iterator[dict[str, Any]]:
    """Right-padded, teacher-forced batches (with labels) of ``split`` (``tst`` or ``val``)."""
    dm = run.datamodule
    if split in ("tst", "test"):
        dm.setup("test")
        return iter(dm.test_dataloader())
    if split in ("val", "validation"):
        dm.setup("validate")
        return iter(dm.val_dataloader())
    raise ValueError(f"split must be 'tst' or 'val', got {split!r}")


def adapter_vectors(module: Any, user_id: Tensor, item_id: Tensor) -> Tensor | None:
    """Adapter outputs ``(B, 2, H)`` (user, item) for these ids, or ``None`` when the run injects nothing."""
    if module.user_adapter is None:
        return None
    device = next(module.user_adapter.parameters()).device
    return module.net.adapted_vectors(user_id.to(device), item_id.to(device))


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision in ("32", "32-true", "fp32"):
        return contextlib.nullcontext()
    if precision in ("bf16", "bf16-mixed"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"precision must be '32' or 'bf16-mixed', got {precision!r}")


@torch.no_grad()
def record_nll(module: Any, batch: dict[str, Any], vectors: Tensor | None, precision: str = "32") -> Tensor:
    """Mean token NLL ``(B,)`` of each record's reference explanation with ``vectors`` injected.

    Args:
        module: the explainer.
        batch: a teacher-forced batch (``labels``, ``user_pos``, ``item_pos``).
        vectors: ``(B, 2, H)`` adapter outputs for the user and item slots, or ``None`` (nothing injected).
        precision: ``"32"`` or ``"bf16-mixed"`` (CPU autocast).
    """
    positions = torch.stack([batch["user_pos"], batch["item_pos"]], dim=1)  # (B, 2)
    inject = contextlib.nullcontext() if vectors is None else module.injector.injecting(positions, vectors)
    with inject, _autocast(precision):
        nll, rows = module.token_nll(batch)  # (N,), (N,)
    size = batch["input_ids"].shape[0]
    total = torch.zeros(size, dtype=torch.float64).index_add_(0, rows.cpu(), nll.detach().double().cpu())
    count = torch.zeros(size, dtype=torch.float64).index_add_(0, rows.cpu(), torch.ones_like(total[rows.cpu()]))
    return total / count.clamp_min(1)
