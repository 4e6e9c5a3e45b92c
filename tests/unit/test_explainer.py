"""ExplainerModule on the tiny random Llama: training, optimizer scope, checkpoints, generation, loss, ablations."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from data_modules.explanations import ExplanationDataModule
from tests.fixtures.data import random_embeddings_file
from tests.helpers import quiet_trainer
from tests.oracles import full_logits_loss
from xrec_pl.errors import DataError, LLMLoadError
from xrec_pl.lit.explainer import ExplainerModule


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (see the ``one_thread`` fixture)."""


@pytest.fixture(scope="module")
def emb_path(synthetic_dir, tmp_path_factory):
    return random_embeddings_file(tmp_path_factory.mktemp("emb"), dim=64)


def make(emb_path, **kwargs):
    kwargs.setdefault("llm", "tiny-random")
    kwargs.setdefault("embeddings_path", emb_path)
    return ExplainerModule(**kwargs)


trainer = quiet_trainer


def train_batch(module, data_dir, batch_size=4):
    dm = ExplanationDataModule(str(data_dir), batch_size=batch_size, tokenizer=module.tokenizer)
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_trains_and_loss_decreases(synthetic_dir, emb_path, tmp_path):
    pl.seed_everything(0)
    module = make(emb_path, lr=3e-2)
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4)
    rec = _Losses()
    before = trainer(tmp_path).validate(module, dm, verbose=False)[0]["val/loss"]
    trainer(tmp_path, max_steps=30, callbacks=[rec], limit_val_batches=0).fit(module, dm)
    after = trainer(tmp_path).validate(module, dm, verbose=False)[0]["val/loss"]
    assert len(rec.losses) == 30
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < first - 0.1, rec.losses
    assert after < before
    # the LLM stayed frozen and in eval mode, the adapters trained
    assert not module.llm.training and module.user_adapter.training
    assert not any(p.requires_grad for p in module.llm.parameters())


def test_optimizer_holds_exactly_the_adapter_parameters(emb_path):
    module = make(emb_path, warmup_steps=5)
    conf = module.configure_optimizers()
    opt = conf["optimizer"]
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    adapters = {id(p) for m in (module.user_adapter, module.item_adapter) for p in m.parameters()}
    assert in_opt == adapters == {id(p) for p in module.parameters() if p.requires_grad}
    sched = conf["lr_scheduler"]["scheduler"]
    assert opt.param_groups[0]["lr"] == pytest.approx(module.hparams.lr / 5)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(module.hparams.lr)


def test_checkpoint_holds_only_adapters_and_loads_validated(synthetic_dir, emb_path, tmp_path):
    pl.seed_everything(0)
    module = make(emb_path, lr=1e-2)
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(module, dm)
    path = tmp_path / "a.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == expected
    assert all(k.startswith(("net.user_adapter.", "net.item_adapter.")) for k in expected)
    assert ckpt["xrec_explainer"]["llm"]["hidden_size"] == 32

    loaded = ExplainerModule.load_from_checkpoint(path)
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, loaded.get_parameter(name))

    fresh = make(emb_path)
    broken = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if k != "net.user_adapter.w_gate"})
    with pytest.raises(ValueError, match=r"missing \['net.user_adapter.w_gate'\]"):
        fresh.on_load_checkpoint(broken)
    extra = dict(ckpt, state_dict={**ckpt["state_dict"], "llm.model.norm.weight": torch.ones(32)})
    with pytest.raises(ValueError, match=r"unexpected \['llm.model.norm.weight'\]"):
        fresh.on_load_checkpoint(extra)
    other = json.loads(json.dumps(ckpt["xrec_explainer"]))
    other["llm"]["hidden_size"] = 576
    with pytest.raises(LLMLoadError, match="hidden_size"):
        fresh.on_load_checkpoint(dict(ckpt, xrec_explainer=other))
    with pytest.raises(ValueError, match="adapter='moe'"):
        make(emb_path, adapter="linear").on_load_checkpoint(ckpt)
    with pytest.raises(LLMLoadError, match="num_kv_heads"):
        make(emb_path, llm="tiny-random-gqa").on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="not an ExplainerModule checkpoint"):
        fresh.on_load_checkpoint({"state_dict": {}})


def test_generate_batched_equals_one_by_one(synthetic_dir, emb_path):
    module = make(emb_path, max_new_tokens=12).eval()
    dm, _ = train_batch(module, synthetic_dir)
    batch = next(iter(dm.generation_dataloader("val", indices=list(range(5)), batch_size=5)))
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows really are padded differently
    texts = module.generate_explanations(batch)
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    single = dm.generation_dataloader("val", indices=list(range(5)), batch_size=1)
    one_by_one = {int(b["index"]): module.generate_explanations(b)[0] for b in single}
    assert texts == [one_by_one[int(i)] for i in batch["index"]]
    # injection changes what is generated (the adapters are wired in)
    with torch.no_grad():
        module.user_adapter.expert_weight.mul_(200.0)
        module.item_adapter.expert_weight.mul_(200.0)
    assert module.generate_explanations(batch) != texts
    assert not module.injector.has_context


def test_gathered_loss_equals_full_logits_loss(synthetic_dir, emb_path):
    module = make(emb_path).eval()
    _, batch = train_batch(module, synthetic_dir)
    with module.injecting_batch(batch):
        gathered = module.lm_loss(batch)
        full = full_logits_loss(module, batch)
    torch.testing.assert_close(gathered, full, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_adapters_and_checkpointing_matches(synthetic_dir, emb_path):
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)  # same adapter init in both runs
        module = make(emb_path, gradient_checkpointing=ckpt, adapter_dropout=0.0)
        module.user_adapter.noisy_gating = module.item_adapter.noisy_gating = False
        with torch.no_grad():  # non-zero gates so that every adapter parameter gets a gradient
            for m in (module.user_adapter, module.item_adapter):
                m.w_gate.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        _, batch = train_batch(module, synthetic_dir)
        loss = module.training_step(batch, 0)
        loss.backward()
        module.on_train_batch_end(None, batch, 0)
        assert not module.injector.has_context
        assert all(p.grad is None for p in module.llm.parameters())
        # w_noise only acts through the gate noise, switched off here for a deterministic comparison
        grads[ckpt] = {n: p.grad for n, p in module.named_parameters() if p.requires_grad and "w_noise" not in n}
        assert all(g is not None and g.abs().sum() > 0 for g in grads[ckpt].values())
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"embedding_source": "fixed"},
        {"embedding_source": "random"},
        {"embedding_source": "redrawn"},
        {"embedding_source": "random", "embeddings_path": None},
        {"adapter": "linear"},
        {"adapter": "none"},
        {"injection": "input"},
        {"injection": "none"},
        {"llm": "tiny-random-gqa"},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_ablations_train_and_generate(synthetic_dir, emb_path, tmp_path, kwargs):
    pl.seed_everything(0)
    module = make(emb_path, max_new_tokens=4, **kwargs)
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4, eval_subset=3)
    t = trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2)
    t.fit(module, dm)
    assert "val/loss" in t.callback_metrics
    trains = kwargs.get("adapter") != "none" and kwargs.get("injection") != "none"
    assert module.trains_anything == trains
    assert (module.configure_optimizers() is not None) == trains
    batch = next(iter(dm.generation_dataloader("val", indices=[0, 1])))
    assert len(module.generate_explanations(batch)) == 2


def test_embedding_sources_semantics(synthetic_dir, emb_path):
    ids = torch.tensor([0, 1, 1])
    fixed = make(emb_path, embedding_source="fixed").graph_vectors(ids, ids)
    assert torch.equal(fixed[0][0], fixed[0][1]) and not torch.equal(fixed[0][0], fixed[1][0])
    rnd = make(emb_path, embedding_source="random", num_users=60, num_items=50)
    u1, _ = rnd.graph_vectors(ids, ids)
    u2, _ = make(emb_path, embedding_source="random", num_users=60, num_items=50).graph_vectors(ids, ids)
    assert torch.equal(u1, u2) and torch.equal(u1[1], u1[2]) and not torch.equal(u1[0], u1[1])
    redrawn = make(emb_path, embedding_source="redrawn")
    assert not torch.equal(redrawn.graph_vectors(ids, ids)[0], redrawn.graph_vectors(ids, ids)[0])
    graph = make(emb_path)
    assert graph.num_users == 60 and "user_table" not in graph.state_dict()


def test_graph_table_size_checked(emb_path):
    with pytest.raises(DataError, match="user table has 60 rows but the dataset has 61 users"):
        make(emb_path, num_users=61)
    with pytest.raises(DataError, match="graph_dim=32"):
        make(emb_path, graph_dim=32)
    with pytest.raises(ValueError, match="embeddings_path"):
        make(None)


def test_predict_writes_jsonl(synthetic_dir, emb_path, tmp_path):
    module = make(emb_path, max_new_tokens=3)
    dm = ExplanationDataModule(str(synthetic_dir), eval_batch_size=4)
    out = trainer(tmp_path).predict(module, dm)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == dm.num_records("tst") == sum(len(b) for b in out)
    assert all(set(r) == {"uid", "iid", "prediction", "reference"} for r in rows)
    records = dm.split_records("tst")
    assert [r["reference"] for r in rows] == records["explanation"].tolist()  # file order


def test_fit_resumes_from_adapter_only_checkpoint(synthetic_dir, emb_path, tmp_path):
    pl.seed_everything(0)
    module = make(emb_path, lr=1e-2)
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4)
    t = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    t.fit(module, dm)
    t.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = make(emb_path, lr=1e-2)
    t2 = trainer(tmp_path, max_steps=5, limit_val_batches=0)
    t2.fit(resumed, ExplanationDataModule(str(synthetic_dir), batch_size=4), ckpt_path=tmp_path / "mid.ckpt")
    assert t2.global_step == 5
    state = t2.optimizers[0].state
    assert all(int(s["step"]) == 5 for s in state.values())


class _RotaryDtype(pl.Callback):
    """Records the LLM's rotary-frequency buffers as the first training step sees them."""

    def __init__(self):
        self.seen = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen is None:
            self.seen = {k: v.clone() for k, v in pl_module.llm.named_buffers() if "inv_freq" in k}


@pytest.mark.parametrize("stage", ["fit", "predict"])
def test_bf16_true_keeps_rotary_frequencies_float32(synthetic_dir, emb_path, tmp_path, stage):
    """Lightning's bf16-true casts the whole module (FSDP/DeepSpeed configs): the LLM's rotary frequencies, which
    transformers keeps in float32, are put back before any step (rounded to bf16 they move every position)."""
    module = make(emb_path)
    original = {k: v.clone() for k, v in module.llm.named_buffers() if "inv_freq" in k}
    assert original and all(v.dtype == torch.float32 for v in original.values())
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4, eval_batch_size=2)
    seen = _RotaryDtype()
    bf16 = trainer(
        tmp_path, precision="bf16-true", max_steps=1, limit_val_batches=0, limit_predict_batches=1, callbacks=[seen]
    )
    if stage == "fit":
        bf16.fit(module, dm)
    else:
        module.hparams.max_new_tokens = 2
        bf16.predict(module, dm, return_predictions=False)
        seen.seen = {k: v.clone() for k, v in module.llm.named_buffers() if "inv_freq" in k}
    assert next(module.llm.parameters()).dtype == torch.bfloat16  # the plugin did cast the weights
    for name, value in original.items():
        assert seen.seen[name].dtype == torch.float32 and torch.equal(seen.seen[name], value), name


def test_evaluation_loops_hold_the_cpu_decoding_layout_and_training_never_sees_it(synthetic_dir, emb_path, tmp_path):
    """On a CPU the frozen fp32 weights are column-major through each validation/test loop (one re-laying per loop)
    and row-major in every training forward, including those that follow a validation inside ``fit`` or a
    ``validate`` call (whose re-laid weights must not be inference tensors: training saves them for backward)."""
    pl.seed_everything(0)
    module = make(emb_path)
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4)
    head = module.llm.get_output_embeddings()
    seen: list[tuple[bool, bool]] = []  # (module in training mode, LM head weight row-major) at each decoder forward
    handle = module.llm.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((module.training, head.weight.is_contiguous())), with_kwargs=True
    )
    try:
        trainer(tmp_path, limit_val_batches=1).validate(module, dm, verbose=False)  # all under inference_mode
        seen.clear()
        trainer(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1).fit(
            module, dm
        )
        in_fit = list(seen)
        trainer(tmp_path, limit_test_batches=1).test(module, dm, verbose=False)
    finally:
        handle.remove()
    training = [major for mode, major in in_fit if mode]
    evaluation = [major for mode, major in seen if not mode]
    assert len(training) >= 4 and all(training)  # every training forward row-major (two per step: shared start, rest)
    assert len(evaluation) >= 4 and not any(evaluation)  # sanity check, two validations, the test: column-major
    assert in_fit[0][0] is False and in_fit[-1][0] is False  # the fit began with the sanity check, ended validating
    assert head.weight.is_contiguous()  # row-major again after the loops
