"""Analyses of trained stage-2 runs (issue 15): embedding swap, soft-prompt dispersion, outlier buckets, curves.

``xrec-pl analyze --run RUN_DIR --parts '[swap, soft_prompt, buckets]'`` writes ``RUN_DIR/analysis/{part}.json``
(summary) and ``{part}.jsonl`` (one row per record). Heavy imports happen inside the functions.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

__all__ = ["PARTS", "analyze"]

PARTS = ("swap", "soft_prompt", "buckets")


def _stored_hparams(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from xrec_pl.data.pickles import safe_torch_load

    meta = safe_torch_load(checkpoint, "checkpoint")
    if not isinstance(meta, dict):
        from xrec_pl.errors import DataError

        raise DataError(f"{checkpoint}: not a Lightning checkpoint (a {type(meta).__name__})")
    return dict(meta.get("hyper_parameters") or {}), dict(meta.get("datamodule_hyper_parameters") or {})


def analyze(
    run: str,
    parts: list[str] | None = None,
    checkpoint: str | None = None,
    data_dir: str | None = None,
    embeddings: str | None = None,
    split: str = "tst",
    limit: int | None = None,
    seed: int = 0,
    generate: int = 0,
    precision: str = "32",
    batch_size: int | None = None,
    edges: list[int] | None = None,
    threads: int | None = None,
    replace: list[str] | None = None,
    llm_dtype: str | None = None,
) -> dict[str, Any]:
    """Run analyses on a trained stage-2 run and write their results into ``RUN/analysis/``.

    Args:
        run: the stage-2 run folder (holds ``checkpoints/last.ckpt`` and, for ``buckets``, ``predictions.jsonl``).
        parts: any of ``swap`` (own vs swapped user/item embeddings: reference NLL, paired), ``soft_prompt``
            (dispersion of the injected vectors per injection point; mean-replacement NLL) and ``buckets`` (metrics by
            the stage-1 rank of the explained item). Default: all three.
        checkpoint: the checkpoint to analyse (default ``RUN/checkpoints/last.ckpt``).
        data_dir: override the data folder stored in the checkpoint.
        embeddings: stage-1 embeddings (default: the run's ``embeddings_path``); ``buckets`` ranks with them.
        split: ``tst`` or ``val`` (``swap`` and ``soft_prompt``; ``buckets`` uses the predictions file).
        limit: only this many (seeded) records of the split.
        seed: seed of the swap partners and of the bootstrap.
        generate: ``swap`` also generates for this many records with own and swapped embeddings and scores the change
            with BERTScore (slow: three generations per record). 0: off.
        precision: ``32`` or ``bf16-mixed`` for the NLL passes.
        batch_size: teacher-forced batch size (default: the run's ``eval_batch_size``).
        edges: rank edges of the buckets (default ``[20, 1000]``).
        threads: torch threads (default: leave as is; ``OMP_NUM_THREADS`` applies).
        replace: ``soft_prompt`` mean-replacement variants among ``user``, ``item``, ``both`` (default: all three;
            each is one more pass over the split).
        llm_dtype: hold the frozen LLM in this dtype (``bfloat16``: bf16 weights, about twice as fast on a CPU with
            bf16 instructions; default: the run's own ``llm_dtype``).

    Returns:
        ``{part: summary}``.
    """
    import torch

    from xrec_pl.errors import DataError
    from xrec_pl.tools.analysis.run import find_checkpoint
    from xrec_pl.utils import dump_json, write_jsonl

    parts = list(parts or PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise DataError(f"--parts: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if any(r not in ("user", "item", "both") for r in replace or ()):
        raise DataError(f"--replace: {replace}; choose among user, item, both")
    if threads:
        torch.set_num_threads(int(threads))
    run_dir = Path(run)
    ckpt = find_checkpoint(run_dir, checkpoint)
    from xrec_pl.run_lock import lock_run_folder

    lock_run_folder(run_dir)  # not while another process trains or analyses this run (it writes RUN/analysis/)
    out_dir = run_dir / "analysis"
    results: dict[str, Any] = {}
    context = {
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "llm_dtype": llm_dtype or "the run's",
        "precision": precision,
    }

    loaded = None
    if "swap" in parts or "soft_prompt" in parts:
        from xrec_pl.tools.analysis.run import load_run

        t0 = time.perf_counter()
        loaded = load_run(
            run_dir, str(ckpt), data_dir, embeddings, eval_subset=limit, batch_size=batch_size, llm_dtype=llm_dtype
        )
        context["load_s"] = time.perf_counter() - t0
    if "swap" in parts:
        from xrec_pl.tools.analysis.swap import swap_test

        summary, rows = swap_test(loaded, split=split, seed=seed, generate=generate, precision=precision)
        results["swap"] = {**summary, **context}
        dump_json(out_dir / "swap.json", results["swap"])
        write_jsonl(out_dir / "swap.jsonl", rows)
    if "soft_prompt" in parts:
        from xrec_pl.tools.analysis.soft_prompt import soft_prompt_analysis

        summary, rows = soft_prompt_analysis(
            loaded, split=split, seed=seed, precision=precision, replace=tuple(replace or ("user", "item", "both"))
        )
        results["soft_prompt"] = {**summary, **context}
        dump_json(out_dir / "soft_prompt.json", results["soft_prompt"])
        write_jsonl(out_dir / "soft_prompt.jsonl", rows)
    if "buckets" in parts:
        from xrec_pl.tools.analysis.buckets import bucket_report

        hp, dm_hp = _stored_hparams(ckpt)
        emb = embeddings or hp.get("embeddings_path")
        data = data_dir or dm_hp.get("data_dir")
        if not emb:
            raise DataError(f"{ckpt}: the run stores no stage-1 embeddings_path; pass --embeddings")
        if not data:
            raise DataError(f"{ckpt}: no data_dir stored; pass --data_dir")
        t0 = time.perf_counter()
        summary, rows = bucket_report(
            run_dir / "predictions.jsonl",
            emb,
            data,
            edges=tuple(edges or (20, 1000)),
            swap_rows=out_dir / "swap.jsonl",
            seed=seed,
        )
        results["buckets"] = {**summary, **context, "wall_s": time.perf_counter() - t0}
        dump_json(out_dir / "buckets.json", results["buckets"])
        write_jsonl(out_dir / "buckets.jsonl", rows)
    return results
