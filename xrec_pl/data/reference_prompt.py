"""The reference's stage-2 prompt, string for string (prompt style ``xrec_exact``, the ``recipe: xrec`` presets).

HKUDS/XRec (``explainer/utils/data_handler.py`` and ``explainer/models/explainer.py``) builds one string per record
and tokenises it whole with the tokenizer's defaults (so Llama-2's tokenizer adds its own BOS in front of the literal
``<s>`` the string starts with: two BOS ids)::

    <s>[INST] <<SYS>>{system}<</SYS>>user record: <USER_EMBED> {noun} record: <ITEM_EMBED> {noun} name: {title}
    user profile: {user profile} {noun} profile: {item profile} <EXPLAIN_POS> {explanation}[/INST]

(one line; shown wrapped). Training puts the explanation *inside* the instruction, after the reserved token
``<EXPLAIN_POS>``; generation ends the same text at ``<EXPLAIN_POS>[/INST]`` (no space, no explanation) and the model
continues after ``[/INST]``. The loss covers every token from ``<EXPLAIN_POS>`` on (the marker itself, the
explanation and the closing ``[/INST]``); nothing is appended (no EOS). The fields are used as they are stored (not
stripped). The system sentence is the reference's, typo included ("buy with the book").

Here, unlike the reference, a record longer than ``max_length`` gets its profiles truncated (the reference had no
limit); with the default ``max_length`` no Amazon or Yelp record is cut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from xrec_pl.errors import DataError

__all__ = ["EXPLAIN_TOKEN", "REFERENCE_SYSTEM", "encode_reference", "reference_text"]

EXPLAIN_TOKEN = "<EXPLAIN_POS>"
REFERENCE_BOS = "<s>"
# the reference's sentences, per domain (Amazon: books; Yelp and Google: business), typo included
REFERENCE_SYSTEM = {
    "books": "Explain why the user would buy with the book within 50 words.",
    "business": "Explain why the user would enjoy the business within 50 words.",
}
_NOUN = {"books": "book", "business": "business"}


def reference_text(
    domain: str,
    title: Any,
    user_summary: Any = "",
    item_summary: Any = "",
    explanation: Any = None,
    profiles: bool = True,
) -> str:
    """The reference's text of one record: with ``explanation`` the training text, without it the prompt."""
    noun = _NOUN[domain]
    message = f"user record: <USER_EMBED> {noun} record: <ITEM_EMBED> {noun} name: {title}"
    if profiles:
        message += f" user profile: {user_summary} {noun} profile: {item_summary}"
    message += f" {EXPLAIN_TOKEN}"
    if explanation is not None:
        message += f" {explanation}"
    return f"{REFERENCE_BOS}[INST] <<SYS>>{REFERENCE_SYSTEM[domain]}<</SYS>>{message}[/INST]"


def encode_reference(
    tokenizer: Any,
    record: Mapping[str, Any],
    domain: str,
    profiles: bool,
    max_length: int,
    explain_id: int,
    trim: Callable[[list[int], list[int], int], tuple[list[int], list[int]]],
    train: bool,
) -> tuple[list[int], list[int] | None, int]:
    """Token ids (and, with ``train``, labels) of one record in the reference layout.

    Args:
        tokenizer: holds ``<USER_EMBED>``, ``<ITEM_EMBED>`` and ``<EXPLAIN_POS>`` as single tokens.
        record: ``title, user_summary, item_summary`` (and ``explanation`` for training).
        domain: ``"books"`` or ``"business"``.
        profiles: include the two profiles.
        max_length: longest allowed sequence; profiles are trimmed (longest first) to fit.
        explain_id: id of ``<EXPLAIN_POS>``.
        trim: ``(a, b, excess) -> (a', b')`` removing ``excess`` tokens from the longer list first.
        train: training text (explanation inside the instruction, labels) or generation prompt.

    Returns:
        ``(input_ids, labels or None, number of trimming rounds)``; labels are ``-100`` before ``<EXPLAIN_POS>``.

    Raises:
        DataError: empty explanation (training), or too long even with both profiles trimmed away.
    """
    explanation = record.get("explanation") if train else None
    if train and not str(explanation or "").strip():
        raise DataError(f"record (uid={record['uid']}, iid={record['iid']}): empty explanation")
    user, item = record.get("user_summary", ""), record.get("item_summary", "")

    def ids_of(u: Any, i: Any) -> list[int]:
        text = reference_text(domain, record["title"], u, i, explanation, profiles)
        return list(tokenizer(text)["input_ids"])  # one string, the tokenizer's own special tokens

    ids, rounds = ids_of(user, item), 0
    if len(ids) > max_length and profiles:
        u_ids = list(tokenizer(str(user), add_special_tokens=False)["input_ids"])
        i_ids = list(tokenizer(str(item), add_special_tokens=False)["input_ids"])
        slack = 0
        while len(ids) > max_length and rounds < 4:
            u_ids, i_ids = trim(u_ids, i_ids, len(ids) - max_length + slack)
            ids = ids_of(tokenizer.decode(u_ids).strip(), tokenizer.decode(i_ids).strip())
            rounds, slack = rounds + 1, slack + 2
    if len(ids) > max_length:
        raise DataError(
            f"record (uid={record['uid']}, iid={record['iid']}): {len(ids)} tokens exceed max_length={max_length}; "
            "raise max_length"
        )
    if not train:
        return ids, None, rounds
    where = [k for k, t in enumerate(ids) if t == explain_id]
    if len(where) != 1:
        raise DataError(
            f"record (uid={record['uid']}, iid={record['iid']}): expected one {EXPLAIN_TOKEN}, found {len(where)}"
        )
    labels = [-100] * where[0] + ids[where[0] :]
    return ids, labels, rounds
