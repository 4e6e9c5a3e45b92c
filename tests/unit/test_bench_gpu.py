"""``make bench-gpu`` runs on a CPU-only machine as its own smoke test: tiny random Llama, JSON in < 1 minute."""

from __future__ import annotations

import json
import time

import pytest

from xrec_pl.tools.bench import gpu


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread (shared 2-core box)."""


def test_bench_gpu_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench_gpu.json"
    start = time.perf_counter()
    gpu.main(["--out", str(out), "--device", "cpu"])
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["smoke_test_only"] is True and summary["llm"] == "random-tiny"
    assert summary["train_tokens_per_s"] > 0 and summary["generation_tokens_per_s"] > 0
    assert summary["peak_host_rss_mb"] > 0 and summary["train_mfu"] is None  # MFU: CUDA only
    assert result["stage2"]["machine"]["quick"] is True
