"""Prompt building for stage 2: text layout, label masking and reserved-token positions.

Three styles:

``chat`` (default)
    The tokenizer's own chat template renders ``system`` + ``user`` turns with the generation prompt; the target is
    the explanation followed by EOS (the assistant turn). Labels are ``-100`` on the prompt, so the loss covers exactly
    the assistant tokens and EOS, and training sees the very prompt that generation continues from. A tokenizer
    without a chat template falls back to ChatML (``<|im_start|>role ... <|im_end|>``) spelled in plain text, with a
    warning (once); ``chat_template`` chooses the template instead (a Jinja string, or ``"chatml"``).

``xrec``
    Reproduces the reference (HKUDS/XRec ``explainer/utils/data_handler.py``) layout for comparison::

        {bos}[INST] <<SYS>>{system}<</SYS>>user record: <USER_EMBED> book record: <ITEM_EMBED> ... book profile: {p}
        {explanation}[/INST]

    (one line, no separators, exactly as the reference concatenates it; the reference's system sentence, typo
    included: "buy with the book"). In training the explanation sits *inside* the instruction, before ``[/INST]``,
    while generation starts *after* ``[/INST]`` from a prompt without it: the train/inference mismatch of the
    reference, kept on purpose. Labels cover the explanation and the closing ``[/INST]`` (the reference's loss ran from
    its ``<EXPLAIN_POS>`` marker to the end of the sequence). Differences from the reference, all deliberate: no
    third reserved token ``<EXPLAIN_POS>`` (the label boundary is known from the token offsets), no EOS (the reference
    had none either), padding never labelled (the reference's loss included pad tokens), ``bos`` only where the
    tokenizer itself adds one (the reference wrote a literal ``<s>`` *and* let the tokenizer add another).

``xrec_exact``
    The reference's string, token for token (``<EXPLAIN_POS>``, its literal ``<s>``, tokenised as one string, the
    loss from ``<EXPLAIN_POS>`` on): :mod:`xrec_pl.data.reference_prompt`. Used by the ``recipe: xrec`` presets.

Length policy: sequences longer than ``max_length`` (prompt + target for training, prompt for generation) are made to
fit by truncating the two *profiles* (the longer one first, at token granularity, then both evenly). The system
text, the reserved tokens, the title and the explanation are never cut. A record that still does not fit raises a
``DataError`` naming ``(uid, iid)``. ``PromptBuilder.num_truncated`` counts truncated records.

Pieces are tokenised separately and concatenated (prompt ids + target ids), so training sees exactly the prompt ids
that generation is given; joint tokenisation could merge tokens across the prompt/target boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from xrec_pl.data.reference_prompt import EXPLAIN_TOKEN, encode_reference
from xrec_pl.errors import DataError
from xrec_pl.models.lm_loss import IGNORE_INDEX
from xrec_pl.utils import check_choice

log = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "PromptStyle", "Domain", "PromptBuilder"]

PromptStyle = Literal["chat", "xrec", "xrec_exact"]
Domain = Literal["books", "business"]
USER_TOKEN = "<USER_EMBED>"
ITEM_TOKEN = "<ITEM_EMBED>"

# system prompt and the noun used in the user turn, per domain
_CHAT_SYSTEM = {
    "books": "Explain why the user would buy the book within 50 words.",
    "business": "Explain why the user would enjoy the business within 50 words.",
}
# the reference's exact sentences (``xrec`` style)
_XREC_SYSTEM = {
    "books": "Explain why the user would buy with the book within 50 words.",
    "business": "Explain why the user would enjoy the business within 50 words.",
}
_NOUN = {"books": "book", "business": "business"}

# Used only when the tokenizer has no chat template (e.g. a bare test tokenizer).
_FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class PromptBuilder:
    """Turn a record into token ids, labels and the positions of ``<USER_EMBED>`` / ``<ITEM_EMBED>``.

    Args:
        tokenizer: a Hugging Face tokenizer that already holds the reserved tokens (``load_frozen_llm`` adds them)
            and has an EOS token.
        style: ``"chat"`` (the tokenizer's chat template; default) or ``"xrec"`` (the reference layout).
        domain: ``"books"`` (Amazon) or ``"business"`` (Yelp, Google): system sentence and item noun.
        profiles: include the user and item profiles; ``False`` keeps the title only (the "no profiles" ablation).
        max_length: longest allowed sequence in tokens; profiles are truncated to fit, see the module docstring.
        chat_template: ``chat`` style only: ``None`` (the tokenizer's own; ChatML with a warning where it has none),
            ``"chatml"``, or a Jinja template string.

    Raises:
        ValueError: unknown style/domain, a tokenizer without the reserved tokens or without EOS.
    """

    def __init__(
        self,
        tokenizer: Any,
        style: PromptStyle = "chat",
        domain: Domain = "books",
        profiles: bool = True,
        max_length: int = 1024,
        chat_template: str | None = None,
    ) -> None:
        check_choice("prompt style", style, PromptStyle)
        check_choice("domain", domain, Domain)
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {max_length}")
        self.tokenizer = tokenizer
        self.style = style
        self.domain = domain
        self.profiles = profiles
        self.max_length = int(max_length)
        self.num_truncated = 0
        self.num_escaped = 0  # records whose text held a control token (escaped, see escape_control_tokens)
        self._controls = control_tokens(tokenizer)
        self.user_token_id = self._single_token_id(USER_TOKEN)
        self.item_token_id = self._single_token_id(ITEM_TOKEN)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the chat target ends with EOS")
        self.eos_token_id = int(tokenizer.eos_token_id)
        self._chat_template = _choose_template(tokenizer, chat_template) if style == "chat" else None
        self.explain_token_id = self._single_token_id(EXPLAIN_TOKEN) if style == "xrec_exact" else None
        # xrec style: a BOS only where the tokenizer adds one by itself (Llama-2: "<s>")
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self._xrec_bos = tokenizer.bos_token if bos is not None and probe and probe[0] == bos else ""

    def _text(self, value: Any) -> str:
        text = str(value).strip()
        escaped = escape_control_tokens(text, self._controls)
        if escaped != text:
            self.num_escaped += 1
        return escaped

    def _single_token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            extra = " (with model.extra_tokens: [<EXPLAIN_POS>] for style xrec_exact)" if token == EXPLAIN_TOKEN else ""
            raise ValueError(
                f"tokenizer does not hold {token} as one token (got ids {ids}); load the LLM with "
                f"xrec_pl.models.llm.load_frozen_llm, which adds the reserved tokens{extra}"
            )
        return int(ids[0])

    # ---------------------------------------------------------------------------------------------------- text
    @property
    def system_prompt(self) -> str:
        """The system instruction of this style and domain."""
        return (_CHAT_SYSTEM if self.style == "chat" else _XREC_SYSTEM)[self.domain]  # xrec_exact: the same sentence

    def user_message(self, title: str, user_summary: str = "", item_summary: str = "") -> str:
        """The user turn: reserved tokens, title and (with ``profiles``) both profiles."""
        noun = _NOUN[self.domain]
        text = f"user record: {USER_TOKEN} {noun} record: {ITEM_TOKEN} {noun} name: {title}"
        if self.profiles:
            text += f" user profile: {user_summary} {noun} profile: {item_summary}"
        return text

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_parts(self, title: str, user_summary: str, item_summary: str) -> tuple[list[int], list[int]]:
        """(ids before the target, ids after the target) for this style; generation uses their concatenation."""
        message = self.user_message(title, user_summary, item_summary)
        if self.style == "chat":
            messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": message}]
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self._chat_template, tokenize=False, add_generation_prompt=True
            )
            return self._ids(text), []
        head = f"{self._xrec_bos}[INST] <<SYS>>{self.system_prompt}<</SYS>>{message}"
        return self._ids(head), self._ids("[/INST]")

    def _target_ids(self, explanation: str) -> list[int]:
        if self.style == "chat":
            return [*self._ids(explanation), self.eos_token_id]
        return self._ids(" " + explanation)

    # ---------------------------------------------------------------------------------------------------- encode
    def encode_train(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Encode a record for teacher-forced training.

        Args:
            record: mapping with ``uid, iid, title, user_summary, item_summary, explanation``.

        Returns:
            ``{"input_ids": list[int], "labels": list[int], "user_pos": int, "item_pos": int}``; ``labels`` is
            ``-100`` on the prompt and the token id on the target (chat: explanation + EOS; xrec: explanation +
            ``[/INST]``).

        Raises:
            DataError: empty explanation, reserved token count != 1, too long even with profiles truncated.
        """
        if self.style == "xrec_exact":
            ids, labels, rounds = self._exact(record, train=True)
            user_pos, item_pos = self._positions(ids, record)
            return {"input_ids": ids, "labels": labels, "user_pos": user_pos, "item_pos": item_pos}
        explanation = self._text(record["explanation"])
        if not explanation:
            raise DataError(f"record (uid={record['uid']}, iid={record['iid']}): empty explanation")
        target = self._target_ids(explanation)
        head, tail = self._fit(record, extra=len(target))
        input_ids = head + target + tail
        if self.style == "chat":
            labels = [IGNORE_INDEX] * len(head) + target
        else:  # reference: loss from the explanation to the end of the sequence
            labels = [IGNORE_INDEX] * len(head) + target + tail
        user_pos, item_pos = self._positions(head, record)
        return {"input_ids": input_ids, "labels": labels, "user_pos": user_pos, "item_pos": item_pos}

    def encode_prompt(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Encode the generation prompt of a record (no target; ``explanation`` is not needed).

        Returns:
            ``{"input_ids": list[int], "user_pos": int, "item_pos": int}``.

        Raises:
            DataError: reserved token count != 1, prompt too long even with profiles truncated.
        """
        if self.style == "xrec_exact":
            ids, _, _ = self._exact(record, train=False)
            user_pos, item_pos = self._positions(ids, record)
            return {"input_ids": ids, "user_pos": user_pos, "item_pos": item_pos}
        head, tail = self._fit(record, extra=0)
        user_pos, item_pos = self._positions(head, record)
        return {"input_ids": head + tail, "user_pos": user_pos, "item_pos": item_pos}

    def _exact(self, record: Mapping[str, Any], train: bool) -> tuple[list[int], list[int] | None, int]:
        # as the reference: fields as stored (not stripped); control tokens in them escaped, as for the other styles
        fields = {}
        for key in ("title", "user_summary", "item_summary", "explanation"):
            if key in record:
                text = str(record[key])
                fields[key] = escape_control_tokens(text, self._controls)
                self.num_escaped += fields[key] != text
        ids, labels, rounds = encode_reference(
            self.tokenizer,
            {**record, **fields},
            self.domain,
            self.profiles,
            self.max_length,
            int(self.explain_token_id),
            _trim_longest_first,
            train,
        )
        self.num_truncated += bool(rounds)
        return ids, labels, rounds

    def _positions(self, ids: list[int], record: Mapping[str, Any]) -> tuple[int, int]:
        found = []
        for name, tid in ((USER_TOKEN, self.user_token_id), (ITEM_TOKEN, self.item_token_id)):
            where = [i for i, t in enumerate(ids) if t == tid]
            if len(where) != 1:
                raise DataError(
                    f"record (uid={record['uid']}, iid={record['iid']}): expected exactly one {name} in the prompt, "
                    f"found {len(where)} (does a text field contain the literal token?)"
                )
            found.append(where[0])
        return found[0], found[1]

    def _fit(self, record: Mapping[str, Any], extra: int) -> tuple[list[int], list[int]]:
        """Prompt parts whose length plus ``extra`` fits ``max_length``, truncating profiles if needed."""
        title = self._text(record["title"])
        user_summary = self._text(record.get("user_summary", "")) if self.profiles else ""
        item_summary = self._text(record.get("item_summary", "")) if self.profiles else ""
        head, tail = self._prompt_parts(title, user_summary, item_summary)
        total = len(head) + len(tail) + extra
        if total <= self.max_length:
            return head, tail
        if self.profiles:
            u_ids, i_ids = self._ids(user_summary), self._ids(item_summary)
            slack = 0
            # decode -> re-encode may change a count by a token or two; a few rounds settle it
            for _ in range(4):
                u_ids, i_ids = _trim_longest_first(u_ids, i_ids, total - self.max_length + slack)
                user_summary = self.tokenizer.decode(u_ids).strip()
                item_summary = self.tokenizer.decode(i_ids).strip()
                head, tail = self._prompt_parts(title, user_summary, item_summary)
                total = len(head) + len(tail) + extra
                if total <= self.max_length:
                    self.num_truncated += 1
                    return head, tail
                slack += 2
        raise DataError(
            f"record (uid={record['uid']}, iid={record['iid']}): {total} tokens exceed max_length={self.max_length}"
            + (" even with both profiles truncated" if self.profiles else "")
            + f" ({extra} target tokens); raise max_length or shorten the title/explanation"
        )


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Every string the tokenizer reads as one special token (chat markers, BOS/EOS, the reserved tokens), longest
    first, plus the plain-text markers of the prompt layouts (``[INST]``, ``<<SYS>>`` and their closing forms)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found |= {getattr(tok, "content", str(tok)) for tok in added.values()}
    found |= {USER_TOKEN, ITEM_TOKEN, "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|im_start|>", "<|im_end|>"}
    return tuple(sorted((t for t in found if t and len(t) > 1), key=len, reverse=True))


def escape_control_tokens(text: str, controls: tuple[str, ...]) -> str:
    """Break every control-token string inside record text so it is tokenised as plain text, never as the token.

    A profile or explanation holding ``<|im_start|>``, ``</s>`` or ``<USER_EMBED>`` would otherwise open a new chat
    turn, end the sequence, or move the injection point. A space after the first character keeps the text
    readable (``< |im_start|>``) and no tokenizer merges it back into the special token.
    """
    for token in controls:
        if token in text:
            text = text.replace(token, f"{token[0]} {token[1:]}")
    return text


def _trim_longest_first(a: list[int], b: list[int], excess: int) -> tuple[list[int], list[int]]:
    """Remove ``excess`` tokens in total from the ends of ``a`` and ``b``, always cutting the longer one."""
    keep = max(0, len(a) + len(b) - excess)
    # largest cap c with min(len(a), c) + min(len(b), c) <= keep
    lo, hi = 0, max(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if min(len(a), mid) + min(len(b), mid) <= keep:
            lo = mid
        else:
            hi = mid - 1
    return a[:lo], b[:lo]


_warned_no_template: set[str] = set()


def _choose_template(tokenizer: Any, chat_template: str | None) -> str:
    """The chat template to render with: the configured one, the tokenizer's, or ChatML with a warning (once)."""
    if chat_template == "chatml":
        return _FALLBACK_CHAT_TEMPLATE
    if chat_template:
        return chat_template
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if name not in _warned_no_template:
        _warned_no_template.add(name)
        log.warning(
            "tokenizer %s has no chat template; rendering the chat prompt as ChatML (<|im_start|>role ...). "
            "Set data.chat_template (a Jinja string, or 'chatml' to silence this) to choose one.",
            name,
        )
    return _FALLBACK_CHAT_TEMPLATE
