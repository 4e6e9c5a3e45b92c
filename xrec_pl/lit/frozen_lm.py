"""FrozenLMModule: the Lightning glue every stage-2 arm shares — a frozen causal LLM and a few trainable parts.

The graph-conditioned explainer (:class:`~xrec_pl.lit.explainer.ExplainerModule`) and the peft comparison arms
(:class:`~xrec_pl.lit.peft_explainer.PeftExplainerModule`) both build on this class; neither builds on the other.
A subclass calls ``self.save_hyperparameters()`` in its own ``__init__`` (its hparams then hold exactly its own
arguments), then :meth:`init_frozen_llm`, and provides:

- :meth:`adapter_parameters`: the trainable parameters, found structurally (checked against ``requires_grad``);
- :meth:`arm_identity`: what the checkpoint records beside the LLM identity, checked on load for ``IDENTITY_KEYS``;
- optionally :meth:`injecting_batch` (eval-time conditioning), :meth:`lm_hidden_states` and ``generate_tokens``.

It holds the loss (:mod:`xrec_pl.models.lm_loss`), the train/val/test steps (token-level mean cross-entropy over the
whole split, all ranks), the optimizer, the modes (the LLM always in eval mode) and the trainable-only checkpoints.
The hparams it reads: ``lr``, ``weight_decay``, ``optimizer``, ``warmup_steps``, ``decay_steps``,
``gradient_checkpointing`` and the generation settings (:class:`~xrec_pl.lit.generation.GenerationMixin`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from xrec_pl.data.prompts import IGNORE_INDEX
from xrec_pl.errors import ConfigError, DataError
from xrec_pl.lit.checkpoint import load_validated, save_trainable
from xrec_pl.lit.generation import GenerationMixin
from xrec_pl.lit.optim import OptimizerName, adam_with_warmup, schedules_agree
from xrec_pl.models.decoding import check_hf_scope, cpu_decoding_layout
from xrec_pl.models.explainer import Decoder, load_seeded_llm
from xrec_pl.models.llm import get_llm_info, set_layer_checkpointing
from xrec_pl.models.llm_loading import non_weight_buffers, restore_buffers
from xrec_pl.models.lm_loss import decoder_hidden_states, token_nll
from xrec_pl.utils import check_choice

__all__ = ["FrozenLMModule"]

# the column-major weight layout a module holds through an evaluation loop, kept beside it (nothing on the module)
_EVAL_LAYOUT: weakref.WeakKeyDictionary[FrozenLMModule, ExitStack] = weakref.WeakKeyDictionary()


class FrozenLMModule(GenerationMixin, pl.LightningModule):
    """Base of the stage-2 LightningModules: frozen LLM, loss, steps, optimizer, trainable-only checkpoints."""

    IDENTITY_KEYS: tuple[str, ...] = ()  # keys of arm_identity() checked on load

    def init_frozen_llm(
        self,
        llm: str,
        llm_dtype: str,
        seed: int,
        quantization: str | None = None,
        extra_tokens: list[str] | None = None,
        generation_defaults: str = "greedy",
        decoding: Mapping[str, Any] | None = None,
    ) -> None:
        """Load the frozen LLM and tokenizer (new token rows seeded by ``seed``), its identity and decoding settings.

        ``decoding`` holds overrides of ``generation_defaults`` (``do_sample``, ``temperature``, ``top_p``, ``top_k``,
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``penalty_scope``; ``None`` values ignored), as
        :meth:`~xrec_pl.lit.generation.GenerationMixin.resolve_decoding` takes them.
        """
        self.llm, self.tokenizer = load_seeded_llm(llm, llm_dtype, seed, quantization, tuple(extra_tokens or ()))
        self.init_frozen_lm_state(generation_defaults, decoding)

    def init_frozen_lm_state(
        self, generation_defaults: str = "greedy", decoding: Mapping[str, Any] | None = None
    ) -> None:
        """The glue's own state once ``self.llm`` and ``self.tokenizer`` exist: LLM identity, decoding, eval sums."""
        self.strict_loading = False  # checkpoints hold the trainable weights only; on_load_checkpoint validates them
        self.llm.requires_grad_(False).eval()
        self.sampling = self.resolve_decoding(generation_defaults, decoding)
        if self.hparams.get("decoder", "compact") == "hf":
            check_hf_scope(self.sampling)
        self.llm_info = get_llm_info(self.llm)
        self._llm_buffers = non_weight_buffers(self.llm)  # fp32 rotary frequencies, put back after a bf16-true cast
        self._predictions: list[dict[str, Any]] = []
        self._eval_totals = torch.zeros(2, dtype=torch.float64)  # (loss sum, token count) of the running eval epoch
        self._lr_schedule: dict[str, Any] | None = None  # set by configure_optimizers, saved in checkpoints
        self._resumed_schedule: tuple[Mapping[str, Any], int, str] | None = None  # (schedule, step, file) on load

    def check_hparams(self, choices: Mapping[str, Any] | None = None, positive: tuple[str, ...] = ()) -> None:
        """Refuse switches outside their ``Literal`` (``decoder``, ``optimizer`` and ``choices``: name -> Literal) and
        non-positive ``lr``/``max_new_tokens``/``positive`` or negative ``weight_decay``/``warmup_steps`` hparams."""
        hp = self.hparams
        for name, allowed in {"decoder": Decoder, "optimizer": OptimizerName, **(choices or {})}.items():
            check_choice(name, hp[name], allowed)
        for name in ("lr", "max_new_tokens", *positive):
            if not hp[name] > 0:
                raise ValueError(f"{name} must be positive, got {hp[name]}")
        if hp.weight_decay < 0 or hp.warmup_steps < 0:
            raise ValueError(f"weight_decay and warmup_steps must be >= 0, got {hp.weight_decay} and {hp.warmup_steps}")
        if hp.decay_steps < 0:
            raise ValueError(f"decay_steps must be >= 0, got {hp.decay_steps}")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the decoder layers in backward (non-reentrant) when ``hparams.gradient_checkpointing``."""
        if self.hparams.gradient_checkpointing:
            self.llm.activation_checkpointing_enable({"use_reentrant": False})
            set_layer_checkpointing(self.llm, True)

    # ------------------------------------------------------------------------------------------ what subclasses give
    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, found structurally (none here)."""
        return []

    @property
    def trains_anything(self) -> bool:
        return bool(self.adapter_parameters())

    def arm_identity(self) -> dict[str, Any]:
        """What the checkpoint records beside the LLM identity (the keys of ``IDENTITY_KEYS`` at least)."""
        return {}

    def describe_arm(self) -> str:
        """One line on what this arm trains, for the log."""
        return ""

    def quiet_while_generating(self) -> tuple[nn.Module | None, ...]:
        """Modules put in eval mode while generating (no dropout, no gate noise; ``None`` skipped)."""
        return ()

    def injecting_batch(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Context in which the LLM's forward is conditioned on this batch (nothing here)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------ loss
    def lm_loss(self, batch: dict[str, Any], reduction: str = "mean") -> Tensor:
        """Mean (or, with ``reduction="sum"``, summed) cross-entropy over labelled tokens, LM head at those only.

        Equal to the loss of ``llm(input_ids, attention_mask, labels=labels)`` (tested).
        """
        nll, _ = self.token_nll(batch)
        return nll.mean() if reduction == "mean" else nll.sum()

    def token_nll(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Cross-entropy of every labelled token ``(N,)`` and the batch row it belongs to ``(N,)``.

        The LM head runs at the labelled positions only (with the model's logit soft-capping, if any).
        """
        return token_nll(self.llm, self.lm_hidden_states(batch), batch["labels"])

    def lm_hidden_states(self, batch: dict[str, Any]) -> Tensor:
        """Last hidden states ``(B, T, H)`` of the batch's tokens (subclasses may prepend virtual tokens)."""
        return decoder_hidden_states(self.llm, batch["input_ids"], batch["attention_mask"])

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        loss = self.lm_loss(batch)
        if self._trainer is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss if self.trains_anything else None

    def _eval_loss(self, batch: dict[str, Any], key: str) -> Tensor:
        # summed over tokens here, divided by the token count of the whole split (all ranks) at the epoch end
        with self.injecting_batch(batch):
            total = self.lm_loss(batch, reduction="sum")
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self._eval_totals = self._eval_totals + torch.stack(
            [total.detach().double(), total.new_tensor(tokens).double()]
        )
        return total / max(tokens, 1)

    def _eval_end(self, key: str) -> None:
        """Log ``key`` = token-level mean cross-entropy over the split: sums and counts all-reduced, then divided.

        The same value whatever the batching or the number of ranks (each record is evaluated by one rank).
        """
        totals = self.trainer.strategy.reduce(self._eval_totals.to(self.device), reduce_op="sum")  # (2,)
        if float(totals[1]) > 0:
            self.log(key, (totals[0] / totals[1]).float(), prog_bar=True, sync_dist=False)
        self._eval_totals = torch.zeros(2, dtype=torch.float64)

    def on_validation_epoch_start(self) -> None:
        self._eval_totals = torch.zeros(2, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._eval_loss(batch, "val/loss")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val/loss")

    def on_test_epoch_start(self) -> None:
        self._eval_totals = torch.zeros(2, dtype=torch.float64)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._eval_loss(batch, "test/loss")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test/loss")

    # ------------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        adapter_params = self.adapter_parameters()
        if {id(p) for p in params} != {id(p) for p in adapter_params}:
            raise RuntimeError("trainable parameters differ from the adapter parameters; the LLM must stay frozen")
        n_train = sum(p.numel() for p in params)
        n_frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        name = type(self).__name__
        rank_zero_info(f"{name}: {n_train:,} trainable parameters, {n_frozen:,} frozen; {self.describe_arm()}")
        if not params:
            rank_zero_warn(
                f"{name} ({self.describe_arm()}): nothing to train; fit only evaluates "
                "(use validate/test/predict for this baseline)"
            )
            return None
        hp = self.hparams
        decay = int(hp.decay_steps)
        schedule = {"warmup_steps": int(hp.warmup_steps), "decay_steps": decay, "total_steps": None}
        if decay > 0:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ConfigError("model.decay_steps needs a run of known length: set trainer.max_epochs or max_steps")
            if decay > total:
                raise ConfigError(f"model.decay_steps ({decay}) is more than the run's {int(total)} optimizer steps")
            schedule["total_steps"] = int(total)
        self._check_resumed_schedule(schedule)
        self._lr_schedule = schedule
        return adam_with_warmup(params, hp.optimizer, hp.lr, hp.weight_decay, **schedule)

    def _check_resumed_schedule(self, schedule: dict[str, Any]) -> None:
        """On resume, the learning-rate schedule may change only after the checkpoint's step (``DataError`` if not):
        e.g. a run trained at a constant rate may be continued with a decay that starts where the checkpoint stops."""
        resumed, self._resumed_schedule = self._resumed_schedule, None
        if resumed is None or self._trainer is None or self.trainer.ckpt_path is None:
            return
        stored, step, where = resumed
        # step + 1: the rate of the next step was already set (the scheduler steps before a checkpoint is written)
        if not schedules_agree(stored, schedule, step + 1):
            decay, total = schedule["decay_steps"], schedule["total_steps"]
            why = (
                f"a decay over the last {decay} of {total} steps starts at step {total - decay}"
                if decay
                else f"the stored run decays over its last {stored.get('decay_steps')} steps"
            )
            raise DataError(
                f"{where}: the learning-rate schedule differs from the checkpoint's up to its step {step} ({why}); "
                "keep the stored schedule, let the decay start at or after that step, or start a new run folder"
            )

    # ------------------------------------------------------------------------------------------ precision
    def _restore_llm_buffers(self) -> None:
        """Undo what a ``*-true`` precision plugin's ``module.to(dtype)`` did to the LLM's non-weight buffers.

        Lightning casts the whole module (``bf16-true``, the FSDP/DeepSpeed configs) after the model is set up; the
        rotary frequencies that transformers keeps in float32 would then be rounded to bf16 and move every position.
        """
        restored = restore_buffers(self._llm_buffers)
        if restored:
            rank_zero_info(f"kept {restored} non-weight LLM buffers (rotary frequencies) in their original dtype")

    def on_fit_start(self) -> None:
        self._restore_llm_buffers()

    def on_validation_start(self) -> None:
        self._restore_llm_buffers()
        self._hold_eval_layout(True)

    def on_validation_end(self) -> None:
        self._hold_eval_layout(False)

    def on_test_start(self) -> None:
        self._restore_llm_buffers()
        self._hold_eval_layout(True)

    def on_test_end(self) -> None:
        self._hold_eval_layout(False)

    def on_predict_start(self) -> None:
        self._restore_llm_buffers()
        self._hold_eval_layout(True)

    def on_predict_end(self) -> None:
        self._hold_eval_layout(False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._hold_eval_layout(False)  # training always sees the usual layout (an evaluation that raised, say)

    def teardown(self, stage: str) -> None:
        self._hold_eval_layout(False)

    def _hold_eval_layout(self, on: bool) -> None:
        """Keep the frozen LLM's weights column-major through an evaluation loop on a CPU (one re-laying per loop, not
        one per generated batch; ``models.decoding.cpu_decoding_layout``), and row-major again when it ends."""
        held = _EVAL_LAYOUT.pop(self, None)
        if held is not None:
            held.close()
        if on:
            stack = ExitStack()
            stack.enter_context(cpu_decoding_layout(self.llm, self.device))
            _EVAL_LAYOUT[self] = stack

    # ------------------------------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> FrozenLMModule:
        """Set the trainable parts' mode; the LLM always stays in eval mode (layer flags aside for checkpointing)."""
        super().train(mode)
        self.llm.eval()
        if self.hparams.gradient_checkpointing:
            set_layer_checkpointing(self.llm, mode)
        return self

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable weights (never the frozen LLM) and record what they were trained with."""
        save_trainable(self, checkpoint, {"llm": self.llm_info.to_dict(), **self.arm_identity()})
        if self._lr_schedule is not None:
            checkpoint["lr_schedule"] = dict(self._lr_schedule)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of another LLM/arm, or with missing/unexpected trainable keys (``DataError``)."""
        where = (self._trainer.ckpt_path if self._trainer is not None else None) or "checkpoint"
        self.accept_checkpoint(checkpoint, str(where))
        # the schedule the checkpoint was trained with (before decay_steps existed: warmup, then constant)
        stored = checkpoint.get("lr_schedule")
        if stored is None:
            hp = checkpoint.get("hyper_parameters") or {}
            stored = {"warmup_steps": hp.get("warmup_steps", 0), "decay_steps": hp.get("decay_steps", 0)}
        step = checkpoint.get("global_step") or 0
        counts = [*stored.values(), step] if isinstance(stored, Mapping) else [stored]
        if not all(v is None or (type(v) is int and v >= 0) for v in counts):
            raise DataError(f"{where}: lr_schedule/global_step hold something other than non-negative integers")
        self._resumed_schedule = (stored, int(step), str(where))

    def accept_checkpoint(self, checkpoint: dict[str, Any], where: str) -> None:
        """The one validated load (:func:`~xrec_pl.lit.checkpoint.load_validated`) of ``checkpoint`` (read from
        ``where``) into this module's identity; ``checkpoint["state_dict"]`` is then ready for a non-strict load."""
        identity = {"llm": self.llm_info.to_dict(), **self.arm_identity()}
        load_validated(self, checkpoint, identity, self.IDENTITY_KEYS, where)
