"""Small shared helpers: atomic file writes, JSON dumps, seeds and choice checks.

Every file xrec-pl writes goes through these so that a crash never leaves a half-written file where a
complete one is expected: the data goes to a temporary file in the same folder, which is then renamed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import numpy


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is one of a ``Literal[...]`` type's values.

    The CLI checks a switch against its ``Literal`` annotation already; this gives Python callers the same guard
    from the same single list of choices.

    Args:
        name: what the value is (named in the message).
        value: the value to check.
        choices: a ``Literal[...]`` type.
    """
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, allowed))}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder beside ``path`` that becomes ``path`` (absent or empty) only if the block succeeds.

    On an error the staging folder is removed and ``path`` is left as it was. The folder gets a plain ``mkdir``'s
    mode (``mkdtemp`` makes private ones).
    """
    import shutil

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        if out.exists():
            out.rmdir()  # callers refuse a non-empty folder first
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dump_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically. Tensors and numpy scalars become numbers."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_to_jsonable) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write one JSON object per line, atomically."""
    text = "".join(json.dumps(row, ensure_ascii=False, default=_to_jsonable) + "\n" for row in rows)
    return atomic_write_text(path, text)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed derived from ``(seed, epoch, stream)``; distinct tuples give unrelated streams.

    ``seed + epoch`` (what ``DistributedSampler`` uses) makes ``(seed=0, epoch=1)`` equal ``(seed=1, epoch=0)``.
    """
    state = numpy.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(2, dtype=numpy.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))
