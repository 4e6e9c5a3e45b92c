"""Analyses of trained stage-2 runs (xrec_pl.tools.analysis) on tiny random Llamas and the tiny synthetic dataset."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from data_modules.explanations import ExplanationDataModule
from tests.fixtures.data import random_embeddings_file
from tests.helpers import quiet_trainer
from xrec_pl.errors import DataError
from xrec_pl.lit.explainer import ExplainerModule
from xrec_pl.tools.analysis import analyze
from xrec_pl.tools.analysis.buckets import bucket_labels, bucket_names, item_ranks
from xrec_pl.tools.analysis.run import adapter_vectors, load_run, record_nll, teacher_batches
from xrec_pl.tools.analysis.soft_prompt import dispersion
from xrec_pl.tools.analysis.swap import derangement, swap_partners


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one torch thread (see the ``one_thread`` fixture)."""


@pytest.fixture(scope="module")
def emb_path(synthetic_dir, tmp_path_factory):
    return random_embeddings_file(tmp_path_factory.mktemp("emb"), dim=16)


def _train_run(root, data_dir, emb_path, source, llm="tiny-random", steps=6):
    """A tiny trained stage-2 run folder: checkpoints/last.ckpt holding adapters + both hparams."""
    pl.seed_everything(0)
    module = ExplainerModule(
        llm=llm, embedding_source=source, embeddings_path=emb_path, graph_dim=16, lr=5e-2, num_experts=2
    )
    dm = ExplanationDataModule(str(data_dir), batch_size=4, eval_batch_size=4)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    trainer = quiet_trainer(root, max_steps=steps, limit_val_batches=0, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(module, dm)
    assert (root / "checkpoints" / "last.ckpt").is_file()
    return root


@pytest.fixture(scope="module")
def runs(synthetic_dir, emb_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {
        source: _train_run(base / source, synthetic_dir, emb_path, source, llm)
        for source, llm in (("graph", "tiny-random-gqa"), ("fixed", "tiny-random"), ("random", "tiny-random"))
    }


@pytest.fixture(scope="module")
def graph_swap(runs):
    """The graph run's swap.jsonl (runs the swap test once if no earlier test did)."""
    path = runs["graph"] / "analysis" / "swap.jsonl"
    if not path.exists():
        analyze(str(runs["graph"]), parts=["swap"])
    return path


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 329):
        perm = derangement(n, seed=3)
        assert sorted(perm.tolist()) == list(range(n))
        assert not np.any(perm == np.arange(n))
    assert derangement(50, 1).tolist() == derangement(50, 1).tolist()
    assert derangement(50, 1).tolist() != derangement(50, 2).tolist()


def test_swap_partners_avoid_the_same_id():
    ids = np.array([0, 0, 0, 1, 1, 2, 3, 3, 4, 5])
    perm = swap_partners(ids, seed=0)
    assert sorted(perm.tolist()) == list(range(ids.size))
    assert not np.any(ids[perm] == ids)
    same = swap_partners(np.zeros(5, dtype=int), seed=0)  # impossible: stays a derangement of records
    assert not np.any(same == np.arange(5))


def test_dispersion_constant_and_opposite_vectors():
    const = dispersion(torch.ones(6, 4) * 2)
    assert const["shared_fraction"] == pytest.approx(1.0)
    assert const["varying_fraction"] == pytest.approx(0.0)
    assert const["mean_pairwise_cosine"] == pytest.approx(1.0)
    assert const["mean_norm"] == pytest.approx(4.0)
    opposite = dispersion(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert opposite["shared_fraction"] == pytest.approx(0.0)
    assert opposite["mean_pairwise_cosine"] == pytest.approx(-1.0)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    d = dispersion(x)
    assert d["shared_fraction"] + d["varying_fraction"] == pytest.approx(1.0)
    cos = torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1)
    assert d["mean_pairwise_cosine"] == pytest.approx(float((cos.sum() - 20) / (20 * 19)), abs=1e-6)


def test_record_nll_matches_the_module_loss(runs):
    run = load_run(runs["graph"])
    batch = next(teacher_batches(run, "tst"))
    vectors = adapter_vectors(run.module, batch["user_id"], batch["item_id"])
    nll = record_nll(run.module, batch, vectors)
    with run.module.injector.injecting(torch.stack([batch["user_pos"], batch["item_pos"]], 1), vectors):
        per_token, rows = run.module.token_nll(batch)
    for r in range(batch["input_ids"].shape[0]):
        assert float(nll[r]) == pytest.approx(float(per_token[rows == r].mean()), rel=1e-5)
    assert not run.module.user_adapter.training  # eval mode: deterministic vectors
    run.module.injector.remove()


def test_swap_test_fixed_arm_is_exactly_zero_graph_arm_is_not(runs):
    fixed = analyze(str(runs["fixed"]), parts=["swap"])["swap"]
    for kind in ("user", "item"):
        assert fixed["nll"][kind]["mean_diff"] == 0.0
        assert fixed["nll"][kind]["max_abs_diff"] == 0.0
        assert fixed["nll"][kind]["t_pvalue"] == 1.0
    graph = analyze(str(runs["graph"]), parts=["swap"])["swap"]
    assert graph["n"] == 10 and graph["embedding_source"] == "graph"
    for kind in ("user", "item"):
        assert graph["nll"][kind]["max_abs_diff"] > 0
    assert graph["user_partner_same_id"] == 0
    rows = [json.loads(x) for x in (runs["graph"] / "analysis" / "swap.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["swap_uid"] != r["uid"] and r["swap_iid"] != r["iid"] for r in rows)
    assert json.loads((runs["graph"] / "analysis" / "swap.json").read_text())["nll"]["user"]["n"] == 10
    random = analyze(str(runs["random"]), parts=["swap"], seed=1)["swap"]
    assert random["nll"]["item"]["max_abs_diff"] > 0


def test_swap_test_generation_change(runs):
    from xrec_pl.tools.analysis.swap import swap_test

    run = load_run(runs["fixed"])
    run.module.hparams.max_new_tokens = 4
    try:
        summary, rows = swap_test(run, generate=3, bertscore_kwargs={"scorer": _FakeScorer()})
    finally:
        run.module.injector.remove()
    gen = summary["generation"]
    assert gen["n"] == 3
    for kind in ("user", "item"):  # fixed embeddings: the swapped generation is the same text
        assert gen[kind]["identical_text_share"] == 1.0
        assert gen[kind]["bertscore_f1_vs_reference"]["mean_diff"] == 0.0
    assert sum("generation_own" in r for r in rows) == 3


class _FakeScorer:
    """BERTScore backend stand-in: 1 for identical texts, 0.5 otherwise."""

    def score(self, predictions, references, batch_size=64):
        f1 = torch.tensor([1.0 if p == r else 0.5 for p, r in zip(predictions, references)])
        return f1, f1, f1


def test_soft_prompt_replace_subset(runs):
    out = analyze(str(runs["random"]), parts=["soft_prompt"], replace=["both"], limit=4)["soft_prompt"]
    assert set(out["mean_replacement"]) == {"both"} and out["n"] == 4


def test_soft_prompt_analysis_fixed_vs_graph(runs):
    fixed = analyze(str(runs["fixed"]), parts=["soft_prompt"])["soft_prompt"]
    for point in fixed["points"]:
        assert point["shared_fraction"] == pytest.approx(1.0, abs=1e-6)
        assert point["mean_pairwise_cosine"] == pytest.approx(1.0, abs=1e-5)
    for kind in ("user", "item", "both"):
        assert fixed["mean_replacement"][kind]["mean_diff"] == pytest.approx(0.0, abs=1e-6)
    graph = analyze(str(runs["graph"]), parts=["soft_prompt"])["soft_prompt"]
    names = {p["point"] for p in graph["points"]}
    assert "input" in names and any(n.endswith("k_proj") for n in names)  # 2 layers x q/k/v + input
    assert len(graph["points"]) == 2 * (1 + 2 * 3)
    assert all(p["shared_fraction"] < 0.999 for p in graph["points"] if p["point"] == "input")
    k_width = [p for p in graph["points"] if p["point"].endswith("k_proj")]
    assert all(np.isfinite(p["scale_vs_base"]) and p["scale_vs_base"] > 0 for p in k_width)
    assert graph["mean_replacement"]["both"]["n"] == 10
    assert graph["mean_replacement"]["both"]["mean_diff"] != 0.0
    assert set(graph["layers_summary"]) >= {"user/input", "item/q_proj", "item/v_proj"}


def test_item_ranks_mask_training_items():
    user = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[5.0, 0], [4.0, 0], [3.0, 0], [2.0, 0], [1.0, 0]])
    assert item_ranks(user, items, [0], [3]).tolist() == [4]
    train = np.array([[0, 0], [0, 1], [0, 3]])  # the record's own item is never masked
    assert item_ranks(user, items, [0], [3], train).tolist() == [2]
    assert bucket_names((2, 4)) == ["top-2", "3-4", "over-4"]
    assert bucket_labels(np.array([1, 2, 3, 4, 5]), (2, 4)) == ["top-2", "top-2", "3-4", "3-4", "over-4"]


def test_buckets_from_predictions(runs, graph_swap, monkeypatch):
    run_dir = runs["graph"]
    recs = [json.loads(x) for x in graph_swap.read_text().splitlines()]
    rows = [
        {"uid": r["uid"], "iid": r["iid"], "prediction": f"text {k}", "reference": r["reference"]}
        for k, r in enumerate(recs)
    ]
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import xrec_pl.tools.evaluate as ev

    real = ev.evaluate

    def fake(predictions, references, metrics=("usr",), **kw):
        metrics = tuple(m for m in metrics if m == "usr")
        out = real(
            predictions, references, metrics=metrics or ("usr",), **{k: v for k, v in kw.items() if k == "per_sample"}
        )
        if kw.get("per_sample"):
            out["per_sample"] = {"bertscore_f1": [len(p) / 10 for p in predictions]}
        return out

    monkeypatch.setattr(ev, "evaluate", fake)
    summary = analyze(str(run_dir), parts=["buckets"], edges=[2, 10])["buckets"]
    assert summary["n"] == 10
    assert sum(b["n"] for b in summary["buckets"].values()) == 10
    assert set(summary["buckets"]) == {"top-2", "3-10", "over-10"}
    for b in summary["buckets"].values():
        if b["n"]:
            assert b["bertscore_f1"]["ci_low"] <= b["bertscore_f1"]["mean"] <= b["bertscore_f1"]["ci_high"]
            assert "nll_user_swap_minus_own" in b
    out = [json.loads(x) for x in (run_dir / "analysis" / "buckets.jsonl").read_text().splitlines()]
    assert all(r["rank"] >= 1 for r in out)


def test_buckets_without_predictions_use_the_swap_records(graph_swap, synthetic_dir, emb_path, tmp_path):
    from xrec_pl.tools.analysis.buckets import bucket_report

    swap = graph_swap
    summary, rows = bucket_report(tmp_path / "none.jsonl", emb_path, synthetic_dir, edges=(2, 10), swap_rows=swap)
    assert summary["n"] == 10 and len(rows) == 10
    first = next(b for b in summary["buckets"].values() if b["n"])
    assert set(first) >= {"nll_own", "nll_user_swap_minus_own", "nll_item_swap_minus_own"}
    assert "bertscore_f1" not in first and "usr" not in first
    with pytest.raises(DataError, match="predictions file not found"):
        bucket_report(tmp_path / "none.jsonl", emb_path, synthetic_dir, swap_rows=tmp_path / "nothing.jsonl")


def test_load_run_reads_a_checkpoint_of_the_old_key_layout(runs, tmp_path):
    """A last.ckpt as main wrote it before ExplainerModule held a net (adapter keys ``user_adapter.*``) still loads."""
    ckpt = torch.load(runs["fixed"] / "checkpoints" / "last.ckpt", weights_only=False)
    old_state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    assert any(k.startswith("user_adapter.") for k in old_state) and any(
        k.startswith("item_adapter.") for k in old_state
    )
    torch.save({**ckpt, "state_dict": old_state}, tmp_path / "old.ckpt")
    run = load_run(runs["fixed"], checkpoint=str(tmp_path / "old.ckpt"))
    for key, value in old_state.items():
        assert torch.equal(run.module.get_parameter(f"net.{key}"), value), key


@pytest.mark.parametrize(
    ("key", "value"), [("penalty_scope", "evil"), ("adapter", "telepathic"), ("no_repeat_ngram_size", -3)]
)
def test_load_run_refuses_edited_settings_in_one_line(runs, tmp_path, capsys, key, value):
    """A checkpoint whose stored settings the module rejects: ``analyze`` exits 2 with one line naming the file."""
    from xrec_pl.cli import main

    ckpt = torch.load(runs["fixed"] / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["hyper_parameters"][key] = value
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(DataError, match="stored explainer settings are not valid"):
        load_run(tmp_path / "run")
    assert main(["analyze", "--run", str(tmp_path / "run"), "--parts", "[soft_prompt]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.ckpt" in err[0] and "not valid" in err[0] and "Traceback" not in err[0]


def test_bad_inputs_name_the_problem(tmp_path, runs):
    with pytest.raises(DataError, match="last.ckpt"):
        analyze(str(tmp_path), parts=["swap"])
    with pytest.raises(DataError, match="unknown part"):
        analyze(str(runs["fixed"]), parts=["nope"])
    with pytest.raises(DataError, match="--replace"):
        analyze(str(runs["fixed"]), parts=["soft_prompt"], replace=["half"])


def test_cli_analyze_writes_into_the_run_folder(runs, capsys):
    from xrec_pl.cli import main

    assert main(["analyze", "--run", str(runs["random"]), "--parts", "[swap]", "--limit", "6"]) == 0
    summary = json.loads((runs["random"] / "analysis" / "swap.json").read_text())
    assert summary["n"] == 6 and summary["embedding_source"] == "random"
    assert main(["analyze", "--run", str(runs["random"]), "--parts", "[telepathy]"]) == 2
    assert "unknown part" in capsys.readouterr().err


class _Exploit:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("parts", [["swap"], ["buckets"]])
def test_analyze_never_runs_code_from_a_planted_checkpoint(tmp_path, capsys, parts):
    """A run folder shared by someone else: ``analyze --run`` reads its checkpoint weights-only (exit 2, one line)."""
    import pickle

    from xrec_pl.cli import main

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(pickle.dumps({"hyper_parameters": {"embedding_source": "graph"}, "x": _Exploit(marker)}))
    assert main(["analyze", "--run", str(tmp_path / "run"), "--parts", json.dumps(parts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert len(err) == 1 and "last.ckpt" in err[0] and "Traceback" not in err[0]


def test_analyze_refuses_a_run_another_process_holds(runs, tmp_path):
    """A run being trained or analysed by another process: one line naming it, nothing written."""
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"  # a copy: this process may hold the fixture runs' locks from other tests
    shutil.copytree(runs["fixed"], run, ignore=shutil.ignore_patterns(".xrec-pl.lock"))
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from xrec_pl.run_lock import lock_run_folder; lock_run_folder({str(run)!r}); "
         "print('held', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in (run / "analysis").glob("*")) if (run / "analysis").exists() else []
        with pytest.raises(DataError, match=str(holder.pid)):
            analyze(str(run), parts=["swap"], limit=2)
        after = sorted(p.name for p in (run / "analysis").glob("*")) if (run / "analysis").exists() else []
        assert after == before
    finally:
        holder.kill()
        holder.wait()
