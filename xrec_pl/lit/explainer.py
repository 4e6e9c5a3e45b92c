"""ExplainerModule: stage 2 of XRec as Lightning glue around :class:`~xrec_pl.models.explainer.GraphConditionedLM`.

The maths (embedding source, adapters, injection, loss, decoding) lives in the net (``self.net``); this module holds
the steps, logging, the dataset-size checks in ``setup``, the optimizer and the checkpoints' identity (shared with
the peft arms in :class:`~xrec_pl.lit.frozen_lm.FrozenLMModule`). Only the adapters train.

- The LLM and its tokenizer are loaded in ``__init__``, so the DataModule can take ``module.tokenizer`` in its
  ``setup()``. The LLM stays in eval mode during ``fit`` (Lightning warns "Found N module(s) in eval mode" — expected).
- Injection: ``training_step`` sets the batch's context and ``on_train_batch_end`` (after backward) clears it, so
  activation checkpointing can re-run the hooked forward during backward; eval and generation use ``injecting``.
- Checkpoints hold the adapter weights (``net.user_adapter.*``, ``net.item_adapter.*``) and optimizer state only,
  plus the LLM identity; loading validates both. Checkpoints written before the net existed (``user_adapter.*``)
  load too (their keys are renamed on load).

The ablation switches (``adapter``, ``injection``, ``embedding_source``; DESIGN §1) are constructor arguments, so
they are logged with the run's hparams; what each one does: :mod:`xrec_pl.models.explainer`.

Predictions (:class:`~xrec_pl.lit.generation.GenerationMixin`): ``{uid, iid, prediction, reference}`` rows, gathered
from all ranks and written to ``{trainer.default_root_dir}/{predictions_file}`` (JSON lines) on rank zero.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Literal

from torch import Tensor, nn

from xrec_pl import run_layout
from xrec_pl.data.embeddings import load_checked_embeddings
from xrec_pl.errors import ConfigError, DataError
from xrec_pl.lit.checkpoint import rename_legacy_keys
from xrec_pl.lit.frozen_lm import FrozenLMModule
from xrec_pl.lit.optim import OptimizerName
from xrec_pl.models.adapters import AdapterKind
from xrec_pl.models.decoding import DECODING_FIELDS
from xrec_pl.models.explainer import Decoder, GraphConditionedLM
from xrec_pl.models.injection import InjectionMode
from xrec_pl.models.sources import EmbeddingSourceKind

__all__ = ["Decoder", "ExplainerModule", "OptimizerName"]

PostProcess = Literal["none", "xrec"]
GenerationDefaults = Literal["greedy", "model"]
PenaltyScope = Literal["generated", "all"]


def _net_part(path: str, doc: str) -> property:
    """A read-only property that forwards to ``self.net.<path>`` (dotted)."""
    return property(lambda self: operator.attrgetter(path)(self.net), doc=doc)


class ExplainerModule(FrozenLMModule):
    """Frozen LLM + user/item adapters + embedding injection (XRec stage 2).

    Args:
        llm: ``"embedded"`` (SmolLM2-135M-Instruct), ``"tiny-random"``, ``"tiny-random-gqa"``, a hub id or a path.
        llm_dtype: ``"auto"`` (bf16/fp16 on GPU, fp32 on CPU), ``"fastest"`` (as ``"auto"``, but bf16 on a CPU with
            bf16 instructions: the shipped CPU configs), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
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
        decay_steps: linear decay of the learning rate towards zero over the last this-many optimizer steps of the
            run (warmup-stable-decay; 0: constant to the end). A run trained at a constant rate may be resumed with a
            decay that starts at or after its checkpoint's step (a cooldown); anything else is refused.
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
        penalty_scope: what the penalty and the ban count: ``"generated"`` (the explanation's own tokens) or
            ``"all"`` (the prompt too, as ``generate`` does; with it a 3-gram ban forbids every phrase of the
            instruction and the profiles). ``None``: ``"generated"``, or ``"all"`` with ``generation_defaults="model"``.
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
        decay_steps: int = 0,
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
        penalty_scope: PenaltyScope | None = None,
        postprocess: PostProcess = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        switches = {"adapter": AdapterKind, "injection": InjectionMode, "embedding_source": EmbeddingSourceKind}
        self.check_hparams(
            {**switches, "postprocess": PostProcess, "generation_defaults": GenerationDefaults}, ("graph_dim",)
        )
        if embedding_source == "graph" and not embeddings_path:
            raise ValueError("embedding_source='graph' needs embeddings_path (stage 1's embeddings.safetensors)")
        user = item = None
        if embeddings_path:
            user, item = load_checked_embeddings(embeddings_path, graph_dim, num_users, num_items)
        hp, extra = self.hparams, tuple(extra_tokens or ())
        load = {"dtype": llm_dtype, "seed": seed, "quantization": quantization, "extra_tokens": extra}
        keys = (*switches, "num_experts", "adapter_dropout", "graph_dim", "num_users", "num_items")
        self.net = GraphConditionedLM.from_pretrained(llm, user=user, item=item, **load, **{k: hp[k] for k in keys})
        decoding = {k: hp[k] for k in DECODING_FIELDS}  # overrides of generation_defaults
        self.init_frozen_lm_state(generation_defaults, decoding)
        self.enable_gradient_checkpointing()

    # ------------------------------------------------------------------------------------------ the net's parts
    llm = _net_part("llm", "The frozen LLM.")
    tokenizer = _net_part("tokenizer", "The LLM's tokenizer (the DataModule takes it in ``setup``).")
    source = _net_part("source", "The :class:`~xrec_pl.models.sources.EmbeddingSource`.")
    user_adapter = _net_part("user_adapter", "The user adapter (``None``: nothing is injected).")
    item_adapter = _net_part("item_adapter", "The item adapter (``None``: nothing is injected).")
    injector = _net_part("injector", "The :class:`~xrec_pl.models.injection.EmbeddingInjector`.")
    num_users = _net_part("source.num_users", "Users of the embedding table (``None``: not known yet).")
    num_items = _net_part("source.num_items", "Items of the embedding table (``None``: not known yet).")

    # ------------------------------------------------------------------------------------------ embeddings
    def setup(self, stage: str) -> None:
        """Check the tables against the DataModule's dataset sizes; size the ``"random"`` tables from it."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        sizes = {}
        for name in ("users", "items"):
            ds, mine = getattr(dm, f"num_{name}", None), getattr(self, f"num_{name}")
            sizes[name] = mine if mine is not None else ds
            if None not in (ds, mine) and mine != ds and self.hparams.embedding_source in ("graph", "random"):
                raise DataError(
                    f"{self.hparams.embeddings_path or 'embedding table'}: {mine} {name} rows, but the dataset at "
                    f"{getattr(dm, 'data_dir', '?')} has {ds} {name}"
                )
        self.source.size(sizes["users"], sizes["items"], device=next(self.llm.parameters()).device)
        if self.hparams.embedding_source == "random" and self.source.user_table is None:
            raise ConfigError(
                f"--model.embedding_source=random needs the numbers of users and items: give --model.num_users and "
                f"--model.num_items, or a data folder with para_dict.pickle ({getattr(dm, 'data_dir', 'none given')})"
            )

    def configure_model(self) -> None:
        self.injector.install()  # idempotent

    def graph_vectors(self, user_id: Tensor, item_id: Tensor) -> tuple[Tensor, Tensor]:
        """Collaborative vectors ``(B, D)`` for the users and items of a batch, per ``embedding_source``."""
        return self.net.graph_vectors(user_id, item_id)

    def quiet_while_generating(self) -> tuple[nn.Module | None, ...]:
        return self.net.adapters()

    def injecting_batch(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Context in which the LLM's forward injects this batch's adapted graph vectors (no-op without adapters)."""
        return self.net.injecting(batch)

    def token_nll(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return self.net.token_nll(batch)

    def token_nll_grouped(self, batch: dict[str, Any], group: int) -> tuple[Tensor, Tensor]:
        """Per-token NLL of rows in groups sharing a prefix, each under the batch's own injection (eval only)."""
        return self.net.token_nll_grouped(batch, group)

    def generate_tokens(self, input_ids: Tensor, attention_mask: Tensor, config: Any) -> Tensor:
        return self.net.generate_tokens(input_ids, attention_mask, config, self.hparams.decoder)

    # ------------------------------------------------------------------------------------------ steps
    @property
    def trains_anything(self) -> bool:
        return self.net.trains_anything

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        self.net.set_context(batch)  # kept until on_train_batch_end (after backward)
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.net.clear_context()

    def on_train_epoch_end(self) -> None:
        self.net.clear_context()

    # ------------------------------------------------------------------------------------------ optimizer
    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, found structurally: those of the two adapters."""
        return self.net.adapter_parameters()

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

    def accept_checkpoint(self, checkpoint: dict[str, Any], where: str) -> None:
        """Rename the adapter keys of checkpoints written before ``self.net`` existed, then the validated load."""
        rename_legacy_keys(checkpoint, {"user_adapter.": "net.user_adapter.", "item_adapter.": "net.item_adapter."})
        super().accept_checkpoint(checkpoint, where)
