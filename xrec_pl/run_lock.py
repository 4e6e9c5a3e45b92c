"""One process at a time per run folder: an advisory lock that the kernel drops when its holder dies.

Two ``fit``s (or a ``fit`` and a ``pipeline``) writing into the same folder would leave a mix of both runs
(``last.ckpt`` of one, the best checkpoint of the other, ``metrics.json`` naming a file that no longer exists).
:func:`lock_run_folder` takes ``<folder>/.xrec-pl.lock`` with ``flock``; a second process stops with one line
naming the holder's pid and host. A killed holder leaves no stale lock (the kernel releases it), so a resume
after ``kill -9`` works at once.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from xrec_pl.errors import DataError

LOCK_NAME = ".xrec-pl.lock"
_held: dict[Path, int] = {}


def _is_launcher_child() -> bool:
    # DDP ranks other than the global rank 0 run the same command line again: the run belongs to rank 0.
    for var in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "0")
        if value.isdigit() and int(value) != 0:
            return True
    return False


def lock_run_folder(folder: str | os.PathLike) -> Path | None:
    """Hold the run folder's lock until :func:`release_all` or the end of the process.

    Returns the lock file, or ``None`` in a DDP child process. Taking a lock this process already holds is a no-op.

    Raises:
        DataError: another live process holds the folder (the message names its pid, host and start time), or the
            folder cannot be created or written.
    """
    import fcntl

    if _is_launcher_child():
        return None
    root = Path(folder).resolve()
    if root in _held:
        return root / LOCK_NAME
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: run folder is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a lock file replaced by a link to another file must not make us truncate that file
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        if (root / LOCK_NAME).is_symlink():
            raise DataError(
                f"{root / LOCK_NAME}: is a link; remove it (a run folder's lock must be a plain file)"
            ) from None
        raise DataError(f"{root}: cannot write into the run folder ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise DataError(f"{root}: run folder in use by {holder}; wait for it to end or choose another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
    _held[root] = fd
    return root / LOCK_NAME


def release_all() -> None:
    """Release every run-folder lock this process holds (the CLI calls this when a command ends)."""
    import fcntl

    for root, fd in list(_held.items()):
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            _held.pop(root, None)
