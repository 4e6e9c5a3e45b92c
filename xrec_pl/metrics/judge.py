"""LLM-as-judge similarity (GPTScore in XRec): a local causal LM rates each prediction against its reference 0-100.

The judge is asked for one number; we decode greedily for a few tokens and parse the first number in the answer.
Answers without a usable number are *unparsable*: they are left out of the mean, counted, and reported as
``judge_unparsable`` -- never an exception. Judges disagree by tens of points on the same outputs, so compare
systems only under one judge (``describe()`` names it).

The embedded default (SmolLM2-135M-Instruct) only makes the plumbing work offline: with the answer primed by
``"Score:"`` it replies with parsable numbers, but it rated unrelated text as high as the real predictions in our
check (100 / 9.5 for both). Use a larger local judge (``judge_model=<path>``) for figures worth reporting.

Prompt styles (``prompt_style``; ``xrec-pl evaluate --judge_prompt``):

- ``"default"``: the instructions below, the answer primed with ``"Score:"``.
- ``"xrec"``: XRec's GPTScore request (``evaluation/metrics.py`` and ``system_prompt.txt`` of HKUDS/XRec): its system
  prompt verbatim, and as the user message the JSON object ``{"prediction": ..., "reference": ...}``
  (``json.dumps``), no answer prefix. The reference converted the reply with ``float()`` and failed on anything
  else; here such answers are counted as unparsable, as for the default prompt.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from xrec_pl.metrics.base import PerSampleMetric, mean_std
from xrec_pl.models.decoding import padded_attention_kernels

JUDGE_SYSTEM = "You are a careful judge of recommendation explanations. You answer with one integer from 0 to 100."
JUDGE_TEMPLATE = (
    "Reference explanation: {reference}\n\n"
    "Candidate explanation: {prediction}\n\n"
    "On a scale from 0 (nothing in common) to 100 (the same meaning), how similar is the candidate explanation "
    "to the reference explanation, in what it says and in the reasons it gives? Answer with the number only."
)
# Opening of the judge's answer: small instruction-tuned models otherwise start a sentence ("The candidate ...")
# and never reach a number within a few tokens.
ANSWER_PREFIX = "Score:"
PROMPT_VERSION = "xrec-pl-judge-v2"
# XRec's evaluation/system_prompt.txt, verbatim (what the "xrec" prompt style reproduces)
XREC_JUDGE_SYSTEM = (
    "Score the given explanation against the ground truth on a scale from 0 to 100, focusing on the alignment of "
    "meanings rather than the formatting.\nProvide your score as a number and do not provide any other text."
)
PROMPT_STYLES = ("default", "xrec")

_FRACTION = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*(10|100)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def parse_judge_score(text: str) -> float | None:
    """The 0-100 score in a judge's answer, or ``None`` if there is none.

    Accepts "85", " 85.", "Score: 85/100", "85%", "8/10" (scaled to 80), "**90**"; takes the first number;
    a number outside [0, 100] (or a negative one) is unparsable.
    """
    if not isinstance(text, str):
        return None
    fraction = _FRACTION.search(text)
    if fraction:
        value, scale = float(fraction.group(1)), float(fraction.group(2))
        if 0 <= value <= scale:
            return value * 100.0 / scale
        return None
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group(0))
    return value if 0.0 <= value <= 100.0 else None


def judge_messages(prediction: str, reference: str, style: str = "default") -> list[dict[str, str]]:
    """System and user messages of the judge request in ``style`` (``"default"`` or ``"xrec"``)."""
    if style == "xrec":
        user = json.dumps({"prediction": prediction, "reference": reference})
        return [{"role": "system", "content": XREC_JUDGE_SYSTEM}, {"role": "user", "content": user}]
    if style != "default":
        raise ValueError(f"judge prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    user = JUDGE_TEMPLATE.format(reference=reference.strip(), prediction=prediction.strip())
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def build_judge_prompt(
    prediction: str,
    reference: str,
    tokenizer: Any | None = None,
    answer_prefix: str = ANSWER_PREFIX,
    style: str = "default",
) -> str:
    """The judge prompt, in the tokenizer's chat template when it has one, ending with ``answer_prefix``."""
    messages = judge_messages(prediction, reference, style)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix
    return f"{messages[0]['content']}\n\n{messages[1]['content']}\n{answer_prefix}"


class HFJudge:
    """Greedy short generation with a (causal LM, tokenizer) pair: ``__call__(preds, refs) -> list[str]`` answers."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int = 6,
        batch_size: int = 8,
        answer_prefix: str = ANSWER_PREFIX,
        style: str = "default",
    ) -> None:
        self.model = model
        self.style = style
        self.answer_prefix = answer_prefix
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @torch.no_grad()
    def __call__(self, preds: list[str], refs: list[str]) -> list[str]:
        tok = self.tokenizer
        chat = bool(getattr(tok, "chat_template", None))
        answers: list[str] = []
        old_side = tok.padding_side
        tok.padding_side = "left"  # generation continues from the right edge
        try:
            device = next(self.model.parameters()).device
            for start in range(0, len(preds), self.batch_size):
                prompts = [
                    build_judge_prompt(p, r, tok, self.answer_prefix, self.style)
                    for p, r in zip(preds[start : start + self.batch_size], refs[start : start + self.batch_size])
                ]
                enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
                with padded_attention_kernels(device):  # no per-shape cuDNN plans on a GPU
                    out = self.model.generate(
                        **enc,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        pad_token_id=tok.pad_token_id,
                    )  # (b, S + new)
                new = out[:, enc["input_ids"].shape[1] :]
                answers.extend(tok.batch_decode(new, skip_special_tokens=True))
        finally:
            tok.padding_side = old_side
        return answers


class LLMJudge(PerSampleMetric):
    """0-100 similarity from a local judge LM; ``compute()`` gives ``llm_judge``, ``llm_judge_std``,
    ``judge_unparsable`` (count) and ``judge_n``.

    Args:
        judge: backend ``(preds, refs) -> list[str]`` raw answers (tests inject a scripted one). If None, an
            :class:`HFJudge` is built on first use from ``model``/``tokenizer`` or, without them, from
            ``xrec_pl.models.llm.load_frozen_llm(judge_model)``.
        model: a causal LM to judge with (with ``tokenizer``).
        tokenizer: its tokenizer.
        judge_model: name or path for ``load_frozen_llm``; default the embedded SmolLM2-135M-Instruct.
        max_new_tokens: generation budget for the answer.
        batch_size: prompts per ``generate`` call.
        answer_prefix: text the judge's answer starts with (primes a number; ``""`` for none; ``None``: ``"Score:"``
            for the default prompt, nothing for ``"xrec"``).
        prompt_style: ``"default"`` or ``"xrec"`` (XRec's system prompt and JSON message, see the module docstring).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    score_names = ("score",)
    sample_keys = {"score": "llm_judge"}

    def __init__(
        self,
        judge: Callable[[list[str], list[str]], list[str]] | None = None,
        model: Any | None = None,
        tokenizer: Any | None = None,
        judge_model: str = "embedded",
        max_new_tokens: int = 6,
        batch_size: int = 8,
        answer_prefix: str | None = None,
        prompt_style: str = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"judge prompt style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        self.prompt_style = prompt_style
        if answer_prefix is None:
            answer_prefix = "" if prompt_style == "xrec" else ANSWER_PREFIX
        self.answer_prefix = answer_prefix
        if (model is None) != (tokenizer is None):
            raise ValueError("LLMJudge: pass both model and tokenizer, or neither")
        self.judge_model = judge_model if model is None else type(model).__name__
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        # Kept in a tuple so an injected nn.Module is not registered as a submodule of the metric.
        self._pair = (model, tokenizer) if model is not None else None
        self._judge = judge
        self._injected = judge is not None

    @property
    def judge(self) -> Callable[[list[str], list[str]], list[str]]:
        if self._judge is None:
            if self._pair is None:
                from xrec_pl.models.llm import load_frozen_llm

                self._pair = load_frozen_llm(self.judge_model)
            model, tokenizer = self._pair
            self._judge = HFJudge(
                model, tokenizer, self.max_new_tokens, self.batch_size, self.answer_prefix, self.prompt_style
            )
        return self._judge

    def _score(self, preds: list[str], target: list[str]) -> dict[str, Tensor]:
        answers = list(self.judge(preds, target))
        if len(answers) != len(preds):
            raise RuntimeError(f"LLMJudge: judge returned {len(answers)} answers for {len(preds)} pairs")
        parsed = [parse_judge_score(a) for a in answers]
        return {"score": torch.tensor([math.nan if v is None else v for v in parsed], dtype=torch.float64)}

    def _summarise(self, states: dict[str, Tensor]) -> dict[str, float]:
        scores = states["score"]
        mean, std = mean_std(scores)
        unparsable = int(torch.isnan(scores).sum())
        return {
            "llm_judge": mean,
            "llm_judge_std": std,
            "judge_unparsable": float(unparsable),
            "judge_n": float(scores.numel()),
        }

    def describe(self) -> dict[str, Any]:
        prompt = PROMPT_VERSION if self.prompt_style == "default" else "xrec-gptscore"
        if self._injected:
            return {"backend": type(self._judge).__name__, "injected": True, "prompt": prompt}
        return {
            "judge": self.judge_model,
            "prompt": prompt,
            "decoding": f"greedy, {self.max_new_tokens} new tokens",
        }
