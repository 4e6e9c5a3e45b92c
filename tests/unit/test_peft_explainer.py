"""PeftExplainerModule (peft LoRA / prompt tuning comparison arms) on the tiny random Llama."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from data_modules.explanations import ExplanationDataModule
from tests.helpers import quiet_trainer
from tests.oracles import full_logits_loss, greedy_uncached
from xrec_pl.lit.explainer import ExplainerModule
from xrec_pl.lit.peft_explainer import PeftExplainerModule

METHODS = ["lora", "prompt_tuning"]
LR = {"lora": 1e-2, "prompt_tuning": 0.3}  # high rates so that a few tiny-model steps move the loss
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (see the ``one_thread`` fixture)."""


def make(method, **kwargs):
    kwargs.setdefault("llm", "tiny-random")
    kwargs.setdefault("num_virtual_tokens", 8)
    return PeftExplainerModule(method=method, **kwargs)


trainer = quiet_trainer


def base_state(module):
    """The frozen LLM weights (everything that is not a peft parameter), cloned."""
    peft_ids = {id(p) for p in module.adapter_parameters()}
    return {n: p.detach().clone() for n, p in module.llm.named_parameters() if id(p) not in peft_ids}


def sharpen(module, std=0.3):
    """Redraw the module's own (freshly loaded) LLM and peft weights with a large std.

    A random 2-layer Llama at std 0.02 decodes greedily as one repeated token, which would make any cached/uncached
    comparison vacuous; with std 0.3 every step and row gives different tokens.
    """
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.llm.named_parameters():
            if (p.ndim == 2 and "embed" not in name) or "lora_" in name or "prompt_encoder" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def prompt_batch(module, data_dir, n=5):
    dm = ExplanationDataModule(str(data_dir), tokenizer=module.tokenizer)
    dm.setup("fit")
    return dm, next(iter(dm.generation_dataloader("val", indices=list(range(n)), batch_size=n)))


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("method", METHODS)
def test_trains_only_peft_params_and_base_stays_unchanged(synthetic_dir, tmp_path, method):
    pl.seed_everything(0)
    module = make(method, lr=LR[method])
    before_weights = base_state(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    marker = "lora_" if method == "lora" else "prompt_encoder"
    assert trainable and all(marker in n for n in trainable)
    assert {id(p) for p in module.adapter_parameters()} == {id(p) for p in module.parameters() if p.requires_grad}
    start = [p.detach().clone() for p in module.adapter_parameters()]

    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4)
    rec = _Losses()
    val_before = trainer(tmp_path).validate(module, dm, verbose=False)[0]["val/loss"]
    trainer(tmp_path, max_steps=20, callbacks=[rec], limit_val_batches=0).fit(module, dm)
    val_after = trainer(tmp_path).validate(module, dm, verbose=False)[0]["val/loss"]

    assert len(rec.losses) == 20
    assert sum(rec.losses[-5:]) / 5 < sum(rec.losses[:5]) / 5 - 0.03, rec.losses
    assert val_after < val_before - 0.01
    assert all(not torch.equal(a, p) for a, p in zip(start, module.adapter_parameters()))
    for name, p in module.llm.named_parameters():
        if name in before_weights:
            assert torch.equal(p, before_weights[name]), name
    assert not any(p.requires_grad for n, p in module.llm.named_parameters() if n in before_weights)
    assert not module.llm.get_base_model().training
    opt = module.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.adapter_parameters()}


def test_lora_dropout_follows_module_mode_llm_stays_eval():
    module = make("lora")
    layers = module._lora_layers()
    assert layers and all(layer.lora_dropout["default"].training for layer in layers)
    module.eval()
    assert not any(layer.lora_dropout["default"].training for layer in layers)
    module.train()
    assert all(layer.lora_dropout["default"].training for layer in layers)
    assert not module.llm.get_base_model().training and not module.llm.get_base_model().model.layers[0].training


@pytest.mark.parametrize("method", METHODS)
def test_gathered_loss_equals_peft_forward_loss(synthetic_dir, method):
    module = sharpen(make(method)).eval()
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4, tokenizer=module.tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    # full_logits_loss goes through PeftModelForCausalLM.forward, which prepends the virtual tokens itself
    torch.testing.assert_close(module.lm_loss(batch), full_logits_loss(module, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_uncached_greedy(synthetic_dir, method):
    module = sharpen(make(method, max_new_tokens=10)).eval()
    dm, batch = prompt_batch(module, synthetic_dir)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows are padded differently
    texts = module.generate_explanations(batch)
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=module.stop_ids(),
        pad_token_id=module.tokenizer.pad_token_id,
        suppress_tokens=sorted(set(module.llm_info.reserved_token_ids.values())),
    )
    with torch.no_grad():
        cached = module.generate_tokens(batch["input_ids"], batch["attention_mask"], config)
    uncached = greedy_uncached(module, batch, max_new_tokens=10)
    assert cached.shape == (5, 10)
    assert torch.equal(cached, uncached), (cached, uncached)
    assert len({tuple(row) for row in cached.tolist()}) == 5 and len(set(cached[0].tolist())) > 3  # not degenerate
    assert texts == [t.strip() for t in module.tokenizer.batch_decode(cached, skip_special_tokens=True)]
    single = dm.generation_dataloader("val", indices=list(range(5)), batch_size=1)
    assert texts == [module.generate_explanations(b)[0] for b in single]
    # the peft weights are wired into generation
    with torch.no_grad():
        for p in module.adapter_parameters():
            p.mul_(3.0)
    assert module.generate_explanations(batch) != texts


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_holds_only_peft_params_loads_validated_and_resumes(synthetic_dir, tmp_path, method):
    pl.seed_everything(0)
    module = make(method, lr=1e-2)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(module, ExplanationDataModule(str(synthetic_dir), batch_size=4))
    path = tmp_path / "a.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == expected
    assert ckpt["optimizer_states"] and ckpt["xrec_explainer"]["method"] == method

    loaded = PeftExplainerModule.load_from_checkpoint(path)
    assert loaded.hparams.method == method
    for name in expected:
        assert torch.equal(module.get_parameter(name), loaded.get_parameter(name))

    fresh = make(method)
    gone = sorted(expected)[0]
    with pytest.raises(ValueError, match="missing"):
        fresh.on_load_checkpoint(dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if k != gone}))
    with pytest.raises(ValueError, match="unexpected"):
        fresh.on_load_checkpoint(dict(ckpt, state_dict={**ckpt["state_dict"], "llm.extra": torch.ones(1)}))
    other = "prompt_tuning" if method == "lora" else "lora"
    with pytest.raises(ValueError, match="method="):
        make(other).on_load_checkpoint(ckpt)
    changed = {"lora_r": 4} if method == "lora" else {"num_virtual_tokens": 4}
    with pytest.raises(ValueError, match=next(iter(changed))):
        make(method, **changed).on_load_checkpoint(ckpt)

    resumed = make(method, lr=1e-2)
    t2 = trainer(tmp_path, max_steps=4, limit_val_batches=0)
    t2.fit(resumed, ExplanationDataModule(str(synthetic_dir), batch_size=4), ckpt_path=path)
    assert t2.global_step == 4
    assert all(int(s["step"]) == 4 for s in t2.optimizers[0].state.values())


def test_predict_writes_jsonl(synthetic_dir, tmp_path):
    module = make("prompt_tuning", max_new_tokens=3)
    dm = ExplanationDataModule(str(synthetic_dir), eval_batch_size=4)
    trainer(tmp_path).predict(module, dm)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == dm.num_records("tst")
    assert all(set(r) == {"uid", "iid", "prediction", "reference"} for r in rows)


def test_prompt_init_text_and_bad_arguments():
    module = make("prompt_tuning", prompt_init="text", prompt_init_text="hello world")
    ids = module.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    weight = module.llm.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(weight[: len(ids)], module.llm.word_embeddings(torch.tensor(ids)))
    with pytest.raises(ValueError, match="method"):
        make("prefix")
    with pytest.raises(ValueError, match="prompt_init"):
        make("prompt_tuning", prompt_init="zeros")


@pytest.mark.parametrize("method", METHODS)
def test_ablation_delta_in_pipeline_order(synthetic_dir, tmp_path, method):
    """As ``xrec-pl pipeline``/``experiment`` build stage 2: explainer-only overrides come before the delta."""
    from xrec_pl.tools.stage_cli import XrecCLI

    cli = XrecCLI(
        args=[
            "--config",
            str(CONFIGS / "stage2" / "synthetic.yaml"),
            f"--data.init_args.data_dir={synthetic_dir}",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.embeddings_path=stage1/embeddings.safetensors",
            "--config",
            str(CONFIGS / "ablations" / f"{method}.yaml"),
            "--model.llm=tiny-random",
            "--model.llm_dtype=float32",
        ],
        run=False,
    )
    model = cli.model
    assert isinstance(model, PeftExplainerModule) and model.hparams.method == method
    assert model.hparams.max_new_tokens == 64  # kept from the stage config
    # composition, not a subclass of the explainer: hparams are this class's own arguments, nothing injected
    assert not isinstance(model, ExplainerModule)
    assert {k for k in model.hparams if not k.startswith("_")} == set(
        inspect.signature(PeftExplainerModule.__init__).parameters
    ) - {"self"}
    assert model.quiet_while_generating() == () and model.arm_identity()["injection"] == "none"


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_peft_params_and_checkpointing_matches(synthetic_dir, method):
    grads = {}
    for checkpointing in (False, True):
        module = make(method, gradient_checkpointing=checkpointing, lora_dropout=0.0)
        with torch.no_grad():  # non-zero LoRA B (zero at init) so that every peft parameter gets a gradient
            for p in module.adapter_parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        dm = ExplanationDataModule(str(synthetic_dir), batch_size=4, tokenizer=module.tokenizer)
        dm.setup("fit")
        module.train()
        module.training_step(next(iter(dm.train_dataloader())), 0).backward()
        peft_ids = {id(p) for p in module.adapter_parameters()}
        assert all(p.grad is None for p in module.parameters() if id(p) not in peft_ids)
        grads[checkpointing] = [p.grad for p in module.adapter_parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads[checkpointing])
    for with_ckpt, without in zip(grads[True], grads[False]):
        torch.testing.assert_close(with_ckpt, without)
