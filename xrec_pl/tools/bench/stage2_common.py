"""Stage-2 bench plumbing: machine and memory readings, the random LLMs, building and running our side."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xrec_pl.tools.bench.clock import EpochClock

RANDOM_LLMS = ("random-7b", "random-tiny")
# dense bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
_HWM = "VmHWM"


# --------------------------------------------------------------------------------------------------------------------
# machine and memory helpers
def load_note() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    hwm = proc_status_kb(_HWM)
    if hwm is not None:
        return hwm / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
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


def full_logits_loss(llm: nn.Module, batch: dict[str, Any]) -> Tensor:
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


def build(llm: str, data_dir: Path, device: str, seed: int, batch_size: int, llm_dtype: str = "auto"):
    from data_modules.explanations import ExplanationDataModule
    from xrec_pl.data.io import read_para_dict
    from xrec_pl.lit.explainer import ExplainerModule

    para = read_para_dict(data_dir)
    with _llm_loader(llm, device):
        module = ExplainerModule(
            llm=llm,
            llm_dtype=llm_dtype,
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


def twin_in_dtype(module, llm: str, device: str, seed: int, llm_dtype: str):
    """The same explainer (same adapters and embedding tables) over a second copy of the LLM in ``llm_dtype``."""
    from xrec_pl.lit.explainer import ExplainerModule

    hp = module.hparams
    with _llm_loader(llm, device):
        twin = ExplainerModule(
            llm=llm,
            llm_dtype=llm_dtype,
            embedding_source="random",
            num_users=hp.num_users,
            num_items=hp.num_items,
            optimizer="adam",
            lr=hp.lr,
            seed=seed,
        )
    for name in ("user_adapter", "item_adapter"):  # the embedding tables are drawn from the same seed
        getattr(twin, name).load_state_dict(getattr(module, name).state_dict())
    return twin.to(device)


def count_params(llm: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in llm.parameters()}.values())


# --------------------------------------------------------------------------------------------------------------------
# ours
def fit_ours(module, dm, device: str, precision: str, max_steps: int | None = None) -> dict[str, float]:
    import lightning.pytorch as pl

    clock = EpochClock(sync_cuda=device != "cpu")
    with _quiet():
        trainer = _trainer(pl, clock, device, precision, max_steps)
        trainer.fit(module, dm)
    module.injector.clear()
    if device != "cpu":
        module.to(device)  # Lightning's teardown moved it to the CPU; the reference loop and the next run use it here
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


def generate_ours(
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


def trim(ids: list[int], stops: set[int]) -> list[int]:
    """New tokens up to and including the first stop token (what a row really generated)."""
    for n, t in enumerate(ids):
        if t in stops:
            return ids[: n + 1]
    return ids
