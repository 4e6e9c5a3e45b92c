"""BARTScore with a local BART checkpoint: the average log-likelihood of one text given the other.

For a source ``x`` and target ``y = (y_1..y_m)`` (tokenised with the checkpoint's tokenizer, special tokens
included), ``BARTScore(x -> y) = 1/m * sum_t log p(y_t | y_<t, x)`` under the seq2seq model (teacher forcing).
With a reference: precision = ``ref -> pred``, recall = ``pred -> ref``, F = their arithmetic mean (the
formulation of Yuan et al., 2021). Scores are <= 0; higher is better. The usual checkpoint is
``facebook/bart-large-cnn`` (a local copy; nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xrec_pl.metrics.base import PerSampleMetric, mean_std, require_path


class BartScorer:
    """``score(srcs, tgts) -> Tensor (N,)``: mean token log-likelihood of each target given its source."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        device: str | None = None,
        model: Any | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        if model is None or tokenizer is None:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            folder = require_path(checkpoint, "BARTScore")
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModelForSeq2SeqLM.from_pretrained(str(folder), local_files_only=True)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = min(max_length, int(getattr(model.config, "max_position_embeddings", max_length)))

    @torch.no_grad()
    def score(self, srcs: list[str], tgts: list[str]) -> Tensor:
        out = []
        for start in range(0, len(srcs), self.batch_size):
            kw = {"max_length": self.max_length, "truncation": True, "padding": True, "return_tensors": "pt"}
            src = self.tokenizer(srcs[start : start + self.batch_size], **kw).to(self.device)
            tgt = self.tokenizer(tgts[start : start + self.batch_size], **kw).to(self.device)
            labels, mask = tgt["input_ids"], tgt["attention_mask"]  # (b, m)
            logits = self.model(
                input_ids=src["input_ids"],
                attention_mask=src["attention_mask"],
                labels=labels.masked_fill(mask == 0, -100),  # the model shifts labels into decoder inputs
            ).logits  # (b, m, V)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (b, m)
            mask = mask.float()
            out.append(((logp * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)).cpu())  # (b,)
        return torch.cat(out) if out else torch.empty(0)


class BARTScore(PerSampleMetric):
    """BARTScore per pair; ``compute()`` gives ``bartscore`` (F), ``bartscore_precision``, ``bartscore_recall``
    (each with ``_std``).

    Args:
        checkpoint: local BART checkpoint folder (model + tokenizer). Missing -> ``DataError`` naming the path.
        batch_size: pairs per forward pass.
        max_length: truncation length in tokens.
        device: torch device; ``None`` = cuda if available else cpu.
        scorer: injected backend with ``score(srcs, tgts) -> Tensor (N,)``; otherwise built on first update.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    score_names = ("precision", "recall")
    sample_keys = {"precision": "bartscore_precision", "recall": "bartscore_recall"}

    def __init__(
        self,
        checkpoint: str | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        device: str | None = None,
        scorer: Any | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if scorer is None:
            require_path(checkpoint, "BARTScore")
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.max_length = max_length
        self.scorer_device = device
        self._scorer = scorer
        self._injected = scorer is not None

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            self._scorer = BartScorer(
                self.checkpoint, batch_size=self.batch_size, max_length=self.max_length, device=self.scorer_device
            )
        return self._scorer

    def _score(self, preds: list[str], target: list[str]) -> dict[str, Tensor]:
        return {"precision": self.scorer.score(target, preds), "recall": self.scorer.score(preds, target)}

    def _summarise(self, states: dict[str, Tensor]) -> dict[str, float]:
        f = (states["precision"] + states["recall"]) / 2
        out: dict[str, float] = {}
        out["bartscore"], out["bartscore_std"] = mean_std(f)
        for name in self.score_names:
            out[f"bartscore_{name}"], out[f"bartscore_{name}_std"] = mean_std(states[name])
        return out

    def sample_scores(self) -> dict[str, Tensor]:
        out = super().sample_scores()
        out["bartscore"] = (out["bartscore_precision"] + out["bartscore_recall"]) / 2
        return out

    def describe(self) -> dict[str, Any]:
        if self._injected:
            return {"backend": type(self._scorer).__name__, "injected": True}
        return {"checkpoint": str(Path(self.checkpoint).expanduser().resolve()), "max_length": self.max_length}
