"""Generation and prediction of the explainer (a mixin of :class:`~xrec_pl.lit.explainer.ExplainerModule`).

Decoding settings come from the module's hparams (:meth:`GenerationMixin.resolve_decoding`): greedy by default, or
the LLM's own ``generation_config`` (``generation_defaults="model"``, the reference recipe) with explicit overrides.
``postprocess="xrec"`` cuts each text at its first ``[`` and stops decoding at the first token that holds one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from xrec_pl.models.adapters import eval_mode
from xrec_pl.models.decoding import (
    Sampling,
    bracket_token_ids,
    cut_at_bracket,
    greedy_config,
    resolve_sampling,
    stop_ids,
)
from xrec_pl.models.explainer import decode
from xrec_pl.utils import write_jsonl

__all__ = ["GenerationMixin"]


class GenerationMixin:
    """``generate_explanations``, ``generate_tokens``, ``predict_step`` and the predictions file.

    Expects ``llm``, ``tokenizer``, ``llm_info``, ``sampling``, ``hparams`` (``max_new_tokens``, ``decoder``,
    ``postprocess``, ``predictions_file``), ``quiet_while_generating()`` and ``injecting_batch`` on the host.
    """

    def resolve_decoding(self, defaults: str, overrides: Mapping[str, Any] | None = None) -> Sampling:
        """The decoding settings: ``defaults`` (``"greedy"`` or ``"model"``) with the given overrides; logged."""
        sampling = resolve_sampling(defaults, getattr(self.llm, "generation_config", None), overrides)
        if not sampling.is_greedy:
            rank_zero_info(f"{type(self).__name__}: decoding with {sampling}")
        return sampling

    def stop_ids(self) -> list[int]:
        """The token ids that end an explanation: the tokenizer's EOS, the generation config's and, with
        ``postprocess="xrec"``, every token whose text holds a ``[`` (nothing after it survives the cut)."""
        return stop_ids(self.tokenizer, self.llm, self._bracket_stops())

    def _bracket_stops(self) -> list[int]:
        if self.hparams.get("postprocess", "none") != "xrec":
            return []
        if getattr(self, "_bracket_ids", None) is None:
            self._bracket_ids = bracket_token_ids(self.tokenizer)
        return self._bracket_ids

    @torch.no_grad()
    def generate_explanations(self, batch: dict[str, Any], max_new_tokens: int | None = None) -> list[str]:
        """Greedy explanations for a left-padded prompt batch (``generation_dataloader`` / predict loader).

        Injection applies to the prefill only; decoding uses the KV cache; each row stops at EOS.

        Args:
            batch: ``input_ids``/``attention_mask`` ``(B, T)`` left-padded, ``user_pos``/``item_pos``/``user_id``/
                ``item_id`` ``(B,)``.
            max_new_tokens: overrides the module's ``max_new_tokens``.

        Returns:
            ``B`` strings: the decoded new tokens, special tokens removed, stripped.
        """
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        if input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate_explanations needs left-padded batches (use generation_dataloader)")
        batch = {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        # the reserved tokens and the added pad token have untrained rows in a tied LM head: never emit them
        suppress = self.llm_info.reserved_token_ids.values()
        config = greedy_config(
            self.tokenizer,
            self.llm,
            max_new_tokens or self.hparams.max_new_tokens,
            suppress,
            sampling=self.sampling,
            extra_stops=self._bracket_stops(),
        )
        # no dropout, no gate noise while generating
        with eval_mode(*self.quiet_while_generating()), self.injecting_batch(batch):
            new_tokens = self.generate_tokens(input_ids, attention_mask, config)  # (B, <= max_new_tokens)
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if self.hparams.get("postprocess", "none") == "xrec":
            texts = [cut_at_bracket(t) for t in texts]
        return [text.strip() for text in texts]

    def generate_tokens(self, input_ids: Tensor, attention_mask: Tensor, config: Any) -> Tensor:
        """The greedy new tokens ``(B, N)`` for a left-padded prompt batch (subclass hook).

        ``decoder="compact"`` (default) drops finished rows from the batch (:func:`greedy_generate`);
        ``decoder="hf"`` calls ``llm.generate``. Both give the same tokens (tested).
        """
        return decode(self.llm, input_ids, attention_mask, config, self.hparams.get("decoder", "compact"))

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        texts = self.generate_explanations(batch)
        rows = [
            {"uid": int(u), "iid": int(i), "prediction": t, "reference": r, "index": int(x)}
            for u, i, t, r, x in zip(
                batch["user_id"].tolist(), batch["item_id"].tolist(), texts, batch["reference"], batch["index"].tolist()
            )
        ]
        self._predictions.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        """Gather the predictions of all ranks and write them, ordered by record index, on rank zero."""
        rows = self._predictions
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if self.trainer.is_global_zero:
            unique = {row["index"]: row for row in rows}  # samplers that pad repeat rows
            ordered = [unique[i] for i in sorted(unique)]
            path = Path(self.trainer.default_root_dir) / self.hparams.predictions_file
            write_jsonl(path, [{k: row[k] for k in ("uid", "iid", "prediction", "reference")} for row in ordered])
            rank_zero_info(f"wrote {len(ordered)} predictions to {path}")
        self._predictions = []
