"""A restricted unpickler: XRec's pickles are read without letting them run code.

:func:`safe_load_pickle` resolves only the globals that plain containers, numbers, strings, numpy arrays and pandas
DataFrames/Series need and refuses everything else (``os.system``, ``subprocess``, ``builtins.eval``/``getattr``,
``functools.partial``, torch, ...) before anything is called. :class:`TensorUnpickler` additionally rebuilds tensors
written with a plain ``pickle.dump(tensor)``, as the reference wrote its embeddings.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xrec_pl.errors import DataError

# --------------------------------------------------------------------------------------------------------------------
# Restricted unpickler
# --------------------------------------------------------------------------------------------------------------------
# Exact globals that are safe to call with attacker-chosen arguments: constructors of inert values, and the
# reconstruction helpers numpy/pandas emit. Nothing here evaluates code, imports modules, opens files or calls an
# argument it is given, except with callables that themselves passed this same filter.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        *(("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex")),
        *(("builtins", n) for n in ("str", "bytes", "bytearray", "bool", "slice", "range", "object")),
        ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(text, "latin1")
        ("copyreg", "_reconstructor"),  # protocol 0/1 object rebuild; its class arguments pass this filter too
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        *(("datetime", n) for n in ("date", "datetime", "time", "timedelta", "timezone")),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        # pandas 3 stores str columns as Arrow arrays, rebuilt from raw buffers and a type alias. pyarrow's own
        # `_restore_array` trusts the buffers (a patched offset reads or crashes out of bounds), so it resolves to
        # `_checked_restore_array` below, which checks the layout first and validates the array in full after;
        # `py_buffer` resolves to `_immutable_py_buffer`.
        ("pyarrow.lib", "type_for_alias"),
    }
)
# Reconstruction functions pandas emits; they move between private modules across versions, so they are matched by
# name inside the pandas modules below. Each one only rebuilds a pandas object from its state.
_PANDAS_HELPERS = frozenset(
    {
        "_new_Index",
        "_new_DatetimeIndex",
        "_new_PeriodIndex",
        "_new_IntervalIndex",
        "_unpickle_block",
        "new_block",
        "_unpickle_timestamp",
        "_timedelta_unpickle",
        "_nat_unpickle",
        "__pyx_unpickle_NDArrayBacked",
        "__pyx_unpickle_IntervalMixin",
    }
)
_PANDAS_MODULE_PREFIXES = ("pandas.core.", "pandas._libs.", "pandas.tseries.")
_PANDAS_MODULES = ("pandas", "pandas.arrays", "pandas.api.types", "pandas.api.extensions")


def _pandas_safe_types() -> tuple[type, ...]:
    from pandas._libs.sparse import SparseIndex
    from pandas.api.extensions import ExtensionArray, ExtensionDtype
    from pandas.core.internals.blocks import Block
    from pandas.core.internals.managers import BaseBlockManager
    from pandas.tseries.offsets import BaseOffset

    return (
        pd.DataFrame,
        pd.Series,
        pd.Index,
        ExtensionArray,
        ExtensionDtype,
        BaseBlockManager,
        Block,
        SparseIndex,
        BaseOffset,
        pd.Timestamp,
        pd.Timedelta,
        pd.Period,
        pd.Interval,
        np.dtype,
    )


def _immutable_py_buffer(data: Any) -> Any:
    # pyarrow.py_buffer over a pickled bytearray keeps a buffer export on it; on an unpickling error the two can be
    # freed in the wrong order (CPython reports "deallocated bytearray object has exported buffers"). A bytes copy
    # is immutable and owned by the Arrow buffer alone.
    import pyarrow as pa

    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"py_buffer expects bytes, got {type(data).__name__}")
    return pa.py_buffer(bytes(data))


def _checked_restore_array(path: Path) -> Callable[[Any], Any]:
    """A stand-in for ``pyarrow.lib._restore_array`` that never builds an array whose buffers do not fit its type.

    Only flat arrays (no children, no dictionary: what pandas writes for string and numeric columns) are accepted;
    the buffer count must match the type's layout before pyarrow sees the buffers, and the result must pass
    ``Array.validate(full=True)`` (offsets inside the data, sizes fitting the length) before anyone reads it.
    """

    def restore(data: Any) -> Any:
        import pyarrow as pa
        import pyarrow.lib as palib

        bad = DataError(f"{path}: damaged Arrow array in the pickle (buffers do not fit the array's type)")
        if not isinstance(data, tuple) or len(data) != 7:
            raise bad
        dtype, length, null_count, offset, buffers, children, dictionary = data
        if not isinstance(dtype, pa.DataType) or dtype.num_fields != 0 or pa.types.is_dictionary(dtype):
            raise bad
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (length, null_count, offset)):
            raise bad
        if length < 0 or offset < 0 or null_count < -1 or null_count > length:
            raise bad
        if not isinstance(buffers, list) or len(buffers) != dtype.num_buffers or children or dictionary is not None:
            raise bad
        if any(b is not None and not isinstance(b, pa.Buffer) for b in buffers):
            raise bad
        if any(b is None for b in buffers[1:2]):  # values (or offsets) buffer: required by every flat layout
            raise bad
        array = palib._restore_array(data)
        try:
            array.validate(full=True)
        except (pa.ArrowException, ValueError) as err:
            raise DataError(f"{path}: damaged Arrow array in the pickle ({str(err).splitlines()[0][:120]})") from None
        return array

    return restore


def _normalise_module(module: str) -> str:
    # numpy 2 renamed numpy.core to numpy._core; old pickles use the old name (and importing it warns).
    if module == "numpy.core" or module.startswith("numpy.core."):
        return "numpy._core" + module[len("numpy.core") :]
    return module


def _is_pandas_module(module: str) -> bool:
    return module in _PANDAS_MODULES or module.startswith(_PANDAS_MODULE_PREFIXES)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only allow-listed globals (see module docstring)."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def _refuse(self, module: str, name: str) -> DataError:
        return DataError(
            f"{self._path}: refused global '{module}.{name}' (data pickles may only hold containers, numbers, strings, "
            "numpy arrays and pandas objects)"
        )

    def _resolve(self, module: str, name: str) -> Any:
        if (module, name) == ("pyarrow.lib", "_restore_array"):
            return _checked_restore_array(self._path)
        if (module, name) == ("pyarrow.lib", "py_buffer"):
            return _immutable_py_buffer
        if (module, name) in _ALLOWED_GLOBALS:
            return getattr(importlib.import_module(module), name)
        if module in ("numpy", "numpy.dtypes") or module.startswith("numpy.dtypes."):
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and issubclass(obj, np.dtype):  # numpy.dtypes.Float64DType and friends
                return obj
            if module == "numpy" and isinstance(obj, type) and issubclass(obj, np.generic):  # np.float64, np.int64
                return obj
            return None
        if _is_pandas_module(module):
            mod = importlib.import_module(module)
            obj = getattr(mod, name, None)
            if obj is None:
                return None
            if name in _PANDAS_HELPERS:
                return obj
            if isinstance(obj, type) and issubclass(obj, _pandas_safe_types()):
                return obj
            if obj is pd.NA or obj is pd.NaT:
                return obj
        return None

    def find_class(self, module: str, name: str) -> Any:
        # Python-2 era names (__builtin__.set, copy_reg, ...) as the default find_class maps them for protocol < 3;
        # those modules do not exist in Python 3, so mapping them whatever the protocol changes nothing else.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        module = _normalise_module(module)
        if "." in name or (name.startswith("__") and not name.startswith("__pyx_unpickle")):
            raise self._refuse(module, name)  # no attribute chains (getattr tricks) and no dunders
        try:
            obj = self._resolve(module, name)
        except ImportError:
            obj = None
        if obj is None:
            raise self._refuse(module, name)
        return obj


def load_with(unpickler_cls: Callable[..., pickle.Unpickler], path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as fh:
            obj = unpickler_cls(fh, path).load()
        _check_readable(obj)
        return obj
    except DataError:
        raise
    except MemoryError as err:
        raise DataError(f"{path}: not a readable pickle (MemoryError: corrupt length field?)") from err
    except Exception as err:  # truncated / corrupt / not a pickle: the unpickler raises many exception types
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {detail})") from err


def _check_readable(obj: Any, depth: int = 0) -> None:
    """Read every value of the pandas objects in ``obj`` once, so a damaged one fails here, not in a caller.

    An unpickled DataFrame is rebuilt from its pickled state without pandas' own checks: a mutated file can give a
    frame without its block manager, or with blocks that disagree with its index. Reading it through the public API
    raises on such frames (and the Arrow arrays inside were validated when they were rebuilt).
    """
    if depth > 3:
        return
    if isinstance(obj, (pd.DataFrame, pd.Series)):
        frame = obj.to_frame() if isinstance(obj, pd.Series) else obj
        _ = frame.shape, list(frame.columns), list(frame.index)
        for position in range(frame.shape[1]):
            frame.iloc[:, position].tolist()
    elif isinstance(obj, dict):
        for value in list(obj.values())[:64]:
            _check_readable(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj[:64]:
            _check_readable(value, depth + 1)


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle, allowing only what plain containers, numbers, strings, numpy arrays and pandas objects need.

    Globals outside the allow-list (``os.system``, ``subprocess.*``, ``builtins.eval``/``getattr``/``__import__``,
    ``functools.partial``, torch, ...) are refused before anything is called.

    Args:
        path: pickle file.

    Returns:
        The unpickled object.

    Raises:
        DataError: the file is missing, not a pickle, truncated, or references a refused global.
    """
    return load_with(_RestrictedUnpickler, Path(path))


def _storage_from_bytes(data: bytes) -> Any:
    # Stands in for torch.storage._load_from_bytes, which would call torch.load(weights_only=False) on the bytes.
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class TensorUnpickler(_RestrictedUnpickler):
    """Restricted unpickler that also rebuilds tensors written with plain ``pickle.dump(tensor)`` (the reference)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            import torch._utils

            return getattr(torch._utils, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        return super().find_class(module, name)


# --------------------------------------------------------------------------------------------------------------------
# torch files (checkpoints, embeddings)
# --------------------------------------------------------------------------------------------------------------------
def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; any failure is one ``DataError`` naming the file.

    A file holding anything but tensors and plain Python values (a pickle that would call ``os.system``, an
    ``nn.Module``) is refused as such; torch's own advice to retry with ``weights_only=False`` is never passed on.

    Args:
        path: The file.
        what: What the file is, for the message (``checkpoint``, ``embeddings file``).
        map_location: As in ``torch.load``.

    Raises:
        DataError: missing, truncated, corrupted, or not a weights-only file.
    """
    import warnings

    import torch

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {what} not found" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for damaged files (RuntimeError, EOFError, UnpicklingError)
        raise torch_load_error(p, err, what) from None


def torch_load_error(path: str | os.PathLike, err: BaseException, what: str = "checkpoint") -> DataError:
    """The one-line ``DataError`` for a failed weights-only ``torch.load`` of ``path``."""
    text = str(err)
    if "Weights only load failed" in text:
        # torch's message advises retrying with weights_only=False: never pass that on. Say what was refused.
        found = re.search(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return DataError(
                f"{path}: refused {what}: it references '{found.group(1) or found.group(2)}' (only tensors and plain "
                "values are loaded; such a file could run code)"
            )
        if "Unsupported operand" in text or "load key" in text:
            return DataError(f"{path}: unreadable {what} (not a torch file, or corrupted)")
        return DataError(
            f"{path}: refused {what}: it holds objects other than tensors and plain values, and such files are never "
            "unpickled (it may run code)"
        )
    if isinstance(err, MemoryError):
        return DataError(f"{path}: unreadable {what} (corrupt length field?)")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    return DataError(f"{path}: unreadable {what} (truncated or corrupted?): {first}")


def require_inside(path: str | os.PathLike, folder: str | os.PathLike, what: str) -> Path:
    """Return ``path`` resolved, or raise ``DataError`` when it (after following links) lies outside ``folder``.

    Paths read from a file (a checkpoint's ``best_model_path``) are attacker-chosen: they must not lead outside
    the run folder that holds them.
    """
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if resolved != root and root not in resolved.parents:
        raise DataError(f"{path}: {what} lies outside the run's folder {root}; refusing to use it")
    return resolved
