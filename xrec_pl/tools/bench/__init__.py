"""``xrec-pl bench``: each part of xrec-pl timed against a reference-style implementation in the same process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from xrec_pl.errors import ConfigError
from xrec_pl.tools.bench.clock import machine_header
from xrec_pl.utils import dump_json

PARTS = ("stage1", "stage2", "generation")


def bench(
    parts: list[str] | None = None,
    data_dir: str = "../shared/data/amazon",
    out: str = "bench_results/bench.json",
    quick: bool = False,
    threads: int | None = None,
    precision: str = "32-true",
    llm: str = "embedded",
    llm_dtype: str | None = None,
) -> dict[str, Any]:
    """Benchmark xrec-pl against reference-style implementations; print a table and write JSON.

    Args:
        parts: Any of ``stage1`` (one LightGCN epoch), ``stage2`` (explainer training throughput), ``generation``.
        data_dir: XRec data folder (Amazon-books by default).
        out: JSON output path.
        quick: Fewer steps and repetitions (extrapolated; said so in the output).
        threads: ``torch.set_num_threads`` for both sides (on a busy shared CPU, 1 is often fastest).
        precision: Stage-2 precision of our side (``32-true`` or ``bf16-mixed``; the reference stays fp32).
        llm: Stage-2 LLM: ``embedded``, ``random-7b`` (Llama-2-7B dimensions, random bf16 weights, CUDA) or
            ``random-tiny``.
        llm_dtype: Dtype of our frozen LLM (``auto``, ``bfloat16``, ``float32``); default: what the shipped configs
            use, ``bfloat16`` weights on a CPU with native bf16 instructions, else ``auto``. The reference stays
            ``auto`` (fp32 on a CPU).
    """
    parts = list(parts or PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"bench: unknown part(s) {unknown}; choose from {list(PARTS)}")
    from xrec_pl.outputs import check_output_file, files_under

    check_output_file(out, "--out", files_under(data_dir))  # never a file of the data it reads
    results: dict[str, Any] = {"machine": machine_header()}
    if "stage1" in parts:
        from xrec_pl.tools.bench.stage1 import run_stage1_bench

        results["stage1"] = run_stage1_bench(data_dir, repeats=2, max_steps=20 if quick else None, num_threads=threads)
    if "stage2" in parts or "generation" in parts:
        from xrec_pl.models.llm import resolve_dtype
        from xrec_pl.tools.bench.stage2 import run_stage2_bench

        stage2_parts = [p for p in parts if p != "stage1"]
        dtype = llm_dtype or shipped_llm_dtype()
        resolve_dtype(dtype)  # a bad name is one line now, not after the reference LLM has loaded
        results.update(
            run_stage2_bench(
                data_dir,
                parts=stage2_parts,
                quick=quick,
                llm=llm,
                threads=threads,
                precision=precision,
                llm_dtype=dtype,
            )
        )
    dump_json(Path(out), results)
    sys.stdout.write(json.dumps(results, indent=2, default=str) + "\n")
    return results


def shipped_llm_dtype() -> str:
    """The LLM dtype the shipped configs give this machine: bf16 weights on a CPU with native bf16 (their
    ``llm_dtype: bfloat16``), else ``auto`` (fp32 on a CPU without bf16 instructions, as their comments advise; the
    GPU's half dtype on CUDA)."""
    import torch

    from xrec_pl.models.llm import cpu_has_native_bf16

    return "bfloat16" if not torch.cuda.is_available() and cpu_has_native_bf16() else "auto"
