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
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from xrec_pl.tools.bench.clock import EpochClock

__all__ = ["PEAK_FLOPS", "run_stage2_bench"]

RANDOM_LLMS = ("random-7b", "random-tiny")
# dense bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
_HWM = "VmHWM"


# --------------------------------------------------------------------------------------------------------------------
# machine and memory helpers
def _load_note() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    hwm = _proc_status_kb(_HWM)
    if hwm is not None:
        return hwm / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name (:data:`PEAK_FLOPS`), ``None`` when unknown (or CPU)."""
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


# --------------------------------------------------------------------------------------------------------------------
# random LLMs (bench only)
def _random_llm(kind: str, device: str) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, source)`` of a random Llama; ``load_frozen_llm`` adds the reserved tokens and freezes it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from xrec_pl.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    if kind == "random-7b":  # LlamaConfig's defaults are Llama-2-7B's dimensions
        config = LlamaConfig(max_position_embeddings=4096)
        dtype = torch.bfloat16 if device != "cpu" else torch.float32
    else:
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
        dtype = torch.float32
    config.vocab_size = max(config.vocab_size, len(tokenizer) + 8)
    config._attn_implementation = "sdpa"
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    return model, tokenizer, f"random {kind} Llama (bench only)"


def _full_logits_loss(llm: nn.Module, batch: dict[str, Any]) -> Tensor:
    """The reference-style loss: the model's own forward with labels (full-vocabulary logits at every position)."""
    return llm(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
    ).loss


def _llm_loader(llm: str, device: str) -> contextlib.AbstractContextManager:
    """Let ``ExplainerModule(llm="random-*")`` build the random model (registered for this bench only)."""
    if llm not in RANDOM_LLMS:
        return contextlib.nullcontext()
    from xrec_pl.models.llm import registered_llm

    return registered_llm(llm, lambda: _random_llm(llm, device))


def _build(llm: str, data_dir: Path, device: str, seed: int, batch_size: int):
    from data_modules.explanations import ExplanationDataModule
    from xrec_pl.data.io import read_para_dict
    from xrec_pl.lit.explainer import ExplainerModule

    para = read_para_dict(data_dir)
    with _llm_loader(llm, device):
        module = ExplainerModule(
            llm=llm,
            embedding_source="random",
            num_users=int(para["user_num"]),
            num_items=int(para["item_num"]),
            optimizer="adam",
            lr=1e-4,
            seed=seed,
        )
    module.to(device)
    dm = ExplanationDataModule(str(data_dir), batch_size=batch_size, seed=seed, tokenizer=module.tokenizer)
    dm.setup("predict")  # builds the prompt builder (no split read yet)
    return module, dm


def _count_params(llm: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in llm.parameters()}.values())


# --------------------------------------------------------------------------------------------------------------------
# reference-style implementation (written for the comparison; mirrors XRec's explainer loop)
class _InPlaceInjector:
    """XRec-style injection: in-place assignment into the input embeddings and ``+=`` into the 4-D q/k/v states."""

    def __init__(self, llm: nn.Module) -> None:
        from xrec_pl.models.injection import find_projections

        cfg = llm.config
        self.hidden = int(cfg.hidden_size)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // cfg.num_attention_heads)
        self.llm = llm
        self.projections = [proj for _, proj in find_projections(llm)]
        self.positions: list[int] = []
        self.vectors: Tensor | None = None  # (2, H)
        self.handles: list[Any] = []

    def __enter__(self) -> _InPlaceInjector:
        self.handles.append(self.llm.get_input_embeddings().register_forward_hook(self._embedding_hook))
        self.handles += [p.register_forward_hook(self._projection_hook) for p in self.projections]
        self._attn = self.llm.config._attn_implementation
        self.llm.set_attn_implementation("eager")  # XRec's modified attention was the eager one
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.llm.set_attn_implementation(self._attn)

    def _embedding_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.vectors is None or output.shape[1] <= 1:
            return None
        for slot, pos in enumerate(self.positions):
            output[:, pos] = self.vectors[slot].to(output.dtype)
        return None

    def _projection_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.vectors is None or output.shape[1] <= 1:
            return None
        b, t, width = output.shape
        states = output.view(b, t, width // self.head_dim, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)
        for slot, pos in enumerate(self.positions):
            vec = self.vectors[slot]  # (H,)
            if width != self.hidden:  # grouped-query rule of this project (XRec's is undefined there)
                vec = F.linear(vec, module.weight)
            states[:, :, pos, :] += vec.to(states.dtype).view(width // self.head_dim, self.head_dim)
        return None


def _reference_train(module, builder, records: list[dict], adapters, opt, device: str) -> None:
    user_adapter, item_adapter = adapters
    llm = module.llm
    with _InPlaceInjector(llm) as inj:
        for rec in records:
            enc = builder.encode_train(rec)  # per-sample tokenisation inside the step
            input_ids = torch.tensor([enc["input_ids"]], device=device)
            labels = torch.tensor([enc["labels"]], device=device)
            uid = torch.tensor([int(rec["uid"])], device=device)
            iid = torch.tensor([int(rec["iid"])], device=device)
            user_vec, item_vec = module.graph_vectors(uid, iid)
            inj.vectors = torch.cat([user_adapter(user_vec), item_adapter(item_vec)], 0)  # (2, H)
            inj.positions = [enc["user_pos"], enc["item_pos"]]
            loss = llm(input_ids=input_ids, labels=labels, use_cache=False).loss  # full-vocabulary logits
            opt.zero_grad()
            loss.backward()
            opt.step()
            inj.vectors = None


@torch.no_grad()
def _reference_generate(module, builder, records: list[dict], max_new_tokens: int, device: str) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=module.stop_ids(),
        pad_token_id=module.tokenizer.pad_token_id,
        suppress_tokens=sorted(set(module.llm_info.reserved_token_ids.values())),
    )
    outs = []
    adapters = [module.user_adapter, module.item_adapter]
    modes = [a.training for a in adapters]
    for a in adapters:
        a.eval()  # no dropout / gate noise while generating (as generate_explanations)
    with _InPlaceInjector(module.llm) as inj:
        for rec in records:
            enc = builder.encode_prompt(rec)
            input_ids = torch.tensor([enc["input_ids"]], device=device)
            uid = torch.tensor([int(rec["uid"])], device=device)
            iid = torch.tensor([int(rec["iid"])], device=device)
            user_vec, item_vec = module.graph_vectors(uid, iid)
            inj.vectors = torch.cat([module.user_adapter(user_vec), module.item_adapter(item_vec)], 0)
            inj.positions = [enc["user_pos"], enc["item_pos"]]
            out = module.llm.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
            )
            outs.append(out[0, input_ids.shape[1] :].tolist())
            inj.vectors = None
    for a, mode in zip(adapters, modes):
        a.train(mode)
    return outs


# --------------------------------------------------------------------------------------------------------------------
# ours
def _fit_ours(module, dm, device: str, precision: str, max_steps: int | None = None) -> dict[str, float]:
    import lightning.pytorch as pl

    clock = EpochClock(sync_cuda=device != "cpu")
    with _quiet():
        trainer = _trainer(pl, clock, device, precision, max_steps)
        trainer.fit(module, dm)
    module.injector.clear()
    return {"seconds": clock.stop - clock.start, "steps": clock.steps, "trainer": trainer}


@contextlib.contextmanager
def _quiet():
    """Silence the Trainer's per-fit banners and expected warnings (frozen LLM in eval mode, ...) in the bench."""
    import logging
    import warnings

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _trainer(pl, clock, device: str, precision: str, max_steps: int | None):
    return pl.Trainer(
        max_epochs=1,
        max_steps=max_steps if max_steps is not None else -1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu" if device == "cpu" else "gpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )


def _generate_ours(
    module, dm, rows: list[int], batch_size: int, max_new_tokens: int, precision: str = "32-true"
) -> dict[int, list[int]]:
    """Batched generation of ``rows`` of ``tst``; the new token ids per row (captured from ``generate_tokens``).

    ``precision="bf16-mixed"`` autocasts as the Trainer's precision plugin does around ``predict_step``.
    """
    captured: list[Tensor] = []
    original = module.generate_tokens

    def capture(*args: Any, **kwargs: Any) -> Tensor:
        out = original(*args, **kwargs)
        captured.append(out.cpu())
        return out

    module.generate_tokens = capture
    result: dict[int, list[int]] = {}
    try:
        bf16 = precision.startswith("bf16")
        for batch in dm.generation_dataloader("tst", indices=rows, batch_size=batch_size):
            with torch.autocast(module.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                module.generate_explanations(batch, max_new_tokens=max_new_tokens)
            for index, ids in zip(batch["index"].tolist(), captured.pop().tolist()):
                result[index] = ids
    finally:
        del module.generate_tokens
    return result


def _trim(ids: list[int], stops: set[int]) -> list[int]:
    """New tokens up to and including the first stop token (what a row really generated)."""
    for n, t in enumerate(ids):
        if t in stops:
            return ids[: n + 1]
    return ids


# --------------------------------------------------------------------------------------------------------------------
def _bench_training(module, dm, records, rows, opts: dict[str, Any]) -> dict[str, Any]:
    device, repeats = opts["device"], opts["repeats"]
    builder = dm.builder
    encs = [builder.encode_train(r) for r in records]
    target_tokens = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in encs)
    seq_tokens = sum(len(e["input_ids"]) for e in encs)

    ref_adapters = [copy.deepcopy(module.user_adapter).train(), copy.deepcopy(module.item_adapter).train()]
    ref_opt = torch.optim.Adam([p for a in ref_adapters for p in a.parameters()], lr=1e-4)
    t = time.perf_counter()
    dm.setup("fit")  # ours: tokenise once (trn subset + val) -- a one-off, reported, not in the step time
    tokenize_s = time.perf_counter() - t

    # warm-up: one reference record, one step of ours
    _reference_train(module, builder, records[:1], ref_adapters, ref_opt, device)
    _fit_ours(module, dm, device, opts["precision"], max_steps=1)
    runs = []
    for r in range(repeats):
        t = time.perf_counter()
        _reference_train(module, builder, records, ref_adapters, ref_opt, device)
        if device != "cpu":
            torch.cuda.synchronize()
        ref_s = time.perf_counter() - t
        ours = _fit_ours(module, dm, device, opts["precision"])
        runs.append(
            {"reference_s": ref_s, "ours_s": ours["seconds"], "ours_steps": ours["steps"], "load": _load_note()}
        )
        rank_zero_info(f"stage2 bench run {r}: reference {ref_s:.1f} s, ours {ours['seconds']:.1f} s ({_load_note()})")
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
    trainer = _fit_ours(module, dm, device, opts["precision"], max_steps=1)["trainer"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapters.ckpt"
        trainer.save_checkpoint(path)
        out["checkpoint_bytes"] = path.stat().st_size
    tensors = {id(t): t for t in module.llm.state_dict().values()}.values()
    out["frozen_llm_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    return out


def _bench_ablation(module, dm, records, opts: dict[str, Any]) -> dict[str, Any]:
    """What each change buys: one forward+backward over the same records, changes added one at a time."""
    from data_modules.explanations import PadCollator

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
        module.llm.set_attn_implementation(attn)
        ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        for b in batches:
            with module.injecting_batch(b), ctx:
                loss = _full_logits_loss(module.llm, b) if full_logits else module.lm_loss(b)
            loss.backward()
        module.zero_grad(set_to_none=True)

    configs = [
        ("batch 1, full-vocab logits, eager (reference maths)", singles, True, "eager", False),
        (f"batch {bs} (one length bucket)", [batch], True, "eager", False),
        ("+ LM head at target positions only", [batch], False, "eager", False),
        ("+ SDPA attention (= ours, fp32)", [batch], False, "sdpa", False),
        ("+ bf16 autocast", [batch], False, "sdpa", True),
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
        "load": _load_note(),
    }


def _work_ratio(llm: nn.Module, seq_tokens: int, target_tokens: int) -> float:
    """Reference FLOPs / ours at equal hardware efficiency: the full-vocab head at every position vs targets only.

    Both sides run the same frozen body forward + input-gradient backward (``4 x body params`` per token); the LM
    head costs ``4 x V x H`` per position where logits are taken. The limit of the training ratio in fp32 without
    batching gains; bf16 and batching efficiency go beyond it.
    """
    head = llm.get_output_embeddings().weight.numel()
    body = _count_params(llm) - llm.get_input_embeddings().weight.numel()
    if llm.get_output_embeddings().weight is not llm.get_input_embeddings().weight:
        body -= head
    return (body * seq_tokens + head * seq_tokens) / (body * seq_tokens + head * target_tokens)


def _mfu(llm: nn.Module, flops_per_param: float, ref_s: float, ours_s: float) -> dict[str, Any]:
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    flops = flops_per_param * _count_params(llm)
    return {
        "reference_tflops": flops / ref_s / 1e12,
        "ours_tflops": flops / ours_s / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "reference_mfu": flops / ref_s / peak if peak else None,
        "ours_mfu": flops / ours_s / peak if peak else None,
    }


def _bench_generation(module, dm, records, rows, opts: dict[str, Any]) -> dict[str, Any]:
    device, bs, max_new = opts["device"], opts["gen_batch_size"], opts["max_new_tokens"]
    stops = set(module.stop_ids())
    builder = dm.builder
    prompt_tokens = sum(len(builder.encode_prompt(r)["input_ids"]) for r in records)
    _reference_generate(module, builder, records[:1], max_new, device)  # warm-up
    _generate_ours(module, dm, rows[:2], bs, max_new, opts["precision"])
    chunks, ref_ids, ours_ids = [], {}, {}
    for start in range(0, len(rows), bs):
        part_rows, part_recs = rows[start : start + bs], records[start : start + bs]
        t = time.perf_counter()
        got = _reference_generate(module, builder, part_recs, max_new, device)
        ref_s = time.perf_counter() - t
        ref_ids.update(zip(part_rows, got))
        t = time.perf_counter()
        ours_ids.update(_generate_ours(module, dm, part_rows, bs, max_new, opts["precision"]))
        ours_s = time.perf_counter() - t
        t = time.perf_counter()
        _generate_ours(module, dm, part_rows, bs, 1, opts["precision"])  # prefill (+1 token) alone: the limit
        prefill_s = time.perf_counter() - t
        ref_new = sum(len(_trim(ref_ids[i], stops)) for i in part_rows)
        ours_new = sum(len(_trim(ours_ids[i], stops)) for i in part_rows)
        chunks.append({"records": len(part_rows), "reference_s": ref_s, "ours_s": ours_s, "reference_new_tokens": ref_new,
                       "ours_new_tokens": ours_new, "ours_prefill_s": prefill_s, "load": _load_note()})  # fmt: skip
        rank_zero_info(f"generation chunk {len(chunks)}: reference {ref_s:.1f} s, ours {ours_s:.1f} s ({_load_note()})")
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


# --------------------------------------------------------------------------------------------------------------------
# peak memory, one fresh subprocess per side
def _memory_child(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    module, dm = _build(args.llm, Path(args.data_dir), device, args.seed, args.batch_size)
    rows, records = _pick(dm, "trn", args.batch_size * args.steps, args.seed)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    loaded = (_proc_status_kb("VmRSS") or 0) / 1024
    _reset_peak_rss()
    if args.memory_side == "reference":
        adapters = [copy.deepcopy(module.user_adapter).train(), copy.deepcopy(module.item_adapter).train()]
        opt = torch.optim.Adam([p for a in adapters for p in a.parameters()], lr=1e-4)
        _reference_train(module, dm.builder, records, adapters, opt, device)
    else:
        dm._subset_rows = _fixed_rows(dm._subset_rows, rows)
        _fit_ours(module, dm, device, args.precision)
    out: dict[str, Any] = {"rss_after_load_mb": loaded, "train_peak_rss_mb": _peak_rss_mb()}
    if device != "cpu":
        out["train_cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    out["peak_reset"] = _reset_peak_rss()
    gen_rows, gen_records = _pick(dm, "tst", args.gen_batch_size, args.seed)
    if args.memory_side == "reference":
        _reference_generate(module, dm.builder, gen_records, args.max_new_tokens, device)
    else:
        _generate_ours(module, dm, gen_rows, args.gen_batch_size, args.max_new_tokens, args.precision)
    out["generate_peak_rss_mb"] = _peak_rss_mb()
    if device != "cpu":
        out["generate_cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _bench_memory(data_dir: Path, opts: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"measured": "fresh subprocess per side; peak RSS = VmHWM (reset between phases)"}
    for side in ("reference", "ours"):
        cmd = [sys.executable, "-m", "xrec_pl.tools.bench.stage2", str(data_dir), "--memory-side", side]
        for key in ("llm", "device", "precision", "threads", "batch_size", "gen_batch_size", "max_new_tokens", "seed"):
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

    frame = dm._read(split)
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
        "gen_batch_size": gen_batch_size,
        "max_new_tokens": max_new_tokens,
        "threads": threads,
        "batch_size": batch_size,
        "seed": seed,
        "memory_steps": 2,
    }
    header = {**machine_header(), "load_before": _load_note(), "llm": llm, "quick": quick}
    torch.manual_seed(seed)
    module, dm = _build(llm, Path(data_dir), device, seed, batch_size)
    results: dict[str, Any] = {}
    if "stage2" in parts:
        rows, records = _pick(dm, "trn", train_records, seed)
        # the DataModule's own seeded subset choice must pick the same rows: hand it exactly these
        dm._subset_rows = _fixed_rows(dm._subset_rows, rows)
        results["stage2"] = {**_bench_training(module, dm, records, rows, opts), "machine": header}
    if "ablation" in parts:
        rows, records = _pick(dm, "trn", max(train_records, 4 * batch_size), seed + 1)
        results["ablation"] = {**_bench_ablation(module, dm, records, opts), "machine": header}
    if "generation" in parts:
        rows, records = _pick(dm, "tst", gen_records, seed)
        results["generation"] = {**_bench_generation(module, dm, records, rows, opts), "machine": header}
    if memory:
        results["memory"] = {**_bench_memory(Path(data_dir), opts), "machine": header}
    for part in results.values():
        part["load_after"] = _load_note()
    rank_zero_info(format_table(results, quick))
    if out_json is not None:
        from xrec_pl.utils import dump_json

        dump_json(out_json, results)
    return results


def _fixed_rows(original, rows: list[int]):
    import numpy as np

    def subset_rows(split: str):
        return np.asarray(rows, dtype=np.int64) if split == "trn" else original(split)

    return subset_rows


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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--memory-side", choices=["ours", "reference"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
        memory=not args.no_memory,
        device=args.device,
        seed=args.seed,
        out_json=args.out,
    )


if __name__ == "__main__":
    main()
