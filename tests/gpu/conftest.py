"""GPU tests: each runs on CUDA under ``make test-gpu`` (marked ``gpu``, skipped without CUDA) and, where a CPU
equivalent exists, on the CPU in the normal suite through the ``device`` fixture (same code, other device)."""

from __future__ import annotations

import pytest
import torch

CPU_AND_CUDA = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=CPU_AND_CUDA)
def device(request) -> str:
    """``cpu`` (normal suite) or ``cuda`` (``make test-gpu``; skipped without CUDA by the root conftest)."""
    if request.param == "cpu":
        torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is fastest
    return request.param


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
