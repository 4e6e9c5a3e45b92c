"""The measured parts of the stage-2 bench: training throughput, the ablation of each speed-up, generation."""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from xrec_pl.models.lm_loss import cpu_eager_teacher_forcing
from xrec_pl.tools.bench.stage2_common import (
    count_params,
    fit_ours,
    full_logits_loss,
    generate_ours,
    load_note,
    peak_flops,
    trim,
)
from xrec_pl.tools.bench.stage2_reference import reference_generate, reference_train


# --------------------------------------------------------------------------------------------------------------------
def bench_training(module, dm, records, rows, opts: dict[str, Any], reference=None) -> dict[str, Any]:
    """Our ``module`` under a Trainer vs the reference-style loop over ``reference`` (default: the same module)."""
    device, repeats = opts["device"], opts["repeats"]
    reference = module if reference is None else reference
    builder = dm.builder
    encs = [builder.encode_train(r) for r in records]
    target_tokens = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in encs)
    seq_tokens = sum(len(e["input_ids"]) for e in encs)

    ref_adapters = [copy.deepcopy(reference.user_adapter).train(), copy.deepcopy(reference.item_adapter).train()]
    ref_opt = torch.optim.Adam([p for a in ref_adapters for p in a.parameters()], lr=1e-4)
    t = time.perf_counter()
    dm.setup("fit")  # ours: tokenise once (trn subset + val) -- a one-off, reported, not in the step time
    tokenize_s = time.perf_counter() - t

    # warm-up: one reference record, one step of ours
    reference_train(reference, builder, records[:1], ref_adapters, ref_opt, device)
    fit_ours(module, dm, device, opts["precision"], max_steps=1)
    runs = []
    for r in range(repeats):
        t = time.perf_counter()
        reference_train(reference, builder, records, ref_adapters, ref_opt, device)
        if device != "cpu":
            torch.cuda.synchronize()
        ref_s = time.perf_counter() - t
        ours = fit_ours(module, dm, device, opts["precision"])
        runs.append({"reference_s": ref_s, "ours_s": ours["seconds"], "ours_steps": ours["steps"], "load": load_note()})
        rank_zero_info(f"stage2 bench run {r}: reference {ref_s:.1f} s, ours {ours['seconds']:.1f} s ({load_note()})")
    ref_s = statistics.median(x["reference_s"] for x in runs)
    ours_s = statistics.median(x["ours_s"] for x in runs)
    n = len(records)
    out = {
        "records": n,
        "batch_size": dm.batch_size,
        "precision": opts["precision"],
        "target_tokens": target_tokens,
        "sequence_tokens": seq_tokens,
        "reference_samples_per_s": n / ref_s,
        "ours_samples_per_s": n / ours_s,
        "ratio": ref_s / ours_s,
        "reference_target_tokens_per_s": target_tokens / ref_s,
        "ours_target_tokens_per_s": target_tokens / ours_s,
        "ours_tokenize_once_s": tokenize_s,
        "work_ratio_limit": _work_ratio(module.llm, seq_tokens, target_tokens),
        "runs": runs,
    }
    if device != "cpu":
        out.update(_mfu(module.llm, 4 * seq_tokens, ref_s, ours_s))
    # checkpoint: adapter-only (with optimizer state) vs the frozen LLM
    trainer = fit_ours(module, dm, device, opts["precision"], max_steps=1)["trainer"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapters.ckpt"
        trainer.save_checkpoint(path)
        out["checkpoint_bytes"] = path.stat().st_size
    tensors = {id(t): t for t in module.llm.state_dict().values()}.values()
    out["frozen_llm_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    return out


def bench_ablation(module, dm, records, opts: dict[str, Any]) -> dict[str, Any]:
    """What each change buys: one forward+backward over the same records, changes added one at a time."""
    from data_modules.batching import PadCollator

    device, bs = opts["device"], opts["batch_size"]
    items = []
    for rec in records:
        enc = dm.builder.encode_train(rec)
        enc.update(user_id=int(rec["uid"]), item_id=int(rec["iid"]), index=0)
        items.append(enc)
    lengths = [len(it["input_ids"]) for it in items]
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    collate = PadCollator(module.tokenizer.pad_token_id, side="right")
    bucket = [items[i] for i in order[len(order) // 2 - bs // 2 :][:bs]]  # a length bucket from the middle
    to = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in collate(bucket).items()}.items()
    batch = dict(to)
    singles = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in collate([it]).items()} for it in bucket]
    n_targets = sum(sum(1 for x in it["labels"][1:] if x != -100) for it in bucket)

    def step(batches, full_logits: bool, attn: str, bf16: bool) -> None:
        # attn "cpu": ours on a CPU (eager teacher forcing, the prompt's shared start once per batch); else that kernel
        module.llm.set_attn_implementation("sdpa" if attn == "cpu" else attn)
        ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with cpu_eager_teacher_forcing(attn == "cpu"):
            for b in batches:
                with module.injecting_batch(b), ctx:
                    loss = full_logits_loss(module.llm, b) if full_logits else module.lm_loss(b)
                loss.backward()
        module.zero_grad(set_to_none=True)

    configs = [
        ("batch 1, full-vocab logits, eager (reference maths)", singles, True, "eager", False),
        (f"batch {bs} (one length bucket)", [batch], True, "eager", False),
        ("+ LM head at target positions only", [batch], False, "eager", False),
        ("+ SDPA attention (ours on a GPU)", [batch], False, "sdpa", False),
        ("+ on a CPU: eager teacher forcing, shared prompt start once (= ours)", [batch], False, "cpu", False),
        ("+ bf16 autocast", [batch], False, "cpu", True),
    ]
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    module.train()
    try:
        for r in range(opts["repeats"] + 1):  # round 0 is the warm-up
            for name, batches, full, attn, bf16 in configs:
                t = time.perf_counter()
                step(batches, full, attn, bf16)
                if device != "cpu":
                    torch.cuda.synchronize()
                if r:
                    times[name].append(time.perf_counter() - t)
    finally:
        module.llm.set_attn_implementation("sdpa")
    rows, base, prev = [], None, None
    for name, *_ in configs:
        sec = statistics.median(times[name])
        base, prev = base or sec, prev or sec
        rows.append({"change": name, "samples_per_s": bs / sec, "target_tokens_per_s": n_targets / sec,
                     "vs_previous": prev / sec, "vs_first": base / sec})  # fmt: skip
        prev = sec
    random_batch = lengths[:bs]
    return {
        "records": bs,
        "what": "forward+backward (no optimizer step) over the same records, median of repeats",
        "steps": rows,
        "padding_fraction_random_batch": 1 - sum(random_batch) / (len(random_batch) * max(random_batch)),
        "padding_fraction_bucket": 1
        - sum(len(it["input_ids"]) for it in bucket) / (bs * max(map(len, (it["input_ids"] for it in bucket)))),
        "load": load_note(),
    }


def _work_ratio(llm: nn.Module, seq_tokens: int, target_tokens: int) -> float:
    """Reference FLOPs / ours at equal hardware efficiency: the full-vocab head at every position vs targets only.

    Both sides run the same frozen body forward + input-gradient backward (``4 x body params`` per token); the LM
    head costs ``4 x V x H`` per position where logits are taken. The limit of the training ratio in fp32 without
    batching gains; bf16 and batching efficiency go beyond it.
    """
    head = llm.get_output_embeddings().weight.numel()
    body = count_params(llm) - llm.get_input_embeddings().weight.numel()
    if llm.get_output_embeddings().weight is not llm.get_input_embeddings().weight:
        body -= head
    return (body * seq_tokens + head * seq_tokens) / (body * seq_tokens + head * target_tokens)


def _mfu(llm: nn.Module, flops_per_param: float, ref_s: float, ours_s: float) -> dict[str, Any]:
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    flops = flops_per_param * count_params(llm)
    return {
        "reference_tflops": flops / ref_s / 1e12,
        "ours_tflops": flops / ours_s / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "reference_mfu": flops / ref_s / peak if peak else None,
        "ours_mfu": flops / ours_s / peak if peak else None,
    }


def bench_generation(module, dm, records, rows, opts: dict[str, Any], reference=None) -> dict[str, Any]:
    """Our batched generation with ``module`` vs one-at-a-time ``generate`` with ``reference`` (default: the same)."""
    device, bs, max_new = opts["device"], opts["gen_batch_size"], opts["max_new_tokens"]
    reference = module if reference is None else reference
    stops = set(module.stop_ids())
    builder = dm.builder
    prompt_tokens = sum(len(builder.encode_prompt(r)["input_ids"]) for r in records)
    reference_generate(reference, builder, records[:1], max_new, device)  # warm-up
    generate_ours(module, dm, rows[:2], bs, max_new, opts["precision"])
    chunks, ref_ids, ours_ids = [], {}, {}
    for start in range(0, len(rows), bs):
        part_rows, part_recs = rows[start : start + bs], records[start : start + bs]
        t = time.perf_counter()
        got = reference_generate(reference, builder, part_recs, max_new, device)
        ref_s = time.perf_counter() - t
        ref_ids.update(zip(part_rows, got))
        t = time.perf_counter()
        ours_ids.update(generate_ours(module, dm, part_rows, bs, max_new, opts["precision"]))
        ours_s = time.perf_counter() - t
        t = time.perf_counter()
        generate_ours(module, dm, part_rows, bs, 1, opts["precision"])  # prefill (+1 token) alone: the limit
        prefill_s = time.perf_counter() - t
        ref_new = sum(len(trim(ref_ids[i], stops)) for i in part_rows)
        ours_new = sum(len(trim(ours_ids[i], stops)) for i in part_rows)
        chunks.append({"records": len(part_rows), "reference_s": ref_s, "ours_s": ours_s, "reference_new_tokens": ref_new,
                       "ours_new_tokens": ours_new, "ours_prefill_s": prefill_s, "load": load_note()})  # fmt: skip
        rank_zero_info(f"generation chunk {len(chunks)}: reference {ref_s:.1f} s, ours {ours_s:.1f} s ({load_note()})")
    ref_s = sum(c["reference_s"] for c in chunks)
    ours_s = sum(c["ours_s"] for c in chunks)
    ref_new = sum(c["reference_new_tokens"] for c in chunks)
    ours_new = sum(c["ours_new_tokens"] for c in chunks)
    tok = module.tokenizer
    texts_ref = {i: tok.decode(ref_ids[i], skip_special_tokens=True).strip() for i in rows}
    texts_ours = {i: tok.decode(ours_ids[i], skip_special_tokens=True).strip() for i in rows}
    differ = [i for i in rows if texts_ref[i] != texts_ours[i]]
    out = {
        "records": len(rows),
        "batch_size": bs,
        "max_new_tokens": max_new,
        "prompt_tokens": prompt_tokens,
        "reference_explanations_per_s": len(rows) / ref_s,
        "ours_explanations_per_s": len(rows) / ours_s,
        "reference_new_tokens_per_s": ref_new / ref_s,
        "ours_new_tokens_per_s": ours_new / ours_s,
        "ratio": (ours_new / ours_s) / (ref_new / ref_s),
        "chunk_ratio_median": statistics.median(
            (c["ours_new_tokens"] / c["ours_s"]) / (c["reference_new_tokens"] / c["reference_s"]) for c in chunks
        ),
        "ours_prefill_s": sum(c["ours_prefill_s"] for c in chunks),
        # the ratio if our decoding cost nothing: batched prefill bounds it
        "ratio_limit_prefill": (ours_new / sum(c["ours_prefill_s"] for c in chunks)) / (ref_new / ref_s),
        "texts_equal": len(rows) - len(differ),
        "texts_differ": len(differ),
        "first_difference": _first_difference(texts_ref, texts_ours, differ),
        "chunks": chunks,
    }
    if device != "cpu":
        out.update(_mfu(module.llm, 2 * (prompt_tokens + ours_new), ref_s, ours_s))
    return out


def _first_difference(ref: dict[int, str], ours: dict[int, str], differ: list[int]) -> dict[str, Any] | None:
    if not differ:
        return None
    i = differ[0]
    a, b = ref[i], ours[i]
    n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"index": i, "at_char": n, "reference": a[max(0, n - 40) : n + 60], "ours": b[max(0, n - 40) : n + 60]}
