"""GraphConditionedLM (models/explainer.py) on the tiny random Llama: the explainer's maths without Lightning.

Also: checkpoints written before the net existed (adapter keys ``user_adapter.*``, as main wrote them) still load
into ExplainerModule and give the same loss.
"""

from __future__ import annotations

import pytest
import torch

from data_modules.explanations import ExplanationDataModule
from tests.fixtures.data import random_embeddings_file
from tests.helpers import quiet_trainer
from tests.oracles import full_logits_loss
from xrec_pl.data.embeddings import load_embeddings
from xrec_pl.lit.explainer import ExplainerModule
from xrec_pl.models.explainer import GraphConditionedLM, load_seeded_llm


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (see the ``one_thread`` fixture)."""


@pytest.fixture(scope="module")
def emb_path(tmp_path_factory):
    return random_embeddings_file(tmp_path_factory.mktemp("emb"), dim=16)


def batch_of(tokenizer, data_dir, batch_size=4):
    dm = ExplanationDataModule(str(data_dir), batch_size=batch_size, tokenizer=tokenizer)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_net_gives_the_explainer_modules_loss(synthetic_dir, emb_path):
    user, item = load_embeddings(emb_path)
    torch.manual_seed(0)
    net = GraphConditionedLM.from_pretrained("tiny-random", graph_dim=16, num_experts=2, user=user, item=item).eval()
    torch.manual_seed(0)  # the same adapter draws: the module builds exactly this net
    module = ExplainerModule(llm="tiny-random", embeddings_path=emb_path, graph_dim=16, num_experts=2).eval()
    assert isinstance(module.net, GraphConditionedLM) and module.llm is module.net.llm
    assert module.user_adapter is module.net.user_adapter and module.source is module.net.source
    for name, p in net.named_parameters():
        torch.testing.assert_close(module.net.get_parameter(name), p, rtol=0, atol=0)

    batch = batch_of(net.tokenizer, synthetic_dir)
    with torch.no_grad():
        with net.injecting(batch):
            nll, rows = net.token_nll(batch)
            full = full_logits_loss(net, batch)  # the model's own full-logits loss, same injection
        plain, _ = net.token_nll(batch)  # no context: the unconditioned prompt
        with module.injecting_batch(batch):
            lit = module.lm_loss(batch)
    assert nll.shape == rows.shape and rows.max() == batch["input_ids"].shape[0] - 1
    torch.testing.assert_close(nll.mean(), lit, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nll.mean(), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, nll)  # the injection reaches the loss
    assert not net.injector.has_context


def test_gradients_only_in_the_adapters(synthetic_dir, emb_path):
    user, item = load_embeddings(emb_path)
    net = GraphConditionedLM.from_pretrained(
        "tiny-random", graph_dim=16, num_experts=2, adapter_dropout=0.0, user=user, item=item
    ).train()
    assert net.user_adapter.training and not net.llm.training  # the LLM stays in eval mode
    net.user_adapter.noisy_gating = net.item_adapter.noisy_gating = False
    with torch.no_grad():  # non-zero gates so that every adapter parameter gets a gradient
        for m in net.adapters():
            m.w_gate.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch = batch_of(net.tokenizer, synthetic_dir)
    net.set_context(batch)  # kept through backward, as in training
    nll, _ = net.token_nll(batch)
    nll.mean().backward()
    net.clear_context()
    assert not net.injector.has_context
    adapter_ids = {id(p) for p in net.adapter_parameters()}
    assert adapter_ids == {id(p) for p in net.parameters() if p.requires_grad}
    assert all(p.grad is None for p in net.parameters() if id(p) not in adapter_ids)
    named = [(n, p) for n, p in net.named_parameters() if id(p) in adapter_ids and "w_noise" not in n]
    assert named and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in named)


def test_a_given_llm_and_the_no_adapter_arm(synthetic_dir):
    llm, tokenizer = load_seeded_llm("tiny-random", seed=3)
    net = GraphConditionedLM.build(llm, tokenizer, adapter="none", embedding_source="fixed", graph_dim=8)
    assert net.llm is llm and not net.trains_anything and net.adapter_parameters() == []
    assert not net.injector.installed and net.adapters() == ()
    batch = batch_of(tokenizer, synthetic_dir, batch_size=2)
    assert net.vectors(batch) is None
    with torch.no_grad(), net.injecting(batch):  # a no-op context
        nll, _ = net.token_nll(batch)
    assert torch.isfinite(nll).all()
    with pytest.raises(ValueError, match="both adapters or neither"):
        GraphConditionedLM(llm, net.source, user_adapter=torch.nn.Linear(8, 32))


def test_checkpoint_of_the_old_layout_loads_with_the_same_loss(synthetic_dir, emb_path, tmp_path):
    """A checkpoint as main wrote it before ``self.net`` (adapter keys ``user_adapter.*``) loads into the module."""
    torch.manual_seed(0)
    module = ExplainerModule(llm="tiny-random", embeddings_path=emb_path, graph_dim=16, num_experts=2, lr=1e-2)
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4)
    t = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(module, dm)
    new_path, old_path = tmp_path / "new.ckpt", tmp_path / "old.ckpt"
    t.save_checkpoint(new_path)
    ckpt = torch.load(new_path, weights_only=False)
    assert ckpt["state_dict"] and all(
        k.startswith(("net.user_adapter.", "net.item_adapter.")) for k in ckpt["state_dict"]
    )
    old = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    assert any(k.startswith("user_adapter.") for k in old) and any(k.startswith("item_adapter.") for k in old)
    torch.save({**ckpt, "state_dict": old}, old_path)

    batch = batch_of(module.tokenizer, synthetic_dir)
    losses = []
    for path in (new_path, old_path):
        loaded = ExplainerModule.load_from_checkpoint(path).eval()
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert torch.equal(loaded.get_parameter(name), p), (path.name, name)
        with torch.no_grad(), loaded.injecting_batch(batch):
            losses.append(loaded.lm_loss(batch))
    with torch.no_grad(), module.eval().injecting_batch(batch):
        trained = module.lm_loss(batch)
    torch.testing.assert_close(losses[0], trained, rtol=0, atol=0)
    torch.testing.assert_close(losses[1], trained, rtol=0, atol=0)
    # through the Trainer's own restore (the path a resume or `validate --ckpt_path` takes)
    val = [
        quiet_trainer(tmp_path, limit_val_batches=2).validate(
            ExplainerModule(llm="tiny-random", embeddings_path=emb_path, graph_dim=16, num_experts=2),
            dm,
            ckpt_path=path,
            verbose=False,
        )[0]["val/loss"]
        for path in (new_path, old_path)
    ]
    assert val[0] == val[1]
