"""Stage 2 speed: explainer training and generation, ours vs a re-implementation of the XRec reference's choices.

Both sides use the same frozen LLM (one copy, shared), the same adapters (MoE, random per-id graph vectors), the
same prompts (chat style, the same token ids) and the same records. They differ in how:

- **ours, training**: :class:`~xrec_pl.lit.explainer.ExplainerModule` + :class:`~data_modules.explanations.
  ExplanationDataModule` under a real ``Trainer`` (its per-step overhead included): records tokenised once in
  ``setup()`` (timed separately), length-bucketed batches, SDPA attention, LM head and loss at the labelled positions
  only, out-of-place injection hooks, Adam on the adapters. ``precision`` is the Trainer's (``bf16-mixed`` on CPU =
  bf16 autocast).
- **reference-style, training** (as XRec's ``explainer/``): one record per step, tokenised inside the step, eager
  attention, the model's own forward with ``labels`` (full-vocabulary logits at every position, HF loss), injection
  by in-place index assignment into the 4-D ``(B, heads, T, head_dim)`` q/k/v states (hooks that edit the projection
  outputs in place, as XRec's modified attention did) and into the input embeddings, Adam on the adapters.
- **generation**: ours = ``generate_explanations`` on left-padded batches (KV cache, per-row stop at EOS); reference =
  the same greedy ``generate`` one record at a time (its default KV cache), eager attention, in-place injection.
  Both: max 128 new tokens, stop at EOS, the same suppressed tokens, so the texts can be compared one to one.

Timing: a warm-up of each side first, then the sides alternate (reference, ours, reference, ours, ...) in one process
so that load from other processes hits both; figures are medians over the repetitions (training) or over the
record chunks (generation: each chunk of ``gen_batch_size`` records is generated one by one, then as one batch).
Peak memory comes from a fresh subprocess per side (``VmHWM``/``ru_maxrss``; CUDA peak on GPU).

LLMs: ``"embedded"`` (SmolLM2-135M), any name ``load_frozen_llm`` takes, and, in this bench only, ``"random-7b"``
(Llama-2-7B dimensions, random weights, bf16 on CUDA; no download) and ``"random-tiny"`` (the same code path, seconds
on CPU; tests). Both random models use the tiny local tokenizer (more tokens per text than Llama's; figures are per
token). On CUDA the output adds MFU = achieved FLOP/s / peak (training ``4 x params x tokens``: frozen forward plus
input-gradient backward; generation ``2 x params x tokens``); the peak comes from :data:`PEAK_FLOPS` by device name.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from xrec_pl.models.llm import resolve_dtype
from xrec_pl.outputs import refuse_data_output
from xrec_pl.tools.bench.stage2_common import (
    PEAK_FLOPS,
    build,
    fit_ours,
    generate_ours,
    load_note,
    peak_rss_mb,
    proc_status_kb,
    reset_peak_rss,
    twin_in_dtype,
)
from xrec_pl.tools.bench.stage2_parts import bench_ablation, bench_generation, bench_training
from xrec_pl.tools.bench.stage2_reference import reference_generate, reference_train

__all__ = ["PEAK_FLOPS", "run_stage2_bench"]


# --------------------------------------------------------------------------------------------------------------------
# peak memory, one fresh subprocess per side
def _memory_child(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    dtype = args.llm_dtype if args.memory_side == "ours" else "auto"
    module, dm = build(args.llm, Path(args.data_dir), device, args.seed, args.batch_size, dtype)
    rows, records = _pick(dm, "trn", args.batch_size * args.steps, args.seed)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    loaded = (proc_status_kb("VmRSS") or 0) / 1024
    reset_peak_rss()
    if args.memory_side == "reference":
        adapters = [copy.deepcopy(module.user_adapter).train(), copy.deepcopy(module.item_adapter).train()]
        opt = torch.optim.Adam([p for a in adapters for p in a.parameters()], lr=1e-4)
        reference_train(module, dm.builder, records, adapters, opt, device)
    else:
        dm.use_rows("trn", rows)
        fit_ours(module, dm, device, args.precision)
    out: dict[str, Any] = {"rss_after_load_mb": loaded, "train_peak_rss_mb": peak_rss_mb()}
    if device != "cpu":
        out["train_cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    out["peak_reset"] = reset_peak_rss()
    gen_rows, gen_records = _pick(dm, "tst", args.gen_batch_size, args.seed)
    if args.memory_side == "reference":
        reference_generate(module, dm.builder, gen_records, args.max_new_tokens, device)
    else:
        generate_ours(module, dm, gen_rows, args.gen_batch_size, args.max_new_tokens, args.precision)
    out["generate_peak_rss_mb"] = peak_rss_mb()
    if device != "cpu":
        out["generate_cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _bench_memory(data_dir: Path, opts: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"measured": "fresh subprocess per side; peak RSS = VmHWM (reset between phases)"}
    for side in ("reference", "ours"):
        cmd = [sys.executable, "-m", "xrec_pl.tools.bench.stage2", str(data_dir), "--memory-side", side]
        for key in (
            "llm",
            "device",
            "precision",
            "llm_dtype",
            "threads",
            "batch_size",
            "gen_batch_size",
            "max_new_tokens",
            "seed",
        ):
            if opts.get(key) is not None:
                cmd += [f"--{key.replace('_', '-')}", str(opts[key])]
        cmd += ["--steps", str(opts["memory_steps"])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            result[side] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
        else:
            result[side] = json.loads(lines[-1])
    return result


# --------------------------------------------------------------------------------------------------------------------
def _pick(dm, split: str, n: int, seed: int) -> tuple[list[int], list[dict]]:
    import numpy as np

    frame = dm.split_records(split)
    rng = np.random.default_rng(seed + (0 if split == "trn" else 1))
    rows = sorted(rng.choice(len(frame), size=min(n, len(frame)), replace=False).tolist())
    return rows, [frame.iloc[r].to_dict() for r in rows]


def run_stage2_bench(
    data_dir: str | os.PathLike,
    parts: list[str] | tuple[str, ...] = ("stage2", "generation"),
    quick: bool = False,
    llm: str = "embedded",
    threads: int | None = None,
    repeats: int | None = None,
    train_records: int | None = None,
    gen_records: int | None = None,
    batch_size: int = 8,
    gen_batch_size: int = 16,
    max_new_tokens: int = 128,
    precision: str = "32-true",
    llm_dtype: str = "auto",
    memory: bool = True,
    device: str = "auto",
    seed: int = 0,
    out_json: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Time stage-2 training and generation, ours vs reference-style; measure peak memory and checkpoint size.

    Args:
        data_dir: XRec data folder (``trn``/``val``/``tst`` records and ``para_dict``).
        parts: ``"stage2"`` (training throughput), ``"generation"``, ``"ablation"`` (what each change buys: one
            forward+backward over the same records with the changes added one at a time).
        quick: fewer records and repetitions (said so in the output).
        llm: ``"embedded"``, ``"random-7b"`` (CUDA), ``"random-tiny"`` (tests) or any ``load_frozen_llm`` name.
        threads: ``torch.set_num_threads`` for both sides (default: leave as is).
        repeats: timed training runs per side (median reported); default 3, quick 2.
        train_records: training records per run (the same for both sides); default 64, quick 16.
        gen_records: test records generated by each side; default 64, quick 8.
        batch_size: our training batch size (the reference's is 1).
        gen_batch_size: our generation batch size (the reference's is 1).
        max_new_tokens: generation budget (XRec: 128).
        precision: our Trainer's precision (``"32-true"``, ``"bf16-mixed"``); the reference runs in the LLM dtype.
        llm_dtype: the dtype of *our* frozen LLM (``"auto"``: fp32 on CPU, bf16 on CUDA; ``"bfloat16"``: bf16
            weights, fp32 adapters). The reference side keeps ``"auto"`` (a second copy of the LLM when they
            differ; same adapters and embedding tables).
        memory: measure peak memory in one fresh subprocess per side.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        seed: seed of the record choice, the adapters and the random embeddings.
        out_json: also write the result here.

    Returns:
        ``{"stage2": {...}, "generation": {...}, "memory": {...}}`` (the parts asked for), each with ``ours_*``,
        ``reference_*`` and ``ratio`` figures plus the machine header, threads and load averages.
    """
    from xrec_pl.tools.bench.clock import machine_header

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = repeats or (2 if quick else 3)
    train_records = train_records or (16 if quick else 64)
    gen_records = gen_records or (8 if quick else 64)
    opts = {
        "llm": llm,
        "device": device,
        "repeats": repeats,
        "precision": precision,
        "llm_dtype": llm_dtype,
        "gen_batch_size": gen_batch_size,
        "max_new_tokens": max_new_tokens,
        "threads": threads,
        "batch_size": batch_size,
        "seed": seed,
        "memory_steps": 2,
    }
    header = {**machine_header(), "load_before": load_note(), "llm": llm, "quick": quick}
    torch.manual_seed(seed)
    reference, dm = build(llm, Path(data_dir), device, seed, batch_size)
    same = resolve_dtype(llm_dtype) == resolve_dtype("auto")  # e.g. "fastest" on a CPU without bf16: one copy
    module = reference if same else twin_in_dtype(reference, llm, device, seed, llm_dtype)
    header["ours_llm_dtype"] = str(next(module.llm.parameters()).dtype)
    header["reference_llm_dtype"] = str(next(reference.llm.parameters()).dtype)
    results: dict[str, Any] = {}
    if "stage2" in parts:
        rows, records = _pick(dm, "trn", train_records, seed)
        # the DataModule's own seeded subset choice must pick the same rows: hand it exactly these
        dm.use_rows("trn", rows)
        results["stage2"] = {**bench_training(module, dm, records, rows, opts, reference), "machine": header}
    if "ablation" in parts:
        rows, records = _pick(dm, "trn", max(train_records, 4 * batch_size), seed + 1)
        results["ablation"] = {**bench_ablation(module, dm, records, opts), "machine": header}
    if "generation" in parts:
        rows, records = _pick(dm, "tst", gen_records, seed)
        results["generation"] = {**bench_generation(module, dm, records, rows, opts, reference), "machine": header}
    if memory:
        results["memory"] = {**_bench_memory(Path(data_dir), opts), "machine": header}
    for part in results.values():
        part["load_after"] = load_note()
    rank_zero_info(format_table(results, quick))
    if out_json is not None:
        from xrec_pl.utils import dump_json

        dump_json(out_json, results)
    return results


def format_table(results: dict[str, Any], quick: bool = False) -> str:
    """A short text table of the figures (ours / reference / ratio)."""
    lines = [f"stage-2 bench{' (quick: few records, few repetitions)' if quick else ''}"]
    rows = []
    first = next((results[k] for k in ("stage2", "generation", "ablation") if k in results), None)
    if first is not None:
        m = first["machine"]
        lines.append(
            f"machine: {m['cpu']} x{m['cpu_count']}, device {m['device']}, torch threads {m['torch_threads']}, "
            f"load {m['load_before']} -> {first.get('load_after')}, llm {m['llm']}"
        )
    if "stage2" in results:
        s = results["stage2"]
        rows += [
            ("train samples/s", s["ours_samples_per_s"], s["reference_samples_per_s"]),
            ("train target tokens/s", s["ours_target_tokens_per_s"], s["reference_target_tokens_per_s"]),
        ]
    if "generation" in results:
        g = results["generation"]
        rows += [
            ("generation explanations/s", g["ours_explanations_per_s"], g["reference_explanations_per_s"]),
            ("generation new tokens/s", g["ours_new_tokens_per_s"], g["reference_new_tokens_per_s"]),
        ]
    lines.append(f"{'figure':28s} {'ours':>10s} {'reference':>10s} {'ratio':>7s}")
    lines += [f"{name:28s} {a:10.2f} {b:10.2f} {a / b:6.2f}x" for name, a, b in rows]
    if "stage2" in results:
        lines.append(
            f"training limit (work ratio, fp32, no batching gain): {results['stage2']['work_ratio_limit']:.2f}x"
        )
    if "generation" in results:
        lines.append(
            f"generation limit (decode free, batched prefill only): {results['generation']['ratio_limit_prefill']:.2f}x"
        )
    if "generation" in results:
        g = results["generation"]
        lines.append(f"greedy texts equal (batched vs one at a time): {g['texts_equal']}/{g['records']}")
    if "stage2" in results:
        s = results["stage2"]
        lines.append(
            f"checkpoint {s['checkpoint_bytes'] / 2**20:.1f} MiB (adapters + optimizer) vs frozen LLM "
            f"{s['frozen_llm_bytes'] / 2**20:.1f} MiB"
        )
    if "ablation" in results:
        lines.append("what each change bought (forward+backward, same records):")
        lines += [
            f"  {a['change']:52s} {a['samples_per_s']:7.2f} samples/s  x{a['vs_previous']:.2f} (x{a['vs_first']:.2f} total)"
            for a in results["ablation"]["steps"]
        ]
    mem = results.get("memory", {})
    for side in ("ours", "reference"):
        if "train_peak_rss_mb" in mem.get(side, {}):
            v = mem[side]
            lines.append(
                f"peak RSS {side}: loaded {v['rss_after_load_mb']:.0f} MiB, train {v['train_peak_rss_mb']:.0f} MiB, "
                f"generate {v['generate_peak_rss_mb']:.0f} MiB"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """``python -m xrec_pl.tools.bench.stage2 DATA_DIR [--quick] [--threads N] [--precision bf16-mixed] [--out FILE]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--parts", nargs="+", default=["stage2", "generation"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llm", default="embedded")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--train-records", type=int, default=None)
    parser.add_argument("--gen-records", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gen-batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--llm-dtype", default="auto", help="our LLM's dtype (auto | bfloat16 | float32)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--memory-side", choices=["ours", "reference"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    refuse_data_output(parser, args.out, args.data_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_side:
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        result = _memory_child(args)
        sys.stdout.write(json.dumps(result) + "\n")
        return result
    return run_stage2_bench(
        args.data_dir,
        parts=args.parts,
        quick=args.quick,
        llm=args.llm,
        threads=args.threads,
        repeats=args.repeats,
        train_records=args.train_records,
        gen_records=args.gen_records,
        batch_size=args.batch_size,
        gen_batch_size=args.gen_batch_size,
        max_new_tokens=args.max_new_tokens,
        precision=args.precision,
        llm_dtype=args.llm_dtype,
        memory=not args.no_memory,
        device=args.device,
        seed=args.seed,
        out_json=args.out,
    )


if __name__ == "__main__":
    main()
