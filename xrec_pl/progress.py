"""Progress bars for the long tool commands (``evaluate``, ``experiment``): tqdm on stderr, off where nobody watches.

A bar is shown when stderr is a terminal and ``CI`` is not set; ``XREC_PROGRESS=1`` forces bars on (``0`` off).
Stage commands (``fit``, ``predict``) use Lightning's own progress bar (``trainer.enable_progress_bar``) on a terminal;
where stderr is a file or pipe (``nohup``, SLURM, ``> log 2>&1``) they print plain progress lines instead
(:func:`log_progress_wanted`, ``callbacks.log_progress.LogProgress``) every ``XREC_PROGRESS_EVERY`` seconds.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

from xrec_pl.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")
LOG_LINES = "log"
"""``XREC_PROGRESS=log``: stage commands print progress lines wherever stderr goes (a terminal or CI too)."""
DEFAULT_EVERY_S = 60.0


def _forced() -> str:
    return os.environ.get("XREC_PROGRESS", "").strip().lower()


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in _TRUE


def _is_terminal(stream: Any) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_enabled(stream: Any = None) -> bool:
    """Whether to draw bars: ``XREC_PROGRESS`` if set, else off under ``CI``, else only on a terminal."""
    forced = _forced()
    if forced:
        return forced in _TRUE
    if _under_ci():
        return False
    return _is_terminal(stream)


def log_progress_wanted(stream: Any = None) -> bool:
    """Whether a stage command prints plain progress lines instead of Lightning's bar.

    Yes where bars are off only because stderr is no terminal (a log file, ``nohup``, SLURM); no under ``CI``.
    ``XREC_PROGRESS=log`` forces lines on (terminal and CI included); any other value of ``XREC_PROGRESS`` turns them
    off (``1``: Lightning's bar, as on a terminal; ``0``: Lightning's bar too, the tools' bars off).
    """
    forced = _forced()
    if forced:
        return forced == LOG_LINES
    return not _under_ci() and not _is_terminal(stream)


def log_progress_every() -> float:
    """Seconds between two progress lines: ``XREC_PROGRESS_EVERY`` (``>= 0``; ``0``: every step), default 60.

    Raises:
        ConfigError: the variable is set to something that is not a non-negative number.
    """
    raw = os.environ.get("XREC_PROGRESS_EVERY", "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise ConfigError(f"XREC_PROGRESS_EVERY={raw!r}: expected seconds between progress lines (a number >= 0)")
    return seconds


def progress_bar(total: int | None, desc: str, unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (disabled per :func:`progress_enabled`): elapsed time, rate and ETA included."""
    kwargs.setdefault("leave", True)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress_enabled(), **kwargs)
