"""Progress bars for the long tool commands (``evaluate``, ``experiment``): tqdm on stderr, off where nobody watches.

A bar is shown when stderr is a terminal and ``CI`` is not set; ``XREC_PROGRESS=1`` forces bars on (``0`` off).
Stage commands (``fit``, ``predict``) use Lightning's own progress bar (``trainer.enable_progress_bar``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

_TRUE = ("1", "true", "yes", "on")


def progress_enabled(stream: Any = None) -> bool:
    """Whether to draw bars: ``XREC_PROGRESS`` if set, else off under ``CI``, else only on a terminal."""
    forced = os.environ.get("XREC_PROGRESS", "").strip().lower()
    if forced:
        return forced in _TRUE
    if os.environ.get("CI", "").strip().lower() in _TRUE:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None, desc: str, unit: str = "it", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (disabled per :func:`progress_enabled`): elapsed time, rate and ETA included."""
    kwargs.setdefault("leave", True)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress_enabled(), **kwargs)
