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

import torch
from torch import Tensor, nn

from xrec_pl import run_layout
from xrec_pl.data.embeddings import load_checked_embeddings
from xrec_pl.errors import ConfigError, DataError
from xrec_pl.lit.frozen_lm import FrozenLMModule
from xrec_pl.models.adapters import AdapterKind, build_adapter
from xrec_pl.models.injection import EmbeddingInjector, InjectionMode
from xrec_pl.models.sources import EmbeddingSource, EmbeddingSourceKind
from xrec_pl.utils import check_choice

__all__ = ["Decoder", "ExplainerModule", "OptimizerName"]

OptimizerName = Literal["adamw", "adam"]
Decoder = Literal["compact", "hf"]
PostProcess = Literal["none", "xrec"]
GenerationDefaults = Literal["greedy", "model"]


class ExplainerModule(FrozenLMModule):
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
        self.init_frozen_llm(
            llm,
            llm_dtype,
            seed,
            quantization,
            extra_tokens,
            generation_defaults,
            {
                "do_sample": do_sample,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "repetition_penalty": repetition_penalty,
                "no_repeat_ngram_size": no_repeat_ngram_size,
            },
        )
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

        self.enable_gradient_checkpointing()

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

    def quiet_while_generating(self) -> tuple[nn.Module | None, ...]:
        return self.user_adapter, self.item_adapter

    def injecting_batch(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Context in which the LLM's forward injects this batch's adapted graph vectors (no-op without adapters)."""
        inj = self._injection(batch)
        return contextlib.nullcontext() if inj is None else self.injector.injecting(*inj)

    # ------------------------------------------------------------------------------------------ steps
    @property
    def trains_anything(self) -> bool:
        return self.user_adapter is not None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        inj = self._injection(batch)
        if inj is not None:
            self.injector.set_context(*inj)  # kept until on_train_batch_end (after backward)
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.injector.clear()

    def on_train_epoch_end(self) -> None:
        self.injector.clear()

    # ------------------------------------------------------------------------------------------ optimizer
    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, found structurally: those of the two adapters."""
        return [p for m in (self.user_adapter, self.item_adapter) if m is not None for p in m.parameters()]

    def describe_arm(self) -> str:
        hp = self.hparams
        return f"adapter={hp.adapter} injection={hp.injection} embeddings={hp.embedding_source}"

    # ------------------------------------------------------------------------------------------ checkpoints
    def arm_identity(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "adapter": hp.adapter,
            "injection": hp.injection,
            "graph_dim": hp.graph_dim,
            "num_experts": hp.num_experts if hp.adapter == "moe" else None,
        }
