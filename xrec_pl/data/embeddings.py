"""Stage-1 embeddings on disk: ``embeddings.safetensors`` (keys ``user``, ``item``) or the reference's ``user_emb.pkl`` pair."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xrec_pl import run_layout
from xrec_pl.data.pickles import TensorUnpickler, load_with
from xrec_pl.errors import DataError
from xrec_pl.utils import atomic_write_with

if TYPE_CHECKING:
    from torch import Tensor


# --------------------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------------------
def _as_matrix(path: Path, name: str, value: Any) -> Tensor:
    import torch

    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        desc = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
        raise DataError(f"{path}: '{name}' must be a 2-D tensor (found {desc})")
    if not (value.is_floating_point() and torch.isfinite(value).all()):
        raise DataError(f"{path}: '{name}' must hold finite floating-point values")
    return value.detach().to(device="cpu", dtype=torch.float32).contiguous()


def save_embeddings(
    path: str | os.PathLike, user: Tensor, item: Tensor, metadata: dict[str, str] | None = None
) -> None:
    """Write user/item embedding matrices as safetensors (keys ``user``, ``item``; float32), atomically.

    Args:
        path: destination ``.safetensors`` file.
        user: ``(num_users, dim)`` tensor.
        item: ``(num_items, dim)`` tensor.
        metadata: extra string metadata stored in the header (``num_users``, ``num_items``, ``dim`` are added).
    """
    from safetensors.torch import save_file

    path = Path(path)
    user_t, item_t = _as_matrix(path, "user", user), _as_matrix(path, "item", item)
    if user_t.shape[1] != item_t.shape[1]:
        raise ValueError(f"{path}: user dim {user_t.shape[1]} != item dim {item_t.shape[1]}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(num_users=str(user_t.shape[0]), num_items=str(item_t.shape[0]), dim=str(user_t.shape[1]))
    atomic_write_with(path, lambda tmp: save_file({"user": user_t, "item": item_t}, str(tmp), metadata=meta))


def _load_safetensors(path: Path) -> tuple[Tensor, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    missing = [k for k in ("user", "item") if k not in tensors]
    if missing:
        raise DataError(f"{path}: missing tensor '{missing[0]}' (found: {', '.join(tensors)})")
    user, item = _as_matrix(path, "user", tensors["user"]), _as_matrix(path, "item", tensors["item"])
    if user.shape[1] != item.shape[1]:
        raise DataError(f"{path}: user dim {user.shape[1]} != item dim {item.shape[1]}")
    return user, item


def _load_reference_tensor(path: Path) -> Tensor:
    import torch

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about pickle protocols it did not write
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not a torch.save file: the reference wrote these with pickle.dump
            value = load_with(TensorUnpickler, path)
    return _as_matrix(path, path.stem, value)


def load_embeddings(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Load ``(user, item)`` float32 embedding matrices.

    Args:
        path: a ``.safetensors`` file written by :func:`save_embeddings`; a folder holding ``embeddings.safetensors``
            or the reference's ``user_emb.pkl`` + ``item_emb.pkl``; or the path of ``user_emb.pkl`` itself. The
            reference files load with ``torch.load(weights_only=True)``, or, for plain ``pickle.dump`` tensors, a
            restricted unpickler that only rebuilds tensors.

    Returns:
        ``user`` of shape ``(num_users, dim)`` and ``item`` of shape ``(num_items, dim)``, on CPU.

    Raises:
        DataError: missing/unreadable file, missing key, wrong shapes.
    """
    path = Path(path)
    if path.is_dir():
        if (path / run_layout.EMBEDDINGS).is_file():
            return _load_safetensors(path / run_layout.EMBEDDINGS)
        if (path / "user_emb.pkl").is_file():
            return load_reference_pair(path)
        raise DataError(f"{path / run_layout.EMBEDDINGS}: file not found (nor user_emb.pkl / item_emb.pkl)")
    if path.name in ("user_emb.pkl", "item_emb.pkl"):
        return load_reference_pair(path.parent)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return _load_safetensors(path)


def load_reference_pair(folder: Path) -> tuple[Tensor, Tensor]:
    user = _load_reference_tensor(folder / "user_emb.pkl")
    item = _load_reference_tensor(folder / "item_emb.pkl")
    if user.shape[1] != item.shape[1]:
        raise DataError(f"{folder / 'item_emb.pkl'}: dim {item.shape[1]} != user_emb.pkl dim {user.shape[1]}")
    return user, item


def load_checked_embeddings(
    path: str | os.PathLike, dim: int, num_users: int | None = None, num_items: int | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`load_embeddings`, then check the width (``dim``) and, where given, the number of users and items.

    Raises:
        DataError: a table of another width or size (the message says which and what to set).
    """
    user, item = load_embeddings(path)
    for name, table, expected in (("user", user, num_users), ("item", item, num_items)):
        if table.shape[1] != dim:
            raise DataError(
                f"{path}: {name} embeddings are {table.shape[1]}-d but graph_dim={dim}; set model.graph_dim to "
                f"{table.shape[1]}"
            )
        if expected is not None and table.shape[0] != expected:
            raise DataError(
                f"{path}: the {name} table has {table.shape[0]} rows but the dataset has {expected} {name}s; were "
                "these embeddings trained on another dataset?"
            )
    return user, item
