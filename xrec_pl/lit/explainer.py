"""ExplainerModule: stage 2 of XRec — a frozen causal LLM, two trainable adapters, embedding injection.

Only the adapters train. What each piece does and why:

- The LLM and its tokenizer are loaded in ``__init__`` (``load_frozen_llm``), so the DataModule can take
  ``module.tokenizer`` in its ``setup()``. The LLM is frozen and stays in eval mode during ``fit`` (Lightning 2.6
  keeps submodule modes; it warns "Found N module(s) in eval mode" — expected); the adapters train.
- Injection (``EmbeddingInjector``): hooks installed once, here, and kept. ``training_step`` sets the per-batch
  context and ``on_train_batch_end`` (after backward) clears it, so activation checkpointing can re-run the hooked
  forward during backward. Eval and generation use the ``injecting`` context manager.
- Loss: cross-entropy on the labelled (assistant) tokens only, LM head at those positions only
  (:mod:`xrec_pl.models.lm_loss`).
- Checkpoints hold the adapter weights (and optimizer state) only, plus the LLM identity; loading validates both.

Ablation switches (DESIGN §1), all constructor arguments and therefore logged with the run's hparams:

- ``adapter``: ``"moe"`` (XRec), ``"linear"`` (no MoE), ``"none"`` (no adapter: the reserved tokens keep their new,
  untrained token embeddings; nothing is injected and nothing trains).
- ``injection``: ``"layers"`` (input + every layer's q/k/v; XRec), ``"input"`` (input embeddings only: the adapters
  train and replace the reserved tokens' input embeddings, only the per-layer q/k/v addition is removed; this is
  "without injection" as the reproduction studies (TMLR, ReXRec) meant it), ``"none"`` (plain prompt: the reserved
  tokens *stay in the text* with their untrained embeddings; no adapter is built and nothing trains: the plain-LLM
  baseline, not the studies' "without injection").
- ``embedding_source``: ``"graph"`` (stage-1 embeddings from ``embeddings_path``), ``"fixed"``, ``"random"``,
  ``"redrawn"`` (:mod:`xrec_pl.models.sources`).

Predictions: ``predict_step`` generates, returns ``{uid, iid, prediction, reference}`` rows and
``on_predict_epoch_end`` gathers them from all ranks, orders them by record index and writes
``{trainer.default_root_dir}/{predictions_file}`` (JSON lines) on rank zero, atomically.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from xrec_pl import run_layout
from xrec_pl.data.embeddings import load_checked_embeddings
from xrec_pl.data.prompts import IGNORE_INDEX
from xrec_pl.errors import ConfigError, DataError
from xrec_pl.lit.checkpoint import load_validated, save_trainable
from xrec_pl.lit.generation import GenerationMixin
from xrec_pl.lit.optim import adam_with_warmup
from xrec_pl.models.adapters import AdapterKind, build_adapter
from xrec_pl.models.decoding import Sampling
from xrec_pl.models.injection import EmbeddingInjector, InjectionMode
from xrec_pl.models.llm import get_llm_info, load_frozen_llm, set_layer_checkpointing
from xrec_pl.models.lm_loss import decoder_hidden_states, token_nll
from xrec_pl.models.sources import EmbeddingSource, EmbeddingSourceKind
from xrec_pl.utils import check_choice

__all__ = ["Decoder", "ExplainerModule", "OptimizerName"]

OptimizerName = Literal["adamw", "adam"]
Decoder = Literal["compact", "hf"]
PostProcess = Literal["none", "xrec"]
GenerationDefaults = Literal["greedy", "model"]


class ExplainerModule(GenerationMixin, pl.LightningModule):
    """Frozen LLM + user/item adapters + embedding injection (XRec stage 2).

    Args:
        llm: ``"embedded"`` (SmolLM2-135M-Instruct), ``"tiny-random"``, ``"tiny-random-gqa"``, a hub id or a path.
        llm_dtype: ``"auto"`` (bf16/fp16 on GPU, fp32 on CPU), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        adapter: ``"moe"`` (XRec), ``"linear"`` or ``"none"``.
        num_experts: experts of the MoE adapter.
        adapter_dropout: input dropout of every MoE expert.
        injection: ``"layers"`` (XRec), ``"input"`` or ``"none"``.
        embedding_source: ``"graph"``, ``"fixed"``, ``"random"`` or ``"redrawn"``.
        embeddings_path: stage-1 embeddings (``embeddings.safetensors``, its folder, or the reference's
            ``user_emb.pkl`` folder); required for ``"graph"``, optional (sets the scale) for the random sources.
        graph_dim: width of the graph embeddings (adapter input).
        num_users: number of users of the dataset; checked against the table; ``None``: from the table or the
            DataModule.
        num_items: number of items, as ``num_users``.
        lr: learning rate.
        weight_decay: decoupled weight decay (AdamW) / L2 (Adam).
        optimizer: ``"adamw"`` or ``"adam"`` (XRec: Adam).
        warmup_steps: linear learning-rate warmup over this many optimizer steps (0: constant).
        max_new_tokens: generation budget per explanation.
        decoder: ``"compact"`` (greedy with a KV cache, finished rows leave the batch; default) or ``"hf"``
            (``llm.generate``); the tokens are the same.
        gradient_checkpointing: recompute decoder layers in backward (non-reentrant) to save activation memory.
        predictions_file: file name of the predictions JSONL written into ``trainer.default_root_dir``.
        seed: seed of the random/fixed embeddings and of the LLM's new token rows.
        quantization: ``None``, ``"8bit"``, ``"4bit"`` or ``"auto"`` (8-bit where bitsandbytes and CUDA exist, else
            unquantized in ``llm_dtype``; logged), passed to ``load_frozen_llm``.
        extra_tokens: further reserved tokens for the tokenizer (``[<EXPLAIN_POS>]`` for prompt style
            ``xrec_exact``).
        generation_defaults: ``"greedy"`` (default) or ``"model"`` (the LLM's own ``generation_config``, which is
            what the reference used: Llama-2-chat's samples); the switches below override either.
        do_sample: sample instead of argmax (``None``: from ``generation_defaults``).
        temperature: sampling temperature (``None``: from ``generation_defaults``).
        top_p: nucleus mass (``None``: from ``generation_defaults``).
        top_k: top-k cut (``None``: from ``generation_defaults``).
        repetition_penalty: ``generate``'s repetition penalty (``None``: from ``generation_defaults``).
        no_repeat_ngram_size: ban repeated n-grams of this size (``None``: from ``generation_defaults``).
        postprocess: ``"none"`` or ``"xrec"`` (the reference's: the text is cut at its first ``[``, and decoding
            stops at the first token that contains ``[`` — which covers ``[/INST]`` — since nothing after it is
            kept).
    """

    IDENTITY_KEYS: tuple[str, ...] = ("adapter", "injection", "graph_dim", "num_experts")  # checked on load

    def __init__(
        self,
        llm: str = "embedded",
        llm_dtype: str = "auto",
        adapter: AdapterKind = "moe",
        num_experts: int = 8,
        adapter_dropout: float = 0.2,
        injection: InjectionMode = "layers",
        embedding_source: EmbeddingSourceKind = "graph",
        embeddings_path: str | None = None,
        graph_dim: int = 64,
        num_users: int | None = None,
        num_items: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        optimizer: OptimizerName = "adamw",
        warmup_steps: int = 0,
        max_new_tokens: int = 128,
        decoder: Decoder = "compact",
        gradient_checkpointing: bool = False,
        predictions_file: str = run_layout.PREDICTIONS,
        seed: int = 0,
        quantization: str | None = None,
        extra_tokens: list[str] | None = None,
        generation_defaults: GenerationDefaults = "greedy",
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        postprocess: PostProcess = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value, choices in (
            ("adapter", adapter, AdapterKind),
            ("injection", injection, InjectionMode),
            ("embedding_source", embedding_source, EmbeddingSourceKind),
            ("decoder", decoder, Decoder),
            ("optimizer", optimizer, OptimizerName),
            ("postprocess", postprocess, PostProcess),
            ("generation_defaults", generation_defaults, GenerationDefaults),
        ):
            check_choice(name, value, choices)
        for name, value in (("lr", lr), ("max_new_tokens", max_new_tokens), ("graph_dim", graph_dim)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if weight_decay < 0 or warmup_steps < 0:
            raise ValueError(f"weight_decay and warmup_steps must be >= 0, got {weight_decay} and {warmup_steps}")
        if embedding_source == "graph" and not embeddings_path:
            raise ValueError("embedding_source='graph' needs embeddings_path (stage 1's embeddings.safetensors)")
        self.strict_loading = False  # checkpoints hold the adapters only; on_load_checkpoint validates them

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.llm, self.tokenizer = load_frozen_llm(
                llm, dtype=llm_dtype, quantization=quantization, extra_tokens=tuple(extra_tokens or ())
            )
        self.llm.requires_grad_(False).eval()
        self.sampling: Sampling = self.resolve_decoding(
            generation_defaults, do_sample, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size
        )
        self.llm_info = get_llm_info(self.llm)
        hidden = self.llm_info.hidden_size

        user = item = None
        if embeddings_path:
            user, item = load_checked_embeddings(embeddings_path, graph_dim, num_users, num_items)
        self.source = EmbeddingSource(embedding_source, graph_dim, seed, user, item, num_users, num_items)
        self.num_users, self.num_items = self.source.num_users, self.source.num_items

        trains = adapter != "none" and injection != "none"  # nothing is built where nothing would reach the LLM
        moe = {"num_experts": num_experts, "dropout": adapter_dropout} if adapter == "moe" else {}
        self.user_adapter = build_adapter(adapter, graph_dim, hidden, **moe) if trains else None
        self.item_adapter = build_adapter(adapter, graph_dim, hidden, **moe) if trains else None
        # not an nn.Module (it only holds hooks and a reference to the llm); "none" installs nothing
        self.injector = EmbeddingInjector(self.llm, mode=injection if trains else "none").install()

        if gradient_checkpointing:
            self.llm.activation_checkpointing_enable({"use_reentrant": False})
            set_layer_checkpointing(self.llm, True)
        self._predictions: list[dict[str, Any]] = []
        self._eval_totals = torch.zeros(2, dtype=torch.float64)  # (loss sum, token count) of the running eval epoch

    # ------------------------------------------------------------------------------------------ embeddings
    def setup(self, stage: str) -> None:
        """Check the tables against the DataModule's dataset sizes; size the ``"random"`` tables from it."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for name in ("users", "items"):
            ds = getattr(dm, f"num_{name}", None)
            mine = getattr(self, f"num_{name}")
            if ds is None:
                continue
            if mine is None:
                setattr(self, f"num_{name}", ds)
            elif mine != ds and self.hparams.embedding_source in ("graph", "random"):
                raise DataError(
                    f"{self.hparams.embeddings_path or 'embedding table'}: {mine} {name} rows, but the dataset at "
                    f"{getattr(dm, 'data_dir', '?')} has {ds} {name}"
                )
        self.source.size(self.num_users, self.num_items, device=next(self.llm.parameters()).device)
        if self.hparams.embedding_source == "random" and self.source.user_table is None:
            raise ConfigError(
                f"--model.embedding_source=random needs the numbers of users and items: give --model.num_users and "
                f"--model.num_items, or a data folder with para_dict.pickle ({getattr(dm, 'data_dir', 'none given')})"
            )

    def configure_model(self) -> None:
        self.injector.install()  # idempotent

    def graph_vectors(self, user_id: Tensor, item_id: Tensor) -> tuple[Tensor, Tensor]:
        """Collaborative vectors ``(B, D)`` for the users and items of a batch, per ``embedding_source``."""
        return self.source(user_id, item_id)

    def _injection(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """``(positions (B, 2), vectors (B, 2, H))`` for the batch, or ``None`` when nothing is injected."""
        if self.user_adapter is None:
            return None
        user_vec, item_vec = self.graph_vectors(batch["user_id"], batch["item_id"])
        vectors = torch.stack([self.user_adapter(user_vec), self.item_adapter(item_vec)], dim=1)  # (B, 2, H)
        positions = torch.stack([batch["user_pos"], batch["item_pos"]], dim=1)  # (B, 2)
        return positions, vectors

    def injecting_batch(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Context in which the LLM's forward injects this batch's adapted graph vectors (no-op without adapters)."""
        inj = self._injection(batch)
        return contextlib.nullcontext() if inj is None else self.injector.injecting(*inj)

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
    @property
    def trains_anything(self) -> bool:
        return self.user_adapter is not None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        inj = self._injection(batch)
        if inj is not None:
            self.injector.set_context(*inj)  # kept until on_train_batch_end (after backward)
        loss = self.lm_loss(batch)
        if self._trainer is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss if self.trains_anything else None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.injector.clear()

    def on_train_epoch_end(self) -> None:
        self.injector.clear()

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
    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, found structurally: those of the two adapters."""
        return [p for m in (self.user_adapter, self.item_adapter) if m is not None for p in m.parameters()]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        adapter_params = self.adapter_parameters()
        if {id(p) for p in params} != {id(p) for p in adapter_params}:
            raise RuntimeError("trainable parameters differ from the adapter parameters; the LLM must stay frozen")
        n_train = sum(p.numel() for p in params)
        n_frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        rank_zero_info(
            f"ExplainerModule: {n_train:,} trainable (adapter) parameters, {n_frozen:,} frozen; "
            f"adapter={self.hparams.adapter} injection={self.hparams.injection} "
            f"embeddings={self.hparams.embedding_source}"
        )
        if not params:
            rank_zero_warn(
                f"adapter={self.hparams.adapter!r} / injection={self.hparams.injection!r}: nothing to train; fit only "
                "evaluates (use validate/test/predict for this baseline)"
            )
            return None
        hp = self.hparams
        return adam_with_warmup(params, hp.optimizer, hp.lr, hp.weight_decay, hp.warmup_steps)

    # ------------------------------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> ExplainerModule:
        """Set the adapters' mode; the LLM always stays in eval mode (layer flags aside for checkpointing)."""
        super().train(mode)
        self.llm.eval()
        if self.hparams.gradient_checkpointing:
            set_layer_checkpointing(self.llm, mode)
        return self

    # ------------------------------------------------------------------------------------------ checkpoints
    def _identity(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "llm": self.llm_info.to_dict(),
            "adapter": hp.adapter,
            "injection": hp.injection,
            "graph_dim": hp.graph_dim,
            "num_experts": hp.num_experts if hp.adapter == "moe" else None,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter weights (never the frozen LLM) and record what they were trained with."""
        save_trainable(self, checkpoint, self._identity())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of another LLM/adapter, or with missing/unexpected adapter keys (``DataError``)."""
        where = (self._trainer.ckpt_path if self._trainer is not None else None) or "checkpoint"
        load_validated(self, checkpoint, self._identity(), self.IDENTITY_KEYS, str(where))
