"""BLEURT (mean, std) through the ``bleurt-pytorch`` model code and a local checkpoint folder.

``bleurt-pytorch`` 0.0.1 was written for transformers 4.x. Under transformers 5 it fails in three places, all
fixed here without editing the installed package:

1. import: ``transformers.pytorch_utils.find_pruneable_heads_and_indices`` and the module
   ``transformers.models.bert.tokenization_bert_fast`` are gone. Both are provided only for the duration of the
   import (a small re-implementation / an alias of the unified ``BertTokenizer``) and removed afterwards.
2. forward: ``PreTrainedModel.get_extended_attention_mask`` and ``get_head_mask`` are gone; ``BleurtModel``
   gets equivalents.
3. tokenizer: its ``BleurtTokenizerFast`` passes ``vocab_file=`` to a v5 ``BertTokenizer`` that now expects
   ``vocab=`` and would silently map every word to ``[UNK]``. We load the checkpoint's tokenizer with
   transformers' own ``BertTokenizer`` (``vocab.txt``) or ``DebertaV2Tokenizer`` (``spm.model``, BLEURT-20).

Checkpoints (``lucadiliello/BLEURT-20-D12``, ``bleurt-base-128``, ...) cannot be downloaded here: pass a folder.
Scores follow BLEURT's convention: the model reads ``[CLS] reference [SEP] candidate [SEP]``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xrec_pl.metrics.base import PerSampleMetric, mean_std, require_path


def _find_pruneable_heads_and_indices(heads, n_heads: int, head_size: int, already_pruned_heads):
    """transformers 4.x helper (removed in 5): heads still to prune and the flat indices to keep."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    index = torch.arange(len(mask))[mask].long()
    return heads, index


def _get_extended_attention_mask(self, attention_mask: Tensor, input_shape=None, dtype=None) -> Tensor:
    """(B, S) or (B, S, S) 0/1 mask -> additive mask broadcastable to (B, heads, S, S)."""
    dtype = dtype or self.dtype
    if attention_mask.dim() == 3:
        extended = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        extended = attention_mask[:, None, None, :]  # (B, 1, 1, S)
    else:
        raise ValueError(f"wrong shape for attention_mask: {tuple(attention_mask.shape)}")
    extended = extended.to(dtype=dtype)
    return (1.0 - extended) * torch.finfo(dtype).min


def _get_head_mask(self, head_mask: Tensor | None, num_hidden_layers: int, is_attention_chunked: bool = False):
    """transformers 4.x semantics: None -> one None per layer; else broadcast to (layers, B, heads, S, S)."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    return head_mask.to(dtype=self.dtype)


def import_bleurt() -> types.SimpleNamespace:
    """Import bleurt-pytorch under transformers 5 (see the module docstring); returns its model classes."""
    import transformers
    import transformers.pytorch_utils as pytorch_utils

    shim_name = "transformers.models.bert.tokenization_bert_fast"
    added_shim = added_fn = False
    if shim_name not in sys.modules:
        try:
            __import__(shim_name)
        except ImportError:
            shim = types.ModuleType(shim_name)
            shim.BertTokenizerFast = transformers.BertTokenizer
            sys.modules[shim_name] = shim
            added_shim = True
    if not hasattr(pytorch_utils, "find_pruneable_heads_and_indices"):
        pytorch_utils.find_pruneable_heads_and_indices = _find_pruneable_heads_and_indices
        added_fn = True
    try:
        from bleurt_pytorch.bleurt.configuration_bleurt import BleurtConfig
        from bleurt_pytorch.bleurt.modeling_bleurt import BleurtForSequenceClassification, BleurtModel
    except ImportError as err:
        raise ImportError("BLEURT needs the model code: pip install --no-deps bleurt-pytorch") from err
    finally:
        if added_shim:
            del sys.modules[shim_name]
        if added_fn:
            del pytorch_utils.find_pruneable_heads_and_indices
    if not hasattr(BleurtModel, "get_extended_attention_mask"):
        BleurtModel.get_extended_attention_mask = _get_extended_attention_mask
    if not hasattr(BleurtModel, "get_head_mask"):
        BleurtModel.get_head_mask = _get_head_mask
    return types.SimpleNamespace(
        BleurtConfig=BleurtConfig, BleurtForSequenceClassification=BleurtForSequenceClassification
    )


def load_bleurt_tokenizer(folder: Path):
    """The checkpoint's tokenizer: WordPiece (``vocab.txt`` / ``tokenizer.json``) or SentencePiece (``spm.model``)."""
    from transformers import BertTokenizer, DebertaV2Tokenizer

    if (folder / "spm.model").exists():
        return DebertaV2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    if (folder / "vocab.txt").exists() or (folder / "tokenizer.json").exists():
        return BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    from xrec_pl.errors import DataError

    raise DataError(f"{folder}: BLEURT checkpoint has no tokenizer files (vocab.txt, tokenizer.json or spm.model)")


class BleurtScorer:
    """Scores (candidate, reference) pairs with a BLEURT checkpoint folder; ``score(cands, refs) -> Tensor (N,)``."""

    def __init__(self, checkpoint: str | Path, batch_size: int = 32, device: str | None = None) -> None:
        folder = require_path(checkpoint, "BLEURT")
        classes = import_bleurt()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_bleurt_tokenizer(folder)
        self.model = classes.BleurtForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
        self.model.to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_length = min(int(self.tokenizer.model_max_length), int(limit))
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, cands: list[str], refs: list[str]) -> Tensor:
        out = []
        for start in range(0, len(cands), self.batch_size):
            enc = self.tokenizer(
                refs[start : start + self.batch_size],
                cands[start : start + self.batch_size],
                padding="longest",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            out.append(self.model(**enc).logits.flatten().float().cpu())  # (b,)
        return torch.cat(out) if out else torch.empty(0)


class BLEURT(PerSampleMetric):
    """BLEURT per pair; ``compute()`` gives ``bleurt`` and ``bleurt_std``.

    Args:
        checkpoint: local folder of a PyTorch BLEURT checkpoint (config.json, weights, tokenizer files).
            Missing -> ``DataError`` naming the path. Say which checkpoint every figure comes from.
        batch_size: pairs per forward pass.
        device: torch device; ``None`` = cuda if available else cpu.
        scorer: injected backend with ``score(cands, refs) -> Tensor (N,)``; otherwise built on first update.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    score_names = ("score",)
    sample_keys = {"score": "bleurt"}

    def __init__(
        self,
        checkpoint: str | None = None,
        batch_size: int = 32,
        device: str | None = None,
        scorer: Any | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if scorer is None:
            require_path(checkpoint, "BLEURT")  # fail at construction, not after an epoch of generation
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.scorer_device = device
        self._scorer = scorer
        self._injected = scorer is not None

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            self._scorer = BleurtScorer(self.checkpoint, batch_size=self.batch_size, device=self.scorer_device)
        return self._scorer

    def _score(self, preds: list[str], target: list[str]) -> dict[str, Tensor]:
        return {"score": self.scorer.score(preds, target)}

    def _summarise(self, states: dict[str, Tensor]) -> dict[str, float]:
        mean, std = mean_std(states["score"])
        return {"bleurt": mean, "bleurt_std": std}

    def describe(self) -> dict[str, Any]:
        if self._injected:
            return {"backend": type(self._scorer).__name__, "injected": True}
        return {"checkpoint": str(Path(self.checkpoint).expanduser().resolve())}
