"""Shared pytest configuration. Fixtures live in tests/fixtures/* and are registered here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.llm",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_AMAZON = REPO_ROOT.parent / "shared" / "data" / "amazon"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def amazon_dir() -> Path:
    """The real XRec Amazon-books folder beside the clone; tests that need it skip without it."""
    if not (SHARED_AMAZON / "para_dict.pickle").exists():
        pytest.skip(f"real data not found at {SHARED_AMAZON}")
    return SHARED_AMAZON


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():  # not the folder name
            item.add_marker(skip_gpu)
