"""``make bench-gpu``: the stage-2 numbers a reviewer reads off one GPU, in one JSON file.

Training tokens/s and MFU of the explainer at Llama-2-7B shape (random bf16 weights, no download), greedy generation
tokens/s, and peak memory, on the synthetic dataset (written to a temporary folder when no data folder is given).
On a machine without CUDA the same code runs on a tiny random Llama in well under a minute: that is the script's
smoke test (``tests/unit/test_bench_gpu.py``), not a CPU benchmark.

    python -m xrec_pl.tools.bench.gpu --out bench_results/bench_gpu.json [--data-dir DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from xrec_pl.utils import dump_json

# quick settings: 16 training records x 2 repeats per side, 8 generated records (the stage-2 bench's quick mode)
CUDA_SETTINGS = {"llm": "random-7b", "batch_size": 8, "gen_batch_size": 8, "max_new_tokens": 64}
CPU_SETTINGS = {
    "llm": "random-tiny",
    "batch_size": 2,
    "gen_batch_size": 2,
    "max_new_tokens": 6,
    "train_records": 4,
    "gen_records": 4,
    "repeats": 1,
}


def _peak_memory_mb(device: str) -> dict[str, float]:
    out = {"peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def run_gpu_bench(out: str | Path, data_dir: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Run the stage-2 bench at 7B shape on CUDA (tiny on CPU) and write a flat summary plus the full result.

    Args:
        out: JSON output path.
        data_dir: XRec data folder; default: the synthetic dataset, written to a temporary folder.
        device: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.

    Returns:
        ``{"summary": {...}, "stage2": {...}, "generation": {...}}``; the summary holds ``train_tokens_per_s``,
        ``train_mfu`` (CUDA, known GPU), ``generation_tokens_per_s``, peak memory and the wall time.
    """
    from xrec_pl.tools.bench.stage2 import run_stage2_bench

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = dict(CUDA_SETTINGS if device == "cuda" else CPU_SETTINGS)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xrec-bench-gpu-") as tmp:
        if data_dir is None:
            from xrec_pl.data.synthetic import make_synthetic

            data_dir = make_synthetic(Path(tmp) / "synthetic", seed=0, size="default" if device == "cuda" else "tiny")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = run_stage2_bench(
            data_dir, parts=("stage2", "generation"), quick=True, memory=False, device=device, **settings
        )
    train, gen = result["stage2"], result["generation"]
    summary = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "llm": settings["llm"],
        "llm_params": train.get("llm_params") or _params_of(settings["llm"]),
        "train_tokens_per_s": train["ours_target_tokens_per_s"],
        "train_samples_per_s": train["ours_samples_per_s"],
        "train_mfu": train.get("ours_mfu"),
        "generation_tokens_per_s": gen["ours_new_tokens_per_s"],
        "generation_mfu": gen.get("ours_mfu"),
        **_peak_memory_mb(device),
        "wall_s": time.perf_counter() - start,
        "smoke_test_only": device != "cuda",
    }
    full = {"summary": summary, **result}
    dump_json(Path(out), full)
    return full


def _params_of(llm: str) -> int | None:
    return {"random-7b": 6_738_415_616}.get(llm)  # Llama-2-7B's parameter count (LlamaConfig defaults)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line of :func:`run_gpu_bench`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_results/bench_gpu.json")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = parser.parse_args(argv)
    result = run_gpu_bench(args.out, data_dir=args.data_dir, device=args.device)
    sys.stdout.write(json.dumps(result["summary"], indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
