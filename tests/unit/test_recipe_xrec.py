"""recipe: xrec — each point of the reference recipe, so that the presets cannot drift from HKUDS/XRec unnoticed.

The reference's code read for these: ``explainer/utils/data_handler.py`` (prompt strings), ``explainer/models/
explainer.py`` (tokenisation, loss from ``<EXPLAIN_POS>``, ``generate`` without decoding arguments), ``explainer/
main.py`` (Adam, batch 1, shuffled, last adapters kept, cut at the first ``[``), ``encoder/`` (stage 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.unit.test_explainer import emb_path as emb_path  # the fixture
from xrec_pl.data.graph import ItemSets, NegativeSampler
from xrec_pl.data.prompts import PromptBuilder
from xrec_pl.data.ranking import rank_metrics
from xrec_pl.data.reference_prompt import reference_text
from xrec_pl.models.decoding import (
    Sampling,
    banned_ngram_tokens,
    bracket_token_ids,
    cut_at_bracket,
    next_token,
    resolve_sampling,
)
from xrec_pl.models.llm import resolve_quantization

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "xrec"
AMAZON = Path("/work/shared/data/amazon")

# tst.pkl of XRec's Amazon release, the record (uid 5569, iid 5540), and the reference's generation prompt for it,
# written out by hand from data_handler.py's f-string (typo "buy with the book" and all).
RECORD = {
    "uid": 5569,
    "iid": 5540,
    "title": "Blue Christmas",
    "user_summary": "Based on the user's purchased books and reviews, this user is likely to enjoy introspective "
    "memoirs, romantic suspense/mystery novels, heartwarming holiday romances, and page-turning mysteries and thrillers.",
    "item_summary": "Fans of heartwarming holiday romances will enjoy Blue Christmas.",
    "explanation": "The user would buy the book because they appreciate the author's ability to create an interesting "
    "story without graphic content, and they enjoy the heartwarming plot of a young woman finding unexpected "
    "companionship during the holiday season.",
}
PROMPT = (
    "<s>[INST] <<SYS>>Explain why the user would buy with the book within 50 words.<</SYS>>user record: <USER_EMBED> "
    "book record: <ITEM_EMBED> book name: Blue Christmas user profile: Based on the user's purchased books and reviews, "
    "this user is likely to enjoy introspective memoirs, romantic suspense/mystery novels, heartwarming holiday "
    "romances, and page-turning mysteries and thrillers. book profile: Fans of heartwarming holiday romances will "
    "enjoy Blue Christmas. <EXPLAIN_POS>[/INST]"
)
# the same prompt through SmolLM2-135M-Instruct's tokenizer (reserved tokens 49152-49154), one string
PROMPT_IDS = [
    44, 99, 46, 75, 39637, 77, 22646, 67, 19572, 7791, 36971, 1701, 260, 2914, 736, 4571, 351, 260, 1863, 1127, 216,
    37, 32, 1924, 15602, 9617, 67, 19572, 7791, 4093, 2004, 42, 216, 49152, 1863, 2004, 42, 216, 49153, 1863, 1462, 42,
    10062, 8616, 2914, 8249, 42, 10098, 335, 260, 2914, 506, 10610, 2905, 284, 9470, 28, 451, 2914, 314, 2003, 288,
    2815, 23367, 11836, 30331, 28, 12986, 27279, 31, 2334, 23780, 9504, 28, 1911, 37645, 9937, 31851, 28, 284, 3013,
    29, 20589, 274, 13251, 284, 28021, 366, 30, 1863, 8249, 42, 426, 487, 282, 1911, 37645, 9937, 31851, 523, 2815,
    10062, 8616, 30, 216, 49154, 75, 31, 39637, 77,
]  # fmt: skip


@pytest.fixture(scope="module")
def embedded_explain():
    """The embedded SmolLM2 with the recipe's extra token (tokenizer ids 49152-49155)."""
    from xrec_pl.models.llm import load_frozen_llm

    return load_frozen_llm("embedded", extra_tokens=("<EXPLAIN_POS>",))


def _load(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


# ----------------------------------------------------------------------------------------------------- prompt
def test_reference_strings_training_and_generation():
    assert reference_text("books", RECORD["title"], RECORD["user_summary"], RECORD["item_summary"]) == PROMPT
    train = reference_text("books", **{k: RECORD[k] for k in ("title", "user_summary", "item_summary", "explanation")})
    assert train == PROMPT.replace("<EXPLAIN_POS>[/INST]", f"<EXPLAIN_POS> {RECORD['explanation']}[/INST]")
    business = reference_text("business", "Cafe", "u", "i")
    assert "Explain why the user would enjoy the business within 50 words." in business
    assert "business record: <ITEM_EMBED> business name: Cafe user profile: u business profile: i" in business


@pytest.mark.skipif(not (AMAZON / "tst.pkl").is_file(), reason="needs ../shared/data/amazon")
def test_amazon_record_string_and_smollm2_ids(embedded_explain):
    import pandas as pd

    row = pd.read_pickle(AMAZON / "tst.pkl").set_index(["uid", "iid"]).loc[(RECORD["uid"], RECORD["iid"])]
    record = {
        "uid": RECORD["uid"],
        "iid": RECORD["iid"],
        **{k: row[k] for k in ("title", "user_summary", "item_summary")},
    }
    assert record == {k: RECORD[k] for k in record}
    _, tok = embedded_explain
    builder = PromptBuilder(tok, "xrec_exact", "books")
    encoded = builder.encode_prompt(record)
    assert encoded["input_ids"] == PROMPT_IDS == tok(PROMPT)["input_ids"]
    assert tok.decode(encoded["input_ids"]) == PROMPT
    assert (encoded["user_pos"], encoded["item_pos"]) == (PROMPT_IDS.index(49152), PROMPT_IDS.index(49153))
    train = builder.encode_train(RECORD)
    start = train["input_ids"].index(49154)
    assert train["input_ids"][:start] == PROMPT_IDS[:start]
    assert all(x == -100 for x in train["labels"][:start]) and train["labels"][start:] == train["input_ids"][start:]
    assert tok.decode(train["input_ids"][start:]).endswith("holiday season.[/INST]")


def _llama_layout_tokenizer():
    """A word-level tokenizer laid out like Llama-2's: <unk>=0, <s>=1 (added in front of every text), </s>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(PROMPT.replace("<", " ").replace(">", " ").replace("[", " ").replace("]", " ").split()))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok


def test_llama2_layout_two_bos_reserved_order_and_labels():
    from xrec_pl.models.llm import add_reserved_tokens
    from xrec_pl.models.tiny import build_tiny_llm

    model, _ = build_tiny_llm()
    tok = _llama_layout_tokenizer()
    added = add_reserved_tokens(model, tok, extra_tokens=("<EXPLAIN_POS>",))
    # the reference's order: its three tokens first, then the pad token (Llama-2: 32000, 32001, 32002, 32003)
    assert list(added) == ["<USER_EMBED>", "<ITEM_EMBED>", "<EXPLAIN_POS>", "<|pad|>"]
    assert list(added.values()) == sorted(added.values())
    builder = PromptBuilder(tok, "xrec_exact", "books")
    prompt = builder.encode_prompt(RECORD)["input_ids"]
    assert prompt[:2] == [1, 1]  # the tokenizer's BOS, then the literal "<s>" of the string
    tail = tok("[/INST]", add_special_tokens=False)["input_ids"]
    assert prompt[-len(tail) - 1 :] == [added["<EXPLAIN_POS>"], *tail]
    train = builder.encode_train(RECORD)
    start = train["input_ids"].index(added["<EXPLAIN_POS>"])
    assert train["labels"][start] == added["<EXPLAIN_POS>"] and set(train["labels"][:start]) == {-100}


def test_missing_explain_token_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="extra_tokens"):
        PromptBuilder(tiny_tokenizer, "xrec_exact", "books")


# ----------------------------------------------------------------------------------------------------- decoding
def test_cut_and_bracket_stop_tokens(tiny_tokenizer):
    assert cut_at_bracket("Because it is good.[/INST] more") == "Because it is good."
    assert cut_at_bracket("no bracket") == "no bracket"
    ids = bracket_token_ids(tiny_tokenizer)
    assert ids and all("[" in tiny_tokenizer.decode([i]) for i in ids)
    first = tiny_tokenizer("a [/INST]", add_special_tokens=False)["input_ids"]
    assert any(i in ids for i in first)


def test_resolve_sampling_from_the_model_config():
    from transformers import GenerationConfig

    llama2_chat = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9)  # Llama-2-7b-chat-hf's file
    s = resolve_sampling("model", llama2_chat)
    assert (s.do_sample, s.temperature, s.top_p, s.top_k) == (True, 0.6, 0.9, 50)
    assert resolve_sampling("greedy", llama2_chat).is_greedy
    assert resolve_sampling("model", llama2_chat, {"do_sample": False}).is_greedy
    assert resolve_sampling("greedy", None, {"no_repeat_ngram_size": 3}).no_repeat_ngram_size == 3
    with pytest.raises(ValueError, match="unknown"):
        resolve_sampling("greedy", None, {"beams": 2})


def test_next_token_processors():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    assert next_token(logits, Sampling()).item() == 0
    # repetition penalty: token 0 seen -> 2/4 = 0.5 < 1.0
    assert next_token(logits, Sampling(repetition_penalty=4.0), torch.tensor([[0, -1]])).item() == 1
    # n-gram ban: history 0 1 0 -> a following 1 would repeat the bigram (0, 1)
    assert banned_ngram_tokens(torch.tensor([[0, 1, 0]]), 2) == [[1]]
    hist = torch.tensor([[3, 0, 3]])
    assert next_token(logits, Sampling(no_repeat_ngram_size=2), hist).item() == 1
    # top_p so small that only the argmax survives; sampling then always returns it
    g = torch.Generator().manual_seed(0)
    draws = {next_token(logits, Sampling(do_sample=True, top_p=0.01), generator=g).item() for _ in range(20)}
    assert draws == {0}
    draws = {
        next_token(logits, Sampling(do_sample=True, temperature=5.0, top_k=0), generator=g).item() for _ in range(200)
    }
    assert draws == {0, 1, 2, 3}


def test_compact_decoder_penalties_equal_generate(tiny_llm):
    from transformers import GenerationConfig

    from xrec_pl.models.decoding import greedy_generate

    model, tok = tiny_llm
    ids = torch.tensor([tok("the user likes books")["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    for kw in ({"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}):
        config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=[-5], pad_token_id=0, **kw)
        want = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
        got = greedy_generate(
            model,
            mask,
            input_ids=ids,
            max_new_tokens=12,
            stop_ids=[-5],
            pad_id=0,
            sampling=Sampling(**kw, penalty_scope="all"),
        )
        assert torch.equal(got, want), kw


def test_quantization_auto_without_cuda_is_unquantized():
    assert resolve_quantization("auto", "embedded") is None
    if not torch.cuda.is_available():
        assert resolve_quantization("auto", "/models/Llama-2-7b-chat-hf") is None
    assert resolve_quantization("8bit", "x") == "8bit" and resolve_quantization(None) is None


# ----------------------------------------------------------------------------------------------------- stage 1
def test_negative_pool_train_items_only():
    sets = ItemSets(np.array([[0, 0], [1, 2], [1, 3]]), 2, 6)
    neg = NegativeSampler(sets, seed=1, candidates=np.array([0, 2, 3])).sample(np.zeros(300, dtype=np.int64), 0)
    assert set(neg.tolist()) == {2, 3}  # never 0 (a positive), never 1/4/5 (not seen in training)


def test_xrec_mrr_is_the_sum_of_reciprocal_ranks():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    targets = (torch.tensor([0, 0]), torch.tensor([1, 2]))
    first = rank_metrics(scores.clone(), targets, ks=(3,))
    summed = rank_metrics(scores.clone(), targets, ks=(3,), mrr="sum")
    assert first["mrr@3"].item() == pytest.approx(1 / 2)
    assert summed["mrr@3"].item() == pytest.approx(1 / 2 + 1 / 3)


def _reference_recall(user_emb, item_emb, val_rows, k):
    """encoder/utils/metrics.py's recall: one row per val interaction, nothing masked, mean over rows."""
    gt = {}
    for u, i in val_rows:
        gt.setdefault(u, set()).add(i)
    total = 0.0
    for u, _ in val_rows:
        top = torch.topk(user_emb[u] @ item_emb.T, k).indices.tolist()
        total += sum(t in gt[u] for t in top) / len(gt[u])
    return total / len(val_rows)


def test_xrec_eval_protocol_matches_the_reference_metric(synthetic_dir, tmp_path):
    import lightning.pytorch as pl

    from data_modules.graph import InteractionDataModule
    from xrec_pl.lit.recommender import LightGCNModule

    dm = InteractionDataModule(synthetic_dir, batch_size=64, eval_batch_size=7)
    module = LightGCNModule(dim=8, num_layers=2, reg_on="final", eval_protocol="xrec", ks=(5,))
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    out = trainer.validate(module, datamodule=dm)[0]
    user_emb, item_emb = module.get_embeddings()
    want = _reference_recall(user_emb, item_emb, dm.interactions("val").tolist(), 5)
    assert out["val/recall@5"] == pytest.approx(want, rel=1e-5)
    masked = trainer.validate(LightGCNModule(dim=8, num_layers=2, ks=(5,)), datamodule=dm)[0]
    assert masked["val/recall@5"] != pytest.approx(want, rel=1e-5)  # the default protocol is a different number


# ----------------------------------------------------------------------------------------------------- presets
def test_stage1_preset_points():
    cfg = _load("stage1.yaml")
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert (model["reg_on"], model["eval_protocol"], model["encoder"]) == ("final", "xrec", "lightgcn")
    assert (model["dim"], model["num_layers"], model["combine"], model["lr"], model["weight_decay"]) == (
        64, 4, "sum", 0.001, 1e-6,
    )  # fmt: skip
    assert (data["batch_size"], data["resample_negatives"], data["negative_pool"]) == (1024, False, "train")
    assert cfg["trainer"]["max_epochs"] == 300
    stop = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")][0]["init_args"]
    assert (stop["monitor"], stop["mode"], stop["patience"]) == ("val/recall@20", "max", 10)


@pytest.mark.parametrize("name,domain", [("stage2.yaml", "books"), ("yelp_stage2.yaml", "business"),
                                         ("google_stage2.yaml", "business")])  # fmt: skip
def test_stage2_preset_points(name, domain):
    cfg = _load(name)
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert (data["style"], data["domain"], data["batch_size"], data["bucket_by_length"]) == (
        "xrec_exact", domain, 1, False,
    )  # fmt: skip
    assert model["extra_tokens"] == ["<EXPLAIN_POS>"] and model["quantization"] == "auto"
    assert (model["optimizer"], model["lr"], model["weight_decay"], model["warmup_steps"]) == ("adam", 1e-4, 0.0, 0)
    assert (model["adapter"], model["num_experts"], model["adapter_dropout"], model["injection"]) == (
        "moe", 8, 0.2, "layers",
    )  # fmt: skip
    assert (model["generation_defaults"], model["postprocess"], model["max_new_tokens"]) == ("model", "xrec", 128)
    assert trainer["max_epochs"] == 1 and trainer["limit_val_batches"] == 0
    ckpt = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")][0]["init_args"]
    assert "monitor" not in ckpt  # no best-val/loss selection: the adapters after the last step


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*stage*.yaml")))
def test_recipe_configs_parse(name, capsys):
    from xrec_pl.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", str(RECIPES / name), "--print_config"])
    assert info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_pipeline_presets_point_at_existing_configs():
    root = RECIPES.parents[2]
    for path in RECIPES.glob("*pipeline.yaml"):
        cfg = yaml.safe_load(path.read_text())
        assert (root / cfg["stage1_config"]).is_file() and (root / cfg["stage2_config"]).is_file()
        business = "yelp" in path.name or "google" in path.name
        domain = yaml.safe_load((root / cfg["stage2_config"]).read_text())["data"]["init_args"]["domain"]
        assert domain == ("business" if business else "books")


# ----------------------------------------------------------------------------------------------------- module
def test_explainer_postprocess_leaves_no_bracket(synthetic_dir, emb_path):
    from tests.unit.test_explainer import make, train_batch

    module = make(emb_path, max_new_tokens=24, postprocess="xrec", do_sample=True, temperature=1.5).eval()
    dm, _ = train_batch(module, synthetic_dir)
    batch = next(iter(dm.generation_dataloader("val", indices=list(range(6)), batch_size=6)))
    torch.manual_seed(0)
    texts = module.generate_explanations(batch)
    assert len(texts) == 6 and not any("[" in t for t in texts)
    assert module.sampling.do_sample and module.sampling.temperature == 1.5
    with pytest.raises(ValueError, match="postprocess"):
        make(emb_path, postprocess="trim")


# ----------------------------------------------------------------------------------------------------- judge, template
def test_judge_prompt_xrec_messages():
    import json

    from xrec_pl.metrics import LLMJudge
    from xrec_pl.metrics.judge import XREC_JUDGE_SYSTEM, build_judge_prompt, judge_messages

    system, user = judge_messages("p text", "r text", "xrec")
    assert system["content"].startswith("Score the given explanation against the ground truth on a scale from 0")
    assert system["content"].endswith("Provide your score as a number and do not provide any other text.")
    assert json.loads(user["content"]) == {"prediction": "p text", "reference": "r text"}
    assert (
        build_judge_prompt("p", "r", None, "", "xrec")
        == f"{XREC_JUDGE_SYSTEM}\n\n{json.dumps({'prediction': 'p', 'reference': 'r'})}\n"
    )
    judge = LLMJudge(judge=lambda p, r: ["85", "no idea"], prompt_style="xrec")
    assert judge.answer_prefix == "" and judge.describe()["prompt"] == "xrec-gptscore"
    judge.update(["a", "b"], ["c", "d"], ids=[0, 1])
    out = judge.compute()
    assert out["llm_judge"] == 85.0 and out["judge_unparsable"] == 1.0
    with pytest.raises(ValueError, match="prompt style"):
        LLMJudge(judge=lambda p, r: [], prompt_style="gpt4")


def test_missing_chat_template_warns_once_and_config_chooses(fresh_tiny_tokenizer, caplog):
    import logging

    from xrec_pl.data import prompts

    tok = fresh_tiny_tokenizer
    tok.chat_template = None
    prompts._warned_no_template.clear()
    with caplog.at_level(logging.WARNING, logger="xrec_pl.data.prompts"):
        first = PromptBuilder(tok, "chat").encode_prompt(RECORD)
        PromptBuilder(tok, "chat").encode_prompt(RECORD)
    assert sum("no chat template" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xrec_pl.data.prompts"):
        assert PromptBuilder(tok, "chat", chat_template="chatml").encode_prompt(RECORD) == first
        custom = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
        text = tok.decode(PromptBuilder(tok, "chat", chat_template=custom).encode_prompt(RECORD)["input_ids"])
    assert not caplog.records and text.startswith("Explain why the user would buy the book within 50 words.|")
