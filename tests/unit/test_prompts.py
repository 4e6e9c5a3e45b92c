"""PromptBuilder: label masks, reserved-token positions, chat and xrec layouts, profiles, length policy."""

from __future__ import annotations

import pytest

from xrec_pl.data.prompts import IGNORE_INDEX, PromptBuilder
from xrec_pl.errors import DataError

RECORD = {
    "uid": 3,
    "iid": 7,
    "title": "The Quiet Harbour",
    "user_summary": "The user enjoys mystery novels and historical fiction with strong characters.",
    "item_summary": "This book is a gripping story about a detective in a quiet village by the sea.",
    "explanation": "The user would buy the book because it matches their interest in mystery.",
}


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_labels_cover_exactly_the_assistant_turn_and_eos(tiny_tokenizer):
    pb = PromptBuilder(tiny_tokenizer, style="chat")
    enc = pb.encode_train(RECORD)
    prompt = pb.encode_prompt(RECORD)["input_ids"]
    n = len(prompt)
    assert enc["input_ids"][:n] == prompt  # training sees the very generation prompt
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    target = _ids(tiny_tokenizer, RECORD["explanation"]) + [tiny_tokenizer.eos_token_id]
    assert enc["input_ids"][n:] == target
    assert enc["labels"][n:] == target
    assert len(enc["labels"]) == len(enc["input_ids"])
    text = tiny_tokenizer.decode(prompt)
    assert text.endswith("<|im_start|>assistant\n")
    assert "Explain why the user would buy the book within 50 words." in text
    assert (
        "user record: <USER_EMBED> book record: <ITEM_EMBED> book name: The Quiet Harbour user profile: "
        f"{RECORD['user_summary']} book profile: {RECORD['item_summary']}" in text
    )


def test_reserved_positions_point_at_the_reserved_tokens(tiny_tokenizer):
    user_id, item_id = tiny_tokenizer.convert_tokens_to_ids(["<USER_EMBED>", "<ITEM_EMBED>"])
    for style in ("chat", "xrec"):
        pb = PromptBuilder(tiny_tokenizer, style=style)
        for enc in (pb.encode_train(RECORD), pb.encode_prompt(RECORD)):
            assert enc["input_ids"][enc["user_pos"]] == user_id
            assert enc["input_ids"][enc["item_pos"]] == item_id
            assert enc["input_ids"].count(user_id) == 1 and enc["input_ids"].count(item_id) == 1


def test_xrec_style_reproduces_reference_layout(tiny_tokenizer):
    pb = PromptBuilder(tiny_tokenizer, style="xrec")
    enc = pb.encode_train(RECORD)
    text = tiny_tokenizer.decode(enc["input_ids"])
    expected = (
        "[INST] <<SYS>>Explain why the user would buy with the book within 50 words.<</SYS>>"
        "user record: <USER_EMBED> book record: <ITEM_EMBED> book name: The Quiet Harbour "
        f"user profile: {RECORD['user_summary']} book profile: {RECORD['item_summary']} "
        f"{RECORD['explanation']}[/INST]"
    )
    assert text == expected  # explanation inside the instruction (the reference's training layout)
    labelled = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(labelled) == f" {RECORD['explanation']}[/INST]"
    first = enc["labels"].index(next(lab for lab in enc["labels"] if lab != IGNORE_INDEX))
    assert all(lab != IGNORE_INDEX for lab in enc["labels"][first:])  # contiguous to the end
    prompt = tiny_tokenizer.decode(pb.encode_prompt(RECORD)["input_ids"])
    assert prompt.endswith(f"book profile: {RECORD['item_summary']}[/INST]")
    assert RECORD["explanation"] not in prompt


def test_profiles_false_keeps_title_only(tiny_tokenizer):
    for style in ("chat", "xrec"):
        text = tiny_tokenizer.decode(
            PromptBuilder(tiny_tokenizer, style, profiles=False).encode_prompt(RECORD)["input_ids"]
        )
        assert "book name: The Quiet Harbour" in text
        assert "profile" not in text
        assert RECORD["user_summary"] not in text and RECORD["item_summary"] not in text


def test_business_domain_wording(tiny_tokenizer):
    text = tiny_tokenizer.decode(PromptBuilder(tiny_tokenizer, domain="business").encode_prompt(RECORD)["input_ids"])
    assert "Explain why the user would enjoy the business within 50 words." in text
    assert "business record: <ITEM_EMBED> business name:" in text and "business profile:" in text


def test_errors_name_the_record(tiny_tokenizer):
    pb = PromptBuilder(tiny_tokenizer)
    with pytest.raises(DataError, match=r"uid=3, iid=7.*empty explanation"):
        pb.encode_train({**RECORD, "explanation": "  "})
    # a reserved token inside the text is escaped (tested below), so the prompt still holds exactly one of each
    assert (
        pb.encode_prompt({**RECORD, "title": "a <USER_EMBED> title"})["user_pos"]
        == pb.encode_prompt(RECORD)["user_pos"]
    )


def test_long_profiles_are_truncated_never_the_reserved_tokens(tiny_tokenizer):
    long = {**RECORD, "user_summary": RECORD["user_summary"] * 20, "item_summary": RECORD["item_summary"] * 5}
    full = len(PromptBuilder(tiny_tokenizer, max_length=100_000).encode_train(long)["input_ids"])
    pb = PromptBuilder(tiny_tokenizer, max_length=full - 150)
    enc = pb.encode_train(long)
    assert len(enc["input_ids"]) <= full - 150
    assert pb.num_truncated == 1
    text = tiny_tokenizer.decode(enc["input_ids"])
    assert "<USER_EMBED>" in text and "<ITEM_EMBED>" in text and RECORD["explanation"] in text
    # the longer (user) profile was cut first: the item profile survives whole
    assert RECORD["item_summary"] * 5 in text
    no_profiles = len(PromptBuilder(tiny_tokenizer, profiles=False).encode_train(long)["input_ids"])
    with pytest.raises(DataError, match=r"uid=3, iid=7.*exceed max_length"):
        PromptBuilder(tiny_tokenizer, max_length=no_profiles - 5).encode_train(long)


def test_tokenizer_checks(tiny_tokenizer):
    from xrec_pl.models.tiny import build_tiny_tokenizer

    with pytest.raises(ValueError, match="<USER_EMBED>"):
        PromptBuilder(build_tiny_tokenizer())  # no reserved tokens added
    with pytest.raises(ValueError, match="style"):
        PromptBuilder(tiny_tokenizer, style="llama")


def test_fallback_chat_template_without_one(fresh_tiny_tokenizer):
    fresh_tiny_tokenizer.chat_template = None
    enc = PromptBuilder(fresh_tiny_tokenizer).encode_prompt(RECORD)
    assert fresh_tiny_tokenizer.decode(enc["input_ids"]).startswith("<|im_start|>system\nExplain why")


@pytest.mark.parametrize("field", ["title", "user_summary", "item_summary", "explanation"])
@pytest.mark.parametrize("token", ["<|im_start|>", "</s>", "<USER_EMBED>", "<ITEM_EMBED>", "[/INST]", "<|endoftext|>"])
def test_control_tokens_in_record_text_are_plain_text(tiny_tokenizer, field, token):
    """A control token inside a text field never reaches the model as that token (escaped, counted)."""
    from xrec_pl.data.prompts import PromptBuilder

    record = {**RECORD, field: f"{RECORD[field]} {token} more"}
    for style in ("chat", "xrec"):
        builder = PromptBuilder(tiny_tokenizer, style=style)
        clean = builder.encode_train(RECORD)
        out = builder.encode_train(record)
        specials = {tiny_tokenizer.convert_tokens_to_ids(t) for t in builder._controls} - {tiny_tokenizer.unk_token_id}
        assert _count(out["input_ids"], specials) == _count(clean["input_ids"], specials), (style, token)
        assert (out["user_pos"], out["item_pos"]) == (clean["user_pos"], clean["item_pos"])
        assert builder.num_escaped == (1 if token in builder._controls else 0)


def _count(ids: list[int], specials: set[int]) -> int:
    return sum(i in specials for i in ids)
