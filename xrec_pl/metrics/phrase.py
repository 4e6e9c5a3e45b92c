"""Phrase recall: does the prediction name the phrase its reference names? (graph-only content on synthetic data)

On the synthetic dataset (``xrec-pl make-synthetic``) the last sentence of every reference names the user's hidden
community, which no title or profile mentions: only the interaction graph reveals it. BERTScore barely moves when
three words of forty change, so this metric asks the question directly. For each pair it finds the phrase of
``phrases`` the reference contains; the sample scores 1 when the prediction contains the same phrase, else 0.
Pairs whose reference contains none of the phrases score NaN and are left out of the mean (``community_n`` counts
the scored pairs). ``community_named`` is the share of scored predictions that name *any* of the phrases, which
separates "learned the sentence, guessed the wrong community" from "never writes the sentence".

Matching is case-insensitive on whitespace-normalised text. With ``k`` equally frequent phrases a model that always
writes the sentence but cannot tell the communities apart scores about ``1 / k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from xrec_pl.metrics.base import PerSampleMetric, mean_std


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def find_phrases(text: str, phrases: Sequence[str]) -> set[int]:
    """Indices of the ``phrases`` that occur in ``text`` (case-insensitive, whitespace-normalised)."""
    text = _norm(text)
    return {i for i, p in enumerate(phrases) if _norm(p) in text}


class PhraseRecall(PerSampleMetric):
    """Share of predictions that name the same phrase (e.g. community) as their reference.

    Args:
        phrases: the candidate phrases; default: every community name of the synthetic generator.
        **kwargs: passed to ``torchmetrics.Metric``.

    Returns ``{"community", "community_std", "community_named", "community_n"}``.
    """

    score_names = ("hit", "named")
    sample_keys = {"hit": "community"}

    def __init__(self, phrases: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if phrases is None:
            from xrec_pl.data.synthetic import COMMUNITIES

            phrases = COMMUNITIES
        if isinstance(phrases, str) or not phrases:
            raise ValueError("phrases must be a non-empty list of strings")
        self.phrases = [_norm(p) for p in phrases]
        if any(not p for p in self.phrases):
            raise ValueError("phrases must not be empty strings")

    def _score(self, preds: list[str], target: list[str]) -> dict[str, Tensor]:
        hit, named = [], []
        for pred, ref in zip(preds, target):
            wanted = find_phrases(ref, self.phrases)
            if not wanted:
                hit.append(math.nan)
                named.append(math.nan)
                continue
            found = find_phrases(pred, self.phrases)
            hit.append(1.0 if wanted & found else 0.0)
            named.append(1.0 if found else 0.0)
        return {"hit": torch.tensor(hit, dtype=torch.float64), "named": torch.tensor(named, dtype=torch.float64)}

    def _summarise(self, states: dict[str, Tensor]) -> dict[str, float]:
        mean, std = mean_std(states["hit"])
        named, _ = mean_std(states["named"])
        n = int(torch.isfinite(states["hit"]).sum())
        return {"community": mean, "community_std": std, "community_named": named, "community_n": float(n)}

    def describe(self) -> dict[str, Any]:
        return {"phrases": len(self.phrases), "matching": "case-insensitive substring, whitespace-normalised"}
