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
        # pandas 3 stores str columns as Arrow arrays: these rebuild an array from raw buffers and a type alias.
        ("pyarrow.lib", "_restore_array"),
        ("pyarrow.lib", "py_buffer"),
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
            return unpickler_cls(fh, path).load()
    except DataError:
        raise
    except MemoryError as err:
        raise DataError(f"{path}: not a readable pickle (MemoryError: corrupt length field?)") from err
    except Exception as err:  # truncated / corrupt / not a pickle: the unpickler raises many exception types
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {detail})") from err


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
