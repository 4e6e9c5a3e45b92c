"""The forced-choice community test on synthetic data: scoring, the callback's file and the pipeline merge."""

from __future__ import annotations

import json

import torch

from callbacks.community_choice import CommunityChoice, _swap, community_choice, read_communities, sequence_nll
from data_modules.explanations import ExplanationDataModule
from tests.helpers import quiet_trainer
from tests.unit.test_explainer import emb_path as emb_path  # the fixture
from tests.unit.test_explainer import make
from xrec_pl.tools.pipeline import _add_community_choice


def test_sequence_nll_sums_to_the_training_loss(synthetic_dir, emb_path):
    module = make(emb_path).eval()
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4, tokenizer=module.tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    per_row = sequence_nll(module, batch)
    with torch.no_grad(), module.injecting_batch(batch):
        total = module.lm_loss(batch, reduction="sum")
    assert per_row.shape == (4,)
    torch.testing.assert_close(per_row.sum(), total, rtol=1e-5, atol=1e-4)


def test_choice_rows_and_callback_file(synthetic_dir, emb_path, tmp_path):
    phrases = read_communities(synthetic_dir)
    assert phrases and len(phrases) >= 2
    module = make(emb_path, max_new_tokens=3)
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4, eval_batch_size=4, tokenizer=module.tokenizer)
    dm.setup("predict")
    rows = community_choice(module, dm, phrases, "tst", batch_size=5)
    n_tst = dm.num_records("tst")
    assert 0 < len(rows) <= n_tst
    small = ExplanationDataModule(str(synthetic_dir), eval_subset=3, tokenizer=module.tokenizer)
    small.setup("predict")
    assert len(community_choice(module, small, phrases, "tst", subset=True)) <= 3
    assert len(community_choice(module, small, phrases, "tst")) == len(rows)  # default: every record
    assert all(r["truth"] in phrases and r["chosen"] in phrases and r["correct"] in (0.0, 1.0) for r in rows)
    assert all(r["correct"] == float(r["truth"] == r["chosen"]) for r in rows)
    # the calibrated choice is the argmin of the NLL centred per name over the records
    nll = torch.tensor([r["nll"] for r in rows], dtype=torch.float64)
    centred = (nll - nll.mean(0)).argmin(1).tolist()
    assert [phrases[i] for i in centred] == [r["chosen"] for r in rows]
    raw = [float(phrases[i] == r["truth"]) for i, r in zip(nll.argmin(1).tolist(), rows)]
    assert raw == [r["correct_raw"] for r in rows]
    assert module.training  # the mode is restored

    trainer = quiet_trainer(tmp_path, callbacks=[CommunityChoice(batch_size=8)])
    trainer.predict(module, datamodule=dm, return_predictions=False)
    written = [json.loads(line) for line in (tmp_path / "community_choice.jsonl").read_text().splitlines()]
    assert [(r["uid"], r["iid"]) for r in written] == [(r["uid"], r["iid"]) for r in rows]


def test_swap_keeps_the_rest_and_non_synthetic_folders_are_skipped(tmp_path):
    assert _swap("Fans of The Harbour Book Exchange agree.", "the harbour book exchange", "the x club") == (
        "Fans of the x club agree."
    )
    assert read_communities(tmp_path) is None
    (tmp_path / "meta.json").write_text("{not json")
    assert read_communities(tmp_path) is None


def test_pipeline_merges_choice_into_scores(tmp_path):
    rows = [{"uid": 3, "iid": 4, "correct": 1.0, "correct_raw": 0.0}, {"uid": 1, "iid": 2, "correct": 0.0}]
    (tmp_path / "community_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = {}
    extra = _add_community_choice(tmp_path, scores)
    assert scores == {"community_choice": 0.5, "community_choice_raw": 0.0, "community_choice_n": 2}
    assert extra == {"community_choice": [{"uid": 3, "iid": 4, "score": 1.0}, {"uid": 1, "iid": 2, "score": 0.0}]}
    assert _add_community_choice(tmp_path / "elsewhere", {}) == {}


def _variant_batch(module, dm, phrases, records=3):
    from callbacks.community_choice import _find
    from data_modules.batching import PadCollator

    items = []
    for row in range(dm.num_records("tst")):
        record = dm.record("tst", row)
        truth = _find(str(record["explanation"]), phrases)
        if truth is None:
            continue
        for phrase in phrases:
            variant = {**record, "explanation": _swap(str(record["explanation"]), phrases[truth], phrase)}
            enc = dm.prompt_builder.encode_train(variant)
            enc.update(user_id=int(record["uid"]), item_id=int(record["iid"]), index=row)
            items.append(enc)
        if len(items) == records * len(phrases):
            break
    return PadCollator(dm.pad_id, side="right")(items)


def test_shared_prefix_scoring_equals_the_full_forward(synthetic_dir, emb_path, monkeypatch):
    """The community test runs each record's shared tokens once: the same NLL per variant as the plain forward."""
    import xrec_pl.models.explainer as explainer_net

    phrases = read_communities(synthetic_dir)
    module = make(emb_path).eval()
    with torch.no_grad():  # make the injection matter: adapters far from their small initial output
        for p in module.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    dm = ExplanationDataModule(str(synthetic_dir), tokenizer=module.tokenizer)
    dm.setup("predict")
    batch = _variant_batch(module, dm, phrases)
    calls = []
    real = explainer_net.grouped_hidden_states
    group = len(phrases)

    def counted(*a, **k):  # the community path's calls (the plain forward shares the batch's prompt prefix: group B)
        if a[3] == group:
            calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(explainer_net, "grouped_hidden_states", counted)
    plain = sequence_nll(module, batch)
    grouped = sequence_nll(module, batch, group=len(phrases))
    assert calls == [1]  # the shared-prefix path ran
    torch.testing.assert_close(grouped, plain, rtol=1e-5, atol=1e-4)
    assert plain.view(-1, len(phrases)).std(1).min() > 1e-3  # the variants score differently: the test can fail
    # the injection reaches the shared part: another user's vectors change the scores
    other = {**batch, "user_id": batch["user_id"].roll(len(phrases))}
    assert not torch.allclose(sequence_nll(module, other, group=len(phrases)), grouped, atol=1e-3)
    # rows that are no groups of one record fall back to the plain forward (same numbers, no shared path)
    mixed = {k: (v.roll(1, 0) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    torch.testing.assert_close(sequence_nll(module, mixed, group=len(phrases)), plain.roll(1, 0), rtol=1e-5, atol=1e-4)
    assert calls == [1, 1]
