"""Explanation metrics: USR, BERTScore plumbing (fake scorer), dedup by sample id, judge parsing, significance."""

from __future__ import annotations

import math
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from xrec_pl.errors import DataError
from xrec_pl.metrics import USR, BERTScore, LLMJudge, build_metric, parse_judge_score, stable_text_hash
from xrec_pl.metrics.significance import bootstrap_mean_diff_ci, compare_paired, compare_scores, paired_tests


class FakeScorer:
    """Deterministic per-pair scores from character sets (order-independent, batch-independent)."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, cands, refs, batch_size=64):
        self.calls += 1
        p, r = [], []
        for c, ref in zip(cands, refs):
            a, b = set(c), set(ref)
            common = len(a & b)
            p.append(common / max(len(a), 1))
            r.append(common / max(len(b), 1))
        p, r = torch.tensor(p), torch.tensor(r)
        return p, r, torch.where(p + r > 0, 2 * p * r / (p + r), torch.zeros_like(p))


# -- USR ---------------------------------------------------------------------------------------------------
def test_stable_hash_is_whitespace_normalised_and_case_sensitive():
    assert stable_text_hash("a b  c\n") == stable_text_hash(" a b c")
    assert stable_text_hash("a b c") != stable_text_hash("A b c")
    assert stable_text_hash("ab c") != stable_text_hash("a bc")  # token boundaries matter
    assert -(2**63) <= stable_text_hash("x") < 2**63


def test_stable_hash_same_in_another_process():
    code = "from xrec_pl.metrics.hashing import stable_text_hash as h; print(h('The user would buy it'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == stable_text_hash("The user would  buy it")


@pytest.mark.parametrize(
    ("preds", "expected"),
    [
        (["a b", "a b", "c"], 2 / 3),
        (["a b", "a  b ", "a b."], 2 / 3),
        (["x", "y", "z", "w"], 1.0),
        (["same"] * 5, 1 / 5),
        (["", " ", "x"], 2 / 3),  # empty predictions are one (empty) sequence
    ],
)
def test_usr_hand_cases(preds, expected):
    usr = USR()
    usr.update(preds, [""] * len(preds))
    out = usr.compute()
    assert out["usr"] == pytest.approx(expected)
    assert out["usr_n"] == len(preds)


def test_usr_drops_duplicate_sample_ids():
    usr = USR()
    usr.update(["a", "b"], ["", ""], ids=[0, 1])
    usr.update(["a", "c"], ["", ""], ids=[0, 2])  # id 0 again: a padded duplicate
    out = usr.compute()
    assert out["usr_n"] == 3 and out["usr"] == 1.0


# -- BERTScore ---------------------------------------------------------------------------------------------
PREDS = ["the book is fun", "a dark thriller", "romance and drama", "cooking at home", "space opera"]
REFS = ["a fun book", "a thriller, dark", "drama with romance", "home cooking", "an opera in space"]


def _single(preds=PREDS, refs=REFS):
    m = BERTScore(scorer=FakeScorer())
    m.update(preds, refs, ids=range(len(preds)))
    return m.compute()


def test_bertscore_mean_std_match_scorer():
    out = _single()
    p, r, f = FakeScorer().score(PREDS, REFS)
    assert out["bertscore_precision"] == pytest.approx(p.double().mean().item())
    assert out["bertscore_recall"] == pytest.approx(r.double().mean().item())
    assert out["bertscore_f1"] == pytest.approx(f.double().mean().item())
    assert out["bertscore_f1_std"] == pytest.approx(f.double().std(correction=0).item())


def test_bertscore_dedup_and_order_independence():
    m = BERTScore(scorer=FakeScorer())
    order = [3, 0, 4, 1, 2, 0, 3]  # shuffled, two padded duplicates
    for start in range(0, len(order), 3):
        idx = order[start : start + 3]
        m.update([PREDS[i] for i in idx], [REFS[i] for i in idx], ids=idx)
    assert m.compute() == pytest.approx(_single())
    samples = m.sample_scores()
    assert samples["sample_id"].tolist() == [0, 1, 2, 3, 4]
    assert set(samples) == {"bertscore_precision", "bertscore_recall", "bertscore_f1", "sample_id"}


def test_samples_without_ids_are_kept():
    m = BERTScore(scorer=FakeScorer())
    m.update(PREDS[:2], REFS[:2])
    m.update(PREDS[:2], REFS[:2])
    assert m.per_sample()["f1"].numel() == 4


def test_update_validates_input():
    m = BERTScore(scorer=FakeScorer())
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        m.update(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="prediction 1 is int"):
        m.update(["a", 3], ["a", "b"])
    with pytest.raises(ValueError, match="sample ids"):
        m.update(["a"], ["b"], ids=[0, 1])


def test_compute_without_updates_is_nan():
    out = BERTScore(scorer=FakeScorer()).compute()
    assert math.isnan(out["bertscore_f1"])


def test_build_metric_and_describe():
    assert isinstance(build_metric("usr"), USR)
    with pytest.raises(ValueError, match="unknown metric"):
        build_metric("rouge")
    desc = BERTScore().describe()  # resolves the offline default without loading it
    assert desc["backbone"] == "all-MiniLM-L6-v2" and desc["num_layers"] == 6
    assert desc["rescale_with_baseline"] is False


def test_bertscore_config_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no BERTScore rescaling baseline"):
        BERTScore(rescale_with_baseline=True).describe()  # no baseline file ships for MiniLM
    with pytest.raises(DataError, match="backbone folder not found"):
        BERTScore(model_type=str(tmp_path / "nope")).describe()
    with pytest.raises(DataError, match="neither a local folder nor in the Hugging Face cache"):
        BERTScore(model_type="surely-not-cached/model-xyz").describe()
    with pytest.raises(ValueError, match="idf_sents"):
        BERTScore(idf=True)


def test_bertscore_roberta_switch_resolves_bundled_baseline(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr("xrec_pl.metrics.bertscore.resolve_local_model", lambda name: tmp_path)
    desc = BERTScore(model_type="roberta-large", rescale_with_baseline=True).describe()
    assert desc["num_layers"] == 17
    assert desc["baseline_path"].endswith("rescale_baseline/en/roberta-large.tsv")


def test_real_minilm_matches_bert_score_without_network(monkeypatch):
    """The offline default builds and scores with sockets disabled, and equals a direct bert_score call."""
    bert_score = pytest.importorskip("bert_score")

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    metric = BERTScore(device="cpu")
    metric.update(PREDS, REFS, ids=range(len(PREDS)))
    out = metric.compute()
    direct = bert_score.BERTScorer(model_type=metric.describe()["path"], num_layers=6, device="cpu")
    p, r, f = direct.score(PREDS, REFS)
    assert out["bertscore_precision"] == pytest.approx(p.double().mean().item(), abs=1e-6)
    assert out["bertscore_recall"] == pytest.approx(r.double().mean().item(), abs=1e-6)
    assert out["bertscore_f1"] == pytest.approx(f.double().mean().item(), abs=1e-6)
    # empty prediction or reference: 0 (bert_score itself raises on empty strings under transformers 5)
    empty = BERTScore(scorer=metric.scorer)
    empty.update(["", "a fun book", "a book"], ["a fun book", " ", "a book"], ids=[0, 1, 2])
    scores = empty.sample_scores()["bertscore_f1"]
    assert scores[:2].tolist() == [0.0, 0.0] and scores[2].item() == pytest.approx(1.0, abs=1e-5)


# -- LLM judge ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("85", 85.0),
        (" 85.", 85.0),
        ("Score: 72/100", 72.0),
        ("8/10", 80.0),
        ("**90**", 90.0),
        ("I'd say 67.5 out of 100", 67.5),
        ("95%", 95.0),
        ("100", 100.0),
        ("0", 0.0),
        ("no idea", None),
        ("", None),
        ("150", None),
        ("-5", None),
        ("11/10", None),
    ],
)
def test_parse_judge_score(text, expected):
    assert parse_judge_score(text) == expected


def test_judge_counts_unparsable_and_never_crashes():
    answers = iter(["85", "Score: 70/100", "I cannot tell", "90", "lots"])

    def scripted(preds, refs):
        return [next(answers) for _ in preds]

    judge = LLMJudge(judge=scripted)
    judge.update(PREDS[:3], REFS[:3], ids=[0, 1, 2])
    judge.update(PREDS[3:], REFS[3:], ids=[3, 4])
    out = judge.compute()
    assert out["judge_unparsable"] == 2 and out["judge_n"] == 5
    assert out["llm_judge"] == pytest.approx((85 + 70 + 90) / 3)
    assert math.isnan(judge.sample_scores()["llm_judge"][2].item())


def test_judge_with_tiny_random_llama():
    """Plumbing with a real HF causal LM: prompts, left padding, greedy generation, parsing."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [str(i) for i in range(101)] + ["a", "b", "the", "book", "score"]
    tok_model = models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    raw = Tokenizer(tok_model)
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    judge = LLMJudge(model=model, tokenizer=tokenizer, max_new_tokens=3, batch_size=2)
    assert not list(judge.children())  # the judge model is not registered inside the metric
    judge.update(PREDS[:3], REFS[:3], ids=[0, 1, 2])
    out = judge.compute()
    assert out["judge_n"] == 3 and 0 <= out["judge_unparsable"] <= 3
    assert tokenizer.padding_side == "right"  # restored


# -- significance ------------------------------------------------------------------------------------------
def test_bootstrap_ci_seeded_and_covers_shift():
    rng = np.random.default_rng(1)
    b = rng.normal(0.6, 0.05, size=400)
    a = b + 0.02 + rng.normal(0, 0.01, size=400)
    ci1 = bootstrap_mean_diff_ci(a, b, n_resamples=2000, seed=3)
    ci2 = bootstrap_mean_diff_ci(a, b, n_resamples=2000, seed=3)
    assert ci1 == ci2
    assert ci1[0] < 0.02 < ci1[1] and ci1[0] > 0.015


def test_paired_tests_match_scipy_on_known_data():
    from scipy import stats

    a = np.array([0.61, 0.70, 0.55, 0.64, 0.72, 0.58, 0.66, 0.69])
    b = np.array([0.60, 0.65, 0.56, 0.60, 0.70, 0.55, 0.60, 0.61])
    out = paired_tests(a, b)
    assert out["t_pvalue"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert out["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    # hand check of the t statistic: mean(d) / (sd(d) / sqrt(n))
    d = a - b
    assert out["t_statistic"] == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(d.size)))
    assert out["t_pvalue"] < 0.05


def test_identical_systems_and_nan_pairs():
    a = np.array([0.5, 0.6, np.nan, 0.7])
    res = compare_paired(a, a.copy(), n_resamples=200)
    assert res["n"] == 3 and res["dropped_nan"] == 1
    assert res["mean_diff"] == 0 and res["t_pvalue"] == 1.0 and res["wilcoxon_pvalue"] == 1.0
    assert res["ci_low"] == res["ci_high"] == 0.0
    multi = compare_scores({"x": [1, 2, 3], "sample_id": [0, 1, 2]}, {"x": [1, 2, 4]}, n_resamples=100)
    assert set(multi) == {"x"}
    with pytest.raises(ValueError, match="equal lengths"):
        compare_paired([1, 2], [1, 2, 3])


def test_judge_default_path_loads_through_load_frozen_llm():
    pytest.importorskip("xrec_pl.models.llm")
    judge = LLMJudge(judge_model="tiny-random", max_new_tokens=2)
    judge.update(PREDS[:2], REFS[:2], ids=[0, 1])
    out = judge.compute()
    assert out["judge_n"] == 2
    assert judge.describe()["judge"] == "tiny-random"
