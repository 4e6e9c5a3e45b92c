"""Stable text hashing (no torch import): USR gathers these int64 hashes across ranks instead of text."""

from __future__ import annotations

import hashlib


def stable_text_hash(text: str) -> int:
    """Signed 64-bit hash of a text's whitespace-normalised token sequence (stable across processes and runs).

    Python's ``hash()`` is salted per process, so it cannot be compared across ranks; blake2b is not.
    """
    tokens = text.split()
    digest = hashlib.blake2b("\x1f".join(tokens).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
