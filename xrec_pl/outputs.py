"""Output paths are checked before any work: a command never scores for minutes and then fails to write, and never
writes over one of its own inputs.

Each check raises ``DataError`` with one line that names the option and the path. Writability is probed by creating
(and removing) a temporary file in the nearest existing folder, since permission bits say nothing for root and
nothing about read-only file systems.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from xrec_pl.errors import DataError


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        return False
    return a.resolve() == b.resolve()


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def _probe_writable(folder: Path, option: str, shown: Path) -> None:
    if not folder.is_dir():
        raise DataError(f"{option} {shown}: cannot be created, {folder} is a file")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise DataError(f"{option} {shown}: {folder} is not writable ({err.strerror or err})") from None


def files_under(folder: str | os.PathLike) -> list[Path]:
    """Every file below ``folder`` (what a command may read from a data folder); empty when it is not a folder."""
    root = Path(folder)
    return [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []


def check_output_file(path: str | os.PathLike, option: str, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check that ``path`` can be written as a file and is none of ``inputs``; returns it as a ``Path``."""
    out = Path(path)
    if out.is_dir():
        raise DataError(f"{option} {out}: is a folder; give a file path")
    for given in inputs:
        if given is not None and _same(out, Path(given)):
            raise DataError(f"{option} {out}: is also an input of this command; writing it would destroy that input")
    _probe_writable(_existing_ancestor(out.parent), option, out)
    return out


def check_output_dir(path: str | os.PathLike, option: str, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check that ``path`` is (or can be created as) a writable folder and holds none of ``inputs``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DataError(f"{option} {out}: is a file; give a folder")
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if _same(out, src) or src in out.resolve().parents:
            raise DataError(f"{option} {out}: lies in the input {given}; choose a folder outside it")
    _probe_writable(_existing_ancestor(out), option, out)
    return out


def check_run_files(root: str | os.PathLike, names: Iterable[str], option: str) -> None:
    """Files a run will write into ``root`` must not be folders (found before training, not after)."""
    for name in names:
        target = Path(root) / name
        if target.is_dir():
            raise DataError(f"{option} {root}: {target} is a folder where the run writes a file; remove or rename it")


def refuse_data_output(parser: Any, out: str | None, data_dir: str | os.PathLike) -> None:
    """For ``argparse`` tools (the ``python -m`` benches): ``--out`` naming a file of the data folder they read is one
    usage error (exit 2), before any work."""
    if out:
        try:
            check_output_file(out, "--out", files_under(data_dir))
        except DataError as err:
            parser.error(str(err))
