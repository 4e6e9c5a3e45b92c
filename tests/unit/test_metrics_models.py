"""BLEURT and BARTScore plumbing on tiny random checkpoints built and saved locally (no downloads)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from xrec_pl.errors import DataError
from xrec_pl.metrics import BLEURT, BARTScore

transformers = pytest.importorskip("transformers")

WORDS = [
    "the",
    "a",
    "user",
    "would",
    "buy",
    "book",
    "because",
    "it",
    "is",
    "fun",
    "dark",
    "thriller",
    "romance",
    "drama",
    "space",
    "opera",
    "home",
    "cooking",
]
PREDS = ["the user would buy the book because it is fun", "a dark thriller", "space opera"]
REFS = ["it is a fun book", "the thriller is dark", "a romance drama"]


def _bert_tokenizer(folder):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def tiny_bleurt(tmp_path_factory):
    if importlib.util.find_spec("bleurt_pytorch") is None:  # importing it directly fails under transformers 5
        pytest.skip("bleurt-pytorch not installed (pip install --no-deps bleurt-pytorch)")
    from xrec_pl.metrics.bleurt import import_bleurt

    classes = import_bleurt()
    folder = tmp_path_factory.mktemp("bleurt")
    tok = _bert_tokenizer(folder)
    torch.manual_seed(0)
    cfg = classes.BleurtConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    model = classes.BleurtForSequenceClassification(cfg).eval()
    model.save_pretrained(folder)
    return folder, model, tok


def test_bleurt_import_leaves_transformers_clean(tiny_bleurt):
    import transformers.pytorch_utils as pu

    # our temporary alias module is gone (transformers itself may register a real alias after AutoTokenizer use)
    alias = sys.modules.get("transformers.models.bert.tokenization_bert_fast")
    assert alias is None or getattr(alias, "__file__", None)
    assert not hasattr(pu, "find_pruneable_heads_and_indices")


def test_bleurt_scores_match_direct_forward(tiny_bleurt):
    folder, model, tok = tiny_bleurt
    metric = BLEURT(checkpoint=str(folder), batch_size=2, device="cpu")
    metric.update(PREDS, REFS, ids=[0, 1, 2])
    out = metric.compute()
    enc = tok(REFS, PREDS, padding="longest", return_tensors="pt")  # BLEURT reads (reference, candidate)
    with torch.no_grad():
        expected = model(**enc).logits.flatten().double()
    assert torch.allclose(metric.sample_scores()["bleurt"], expected, atol=1e-5)
    assert out["bleurt"] == pytest.approx(expected.mean().item(), abs=1e-5)
    assert metric.describe()["checkpoint"] == str(folder.resolve())
    # the checkpoint's tokenizer really tokenises words (the package's own would map all to [UNK] under v5)
    assert metric.scorer.tokenizer("fun book")["input_ids"][1:-1] == tok("fun book")["input_ids"][1:-1]
    assert tok.unk_token_id not in metric.scorer.tokenizer("fun book")["input_ids"]


def test_bleurt_padding_does_not_change_scores(tiny_bleurt):
    folder, _, _ = tiny_bleurt
    one = BLEURT(checkpoint=str(folder), batch_size=1, device="cpu")
    many = BLEURT(checkpoint=str(folder), batch_size=8, device="cpu")
    for m in (one, many):
        m.update(PREDS, REFS, ids=[0, 1, 2])
    assert torch.allclose(one.sample_scores()["bleurt"], many.sample_scores()["bleurt"], atol=1e-5)


def test_missing_checkpoints_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="BLEURT checkpoint not found"):
        BLEURT(checkpoint=str(tmp_path / "BLEURT-20-D12"))
    with pytest.raises(DataError, match="no checkpoint path given"):
        BLEURT()
    with pytest.raises(DataError, match=r"bart-large-cnn: BARTScore checkpoint not found"):
        BARTScore(checkpoint=str(tmp_path / "bart-large-cnn"))


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bart")
    tok = _bert_tokenizer(folder)
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=len(tok),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.sep_token_id,
        forced_eos_token_id=None,
    )
    model = transformers.BartForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    return folder, model, tok


def _reference_bartscore(model, tok, src: str, tgt: str) -> float:
    """Unbatched formula: mean over target tokens of log p(y_t | y_<t, x), teacher forcing."""
    x = tok(src, return_tensors="pt")["input_ids"]
    y = tok(tgt, return_tensors="pt")["input_ids"]  # (1, m)
    dec_in = torch.cat([torch.tensor([[model.config.decoder_start_token_id]]), y[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=x, decoder_input_ids=dec_in).logits  # (1, m, V)
    logp = torch.log_softmax(logits, -1)[0, torch.arange(y.shape[1]), y[0]]
    return logp.mean().item()


def test_bartscore_matches_formula(tiny_bart):
    folder, model, tok = tiny_bart
    metric = BARTScore(checkpoint=str(folder), batch_size=2, device="cpu")
    metric.update(PREDS, REFS, ids=[0, 1, 2])
    out = metric.compute()
    samples = metric.sample_scores()
    for i, (p, r) in enumerate(zip(PREDS, REFS)):
        prec = _reference_bartscore(model, tok, r, p)  # reference -> prediction
        rec = _reference_bartscore(model, tok, p, r)
        assert samples["bartscore_precision"][i].item() == pytest.approx(prec, abs=1e-4)
        assert samples["bartscore_recall"][i].item() == pytest.approx(rec, abs=1e-4)
        assert samples["bartscore"][i].item() == pytest.approx((prec + rec) / 2, abs=1e-4)
    assert out["bartscore"] < 0
    assert set(out) >= {"bartscore", "bartscore_std", "bartscore_precision", "bartscore_recall"}
