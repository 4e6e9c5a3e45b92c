"""The explainer on a device: bf16 training steps on a random-weight Llama (Llama-2-7B shape on CUDA, tiny on CPU),
8-bit loading, the compact decoder equal to ``generate``, the injection exact on the device."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import pytest
import torch

from xrec_pl.tools.bench import stage2_common


def _module(llm: str, device: str, data_dir, **kwargs):
    """An ExplainerModule on the bench's random Llama (built on ``device`` in its dtype, no host copy)."""
    from xrec_pl.data.io import read_para_dict
    from xrec_pl.lit.explainer import ExplainerModule

    para = read_para_dict(data_dir)
    sizes = {"num_users": int(para["user_num"]), "num_items": int(para["item_num"])}
    with stage2_common._llm_loader(llm, device):
        return ExplainerModule(llm=llm, embedding_source="random", lr=1e-2, **sizes, **kwargs)


def _datamodule(module, data_dir, batch_size: int = 2):
    from data_modules.explanations import ExplanationDataModule

    return ExplanationDataModule(str(data_dir), batch_size=batch_size, eval_batch_size=4, tokenizer=module.tokenizer)


def _trainer(device: str, root, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


class _DevicesSeen(pl.Callback):
    """The devices of the LLM's weights at each training step."""

    def __init__(self) -> None:
        self.types: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.types.add(next(pl_module.llm.parameters()).device.type)


def test_bf16_training_steps(device, synthetic_dir, tmp_path):
    """Three bf16-true optimizer steps: finite loss, adapters move, the frozen LLM stays bit-identical in bf16."""
    llm = "random-7b" if device == "cuda" else "random-tiny"
    module = _module(llm, device, synthetic_dir, gradient_checkpointing=device == "cuda")
    frozen = {n: p.detach().clone() for n, p in list(module.llm.named_parameters())[:4]}
    before = [p.detach().clone() for p in module.adapter_parameters()]
    seen = _DevicesSeen()
    trainer = _trainer(device, tmp_path, precision="bf16-true", max_steps=3, callbacks=[seen])
    trainer.fit(module, _datamodule(module, synthetic_dir))
    assert trainer.global_step == 3
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    assert next(module.llm.parameters()).dtype == torch.bfloat16
    assert any(not torch.equal(a.to(b), b) for a, b in zip(before, module.adapter_parameters()))
    params = dict(module.llm.named_parameters())
    assert all(torch.equal(params[n].float().cpu(), v.to(torch.bfloat16).float().cpu()) for n, v in frozen.items())
    assert all(not p.requires_grad for p in module.llm.parameters())
    assert seen.types == {device}  # where the steps ran (Lightning's teardown moves the module to the CPU after fit)
    if device == "cuda":
        assert torch.cuda.max_memory_allocated() > 13e9  # 7B shape in bf16


def _saved_tiny_llama(tmp_path):
    from xrec_pl.models.tiny import build_tiny_llm

    model, tokenizer = build_tiny_llm()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_8bit_loading(device, tmp_path):
    """8-bit (bitsandbytes) loading of a saved Llama on CUDA, injected forward finite; on CPU: one clear error."""
    from xrec_pl.models.llm import LLMLoadError, load_frozen_llm

    path = _saved_tiny_llama(tmp_path)
    if device == "cpu":
        with pytest.raises(LLMLoadError, match="8bit"):
            load_frozen_llm(str(path), quantization="8bit")
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install 'xrec-pl[gpu]')")
    from xrec_pl.models.injection import EmbeddingInjector

    model, tokenizer = load_frozen_llm(str(path), quantization="8bit")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear8bitLt" in kinds, kinds
    ids = torch.tensor([tokenizer("a short prompt here")["input_ids"]], device="cuda")
    injector = EmbeddingInjector(model, "layers")  # MHA: every projection as wide as the hidden size
    vec = torch.randn(1, 2, model.config.hidden_size, device="cuda")
    with injector.injecting(torch.tensor([[1, 2]]), vec), torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits.float()).all()


def test_compact_decoder_equals_generate(device, synthetic_dir, tmp_path):
    """The compact greedy decoder and ``generate`` write the same predictions on the device (fp32)."""
    import json

    texts = {}
    torch.manual_seed(0)  # the random LLM is drawn once; the two decoders run on the same weights
    module = _module("random-tiny", device, synthetic_dir, max_new_tokens=8, llm_dtype="float32")
    for decoder in ("compact", "hf"):
        module.hparams.decoder = decoder
        root = tmp_path / decoder
        _trainer(device, root).predict(module, _datamodule(module, synthetic_dir), return_predictions=False)
        rows = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
        texts[decoder] = [(r["uid"], r["iid"], r["prediction"]) for r in rows]
    assert len(texts["compact"]) == 10
    assert texts["compact"] == texts["hf"]
    assert len({t[2] for t in texts["compact"]}) > 1  # not one constant text: the comparison is not vacuous


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma2"])
def test_injection_families_on_device(device, model_type):
    """Cached greedy = uncached greedy with injection, on the device (fp32), for the main families."""
    from tests.unit.test_injection_families import batch, tiny_model, vectors
    from xrec_pl.models.injection import EmbeddingInjector

    model = tiny_model(model_type).to(device)
    ids, mask, pos = (t[:1].to(device) for t in batch())
    vec = vectors(model.config.hidden_size, rows=1, scale=3.0).to(device)
    injector = EmbeddingInjector(model, "layers")
    with injector.injecting(pos, vec):
        cached = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        uncached = ids
        for _ in range(6):
            with torch.no_grad():
                out = model(input_ids=uncached, use_cache=False).logits
            uncached = torch.cat([uncached, out[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, uncached)
