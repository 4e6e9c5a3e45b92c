"""GraphConditionedLM: XRec's stage-2 network — a frozen causal LLM conditioned on collaborative vectors.

For a batch of prompts about (user, item) pairs:

1. the embedding source gives the pair's collaborative vectors ``u, i`` ``(B, D)`` (:mod:`~xrec_pl.models.sources`:
   the stage-1 tables, or the fixed/random ablations);
2. two adapters map them to the LLM width: ``e_u = A_u(u)``, ``e_i = A_i(i)`` ``(B, H)``
   (:mod:`~xrec_pl.models.adapters`: MoE in XRec, or linear);
3. the injector (:class:`~xrec_pl.models.injection.EmbeddingInjector`) puts ``e_u``/``e_i`` at the positions of
   ``<USER_EMBED>``/``<ITEM_EMBED>``: they replace those tokens' input embeddings and (``injection="layers"``) are
   added to the q/k/v projections of every decoder layer there;
4. the loss is the cross-entropy of the labelled (explanation) tokens, the LM head applied at those positions only
   (:mod:`~xrec_pl.models.lm_loss`).

The ablation switches (DESIGN §1; :meth:`GraphConditionedLM.build`, ``ExplainerModule``'s arguments):

- ``adapter``: ``"moe"`` (XRec), ``"linear"`` (no MoE), ``"none"`` (no adapter: the reserved tokens keep their new,
  untrained token embeddings; nothing is injected and nothing trains).
- ``injection``: ``"layers"`` (input + every layer's q/k/v; XRec), ``"input"`` (input embeddings only: the adapters
  train and replace the reserved tokens' input embeddings, only the per-layer q/k/v addition is removed; this is
  "without injection" as the reproduction studies (TMLR, ReXRec) meant it), ``"none"`` (plain prompt: the reserved
  tokens *stay in the text* with their untrained embeddings; no adapter is built and nothing trains: the plain-LLM
  baseline, not the studies' "without injection").
- ``embedding_source``: ``"graph"`` (stage-1 embeddings from ``embeddings_path``), ``"fixed"``, ``"random"``,
  ``"redrawn"`` (:mod:`xrec_pl.models.sources`).

Only the adapters train; the LLM is frozen and always in eval mode. The injection context is explicit: run the LLM
inside :meth:`GraphConditionedLM.injecting` (eval, generation), or between :meth:`~GraphConditionedLM.set_context`
and :meth:`~GraphConditionedLM.clear_context` in training (the context must outlive ``backward()`` when activation
checkpointing re-runs the hooked forward)::

    net = GraphConditionedLM.from_pretrained("tiny-random", embedding_source="random", num_users=60, num_items=50)
    with net.injecting(batch):
        nll, rows = net.token_nll(batch)          # (N,), (N,)
    with net.generating(batch):
        new_tokens = net.generate_tokens(batch["input_ids"], batch["attention_mask"], config)

Plain PyTorch: no Lightning here (:class:`~xrec_pl.lit.explainer.ExplainerModule` is the training glue).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from xrec_pl.models.adapters import AdapterKind, build_adapter, eval_mode
from xrec_pl.models.decoding import (
    Sampling,
    check_hf_scope,
    cpu_decoding_layout,
    greedy_with_config,
    padded_attention_kernels,
)
from xrec_pl.models.injection import EmbeddingInjector, InjectionMode
from xrec_pl.models.llm import load_frozen_llm
from xrec_pl.models.lm_loss import (
    attention_implementation,
    causal_suffices,
    common_prefix_lengths,
    decoder_hidden_states,
    grouped_hidden_states,
    teacher_forcing_attention,
    token_nll,
)
from xrec_pl.models.sources import EmbeddingSource, EmbeddingSourceKind

__all__ = ["Decoder", "GraphConditionedLM", "decode", "load_seeded_llm"]

Decoder = Literal["compact", "hf"]


def load_seeded_llm(
    name: str, dtype: str = "auto", seed: int = 0, quantization: str | None = None, extra_tokens: tuple[str, ...] = ()
) -> tuple[nn.Module, Any]:
    """:func:`~xrec_pl.models.llm.load_frozen_llm` with the new token rows drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_frozen_llm(name, dtype=dtype, quantization=quantization, extra_tokens=tuple(extra_tokens))


def decode(
    llm: nn.Module, input_ids: Tensor, attention_mask: Tensor, config: Any, decoder: Decoder = "compact"
) -> Tensor:
    """New tokens ``(B, N)`` of ``llm`` for a left-padded prompt batch ``(B, T)`` (see ``generate_tokens``)."""
    if decoder == "compact":
        return greedy_with_config(llm, config, attention_mask, input_ids=input_ids)
    check_hf_scope(Sampling.from_generation_config(config))
    with cpu_decoding_layout(llm, input_ids.device), padded_attention_kernels(input_ids.device):
        out = llm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return out[:, input_ids.shape[1] :]


class GraphConditionedLM(nn.Module):
    """A frozen causal LLM, an embedding source, user/item adapters and the injector that joins them.

    Args:
        llm: a frozen Hugging Face causal LM (e.g. from :func:`~xrec_pl.models.llm.load_frozen_llm`), with the
            reserved tokens in its vocabulary.
        source: the collaborative vectors of users and items.
        user_adapter: maps user vectors ``(B, D)`` to ``(B, H)``; ``None`` (with ``item_adapter``): nothing is
            injected and nothing trains.
        item_adapter: as ``user_adapter``, for items.
        injection: ``"layers"`` (input and every layer's q/k/v; XRec), ``"input"`` or ``"none"``.
        tokenizer: the LLM's tokenizer (kept for the callers; the maths here never needs it).
    """

    def __init__(
        self,
        llm: nn.Module,
        source: EmbeddingSource,
        user_adapter: nn.Module | None = None,
        item_adapter: nn.Module | None = None,
        injection: InjectionMode = "layers",
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if (user_adapter is None) != (item_adapter is None):
            raise ValueError("give both adapters or neither")
        self.llm = llm.requires_grad_(False).eval()
        self.source = source
        self.user_adapter = user_adapter
        self.item_adapter = item_adapter
        self.tokenizer = tokenizer
        # not an nn.Module: hooks and a reference to the llm; "none" (or no adapters) installs nothing
        self.injector = EmbeddingInjector(llm, mode=injection if user_adapter is not None else "none").install()

    @classmethod
    def build(
        cls,
        llm: nn.Module,
        tokenizer: Any = None,
        *,
        adapter: AdapterKind = "moe",
        num_experts: int = 8,
        adapter_dropout: float = 0.2,
        injection: InjectionMode = "layers",
        embedding_source: EmbeddingSourceKind = "graph",
        graph_dim: int = 64,
        seed: int = 0,
        user: Tensor | None = None,
        item: Tensor | None = None,
        num_users: int | None = None,
        num_items: int | None = None,
    ) -> GraphConditionedLM:
        """The net of the explainer's switches around a loaded ``llm`` (adapters drawn from the global RNG).

        ``adapter="none"`` or ``injection="none"`` builds no adapter: nothing would reach the LLM. ``user``/``item``
        are the stage-1 tables ``(U, D)``/``(I, D)`` (:class:`~xrec_pl.models.sources.EmbeddingSource`).
        """
        source = EmbeddingSource(embedding_source, graph_dim, seed, user, item, num_users, num_items)
        hidden = int(llm.get_input_embeddings().embedding_dim)
        trains = adapter != "none" and injection != "none"
        moe = {"num_experts": num_experts, "dropout": adapter_dropout} if adapter == "moe" else {}
        user_adapter = build_adapter(adapter, graph_dim, hidden, **moe) if trains else None
        item_adapter = build_adapter(adapter, graph_dim, hidden, **moe) if trains else None
        return cls(llm, source, user_adapter, item_adapter, injection, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        name: str = "embedded",
        *,
        dtype: str = "auto",
        seed: int = 0,
        quantization: str | None = None,
        extra_tokens: tuple[str, ...] = (),
        **switches: Any,
    ) -> GraphConditionedLM:
        """Load the frozen LLM (:func:`load_seeded_llm`) and :meth:`build` the net around it with ``switches``."""
        llm, tokenizer = load_seeded_llm(name, dtype, seed, quantization, extra_tokens)
        return cls.build(llm, tokenizer, seed=seed, **switches)

    # ------------------------------------------------------------------------------------------ parts
    @property
    def trains_anything(self) -> bool:
        return self.user_adapter is not None

    def adapters(self) -> tuple[nn.Module, ...]:
        """The user and item adapters (empty when there are none)."""
        return () if self.user_adapter is None else (self.user_adapter, self.item_adapter)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, found structurally: those of the two adapters."""
        return [p for m in self.adapters() for p in m.parameters()]

    def train(self, mode: bool = True) -> GraphConditionedLM:
        """Set the adapters' mode; the LLM stays in eval mode."""
        super().train(mode)
        self.llm.eval()
        return self

    # ------------------------------------------------------------------------------------------ conditioning
    def graph_vectors(self, user_id: Tensor, item_id: Tensor) -> tuple[Tensor, Tensor]:
        """Collaborative vectors ``(B, D)`` of the users and items of a batch."""
        return self.source(user_id, item_id)

    def adapted_vectors(self, user_id: Tensor, item_id: Tensor) -> Tensor | None:
        """Adapter outputs ``(B, 2, H)`` (user, item) for ids ``(B,)``, or ``None`` without adapters."""
        if self.user_adapter is None:
            return None
        user_vec, item_vec = self.graph_vectors(user_id, item_id)
        return torch.stack([self.user_adapter(user_vec), self.item_adapter(item_vec)], dim=1)  # (B, 2, H)

    def vectors(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """``(positions (B, 2), vectors (B, 2, H))`` to inject for the batch, or ``None`` without adapters."""
        vectors = self.adapted_vectors(batch["user_id"], batch["item_id"])
        if vectors is None:
            return None
        return torch.stack([batch["user_pos"], batch["item_pos"]], dim=1), vectors  # (B, 2), (B, 2, H)

    def injecting(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Context in which the LLM's forward is conditioned on this batch (a no-op without adapters)."""
        inj = self.vectors(batch)
        return contextlib.nullcontext() if inj is None else self.injector.injecting(*inj)

    def set_context(self, batch: dict[str, Any]) -> None:
        """Condition the following forward passes on this batch until :meth:`clear_context` (training)."""
        inj = self.vectors(batch)
        if inj is not None:
            self.injector.set_context(*inj)

    def clear_context(self) -> None:
        """Forget the training context (call after ``backward()``)."""
        self.injector.clear()

    # ------------------------------------------------------------------------------------------ loss
    def hidden_states(self, batch: dict[str, Any]) -> Tensor:
        """Last hidden states ``(B, T, H)`` of the batch's tokens, under the injection context in force.

        The prompt's tokens before the first reserved token are the same in every row and nothing trainable reaches
        them (the injection starts at the reserved tokens, attention is causal): where :meth:`frozen_prefix_length`
        allows it, they run once per batch (one row, injection paused, nothing for backward to do) and every row
        continues from their KV cache (:func:`~xrec_pl.models.lm_loss.grouped_hidden_states`). The same states up to
        floating-point order; the prefix's forward and backward work is skipped.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prefix = self.frozen_prefix_length(batch)
        if not prefix:
            return decoder_hidden_states(self.llm, ids, mask)
        with attention_implementation(self.llm, "eager"):
            return grouped_hidden_states(
                self.llm,
                ids,
                mask,
                ids.shape[0],
                ids.new_tensor([prefix]),
                lambda firsts: self.injector.paused(),
                rest_context=lambda: self.injector.starting_at(prefix),
            )

    def frozen_prefix_length(self, batch: dict[str, Any]) -> int:
        """Leading tokens every row shares before any reserved token, when running them once pays (else 0).

        Only in training (gradients on: the skipped work is mostly the prefix's backward; evaluation forwards keep
        one plain forward, whose positions the analysis tools' own hooks read), where teacher forcing runs eager
        attention (a CPU, no activation checkpointing: the continuations attend to a cache through an explicit mask,
        which the CPU's SDPA kernels ran several times slower), and for right-padded batches; each row keeps at
        least one token of its own.
        """
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if not torch.is_grad_enabled() or mask is None or teacher_forcing_attention(self.llm, ids.device) != "eager":
            return 0  # the kernel rule first: it answers without reading the mask (no device sync on a GPU)
        if causal_suffices(mask) is not None:
            return 0
        shared = int(common_prefix_lengths(ids, mask.sum(1), ids.shape[0])[0])
        if "user_pos" in batch and "item_pos" in batch:
            reserved = torch.cat([batch["user_pos"].flatten(), batch["item_pos"].flatten()])
            reserved = reserved[reserved >= 0]
            if reserved.numel():
                shared = min(shared, int(reserved.min()))
        return max(shared, 0)

    def token_nll(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Cross-entropy of every labelled token ``(N,)`` and its batch row ``(N,)``, under the context in force.

        The LM head runs at the labelled positions only (with the model's logit soft-capping, if any); equal to
        the loss of ``llm(input_ids, attention_mask, labels=labels)`` (tested).
        """
        return token_nll(self.llm, self.hidden_states(batch), batch["labels"])

    def token_nll_grouped(self, batch: dict[str, Any], group: int) -> tuple[Tensor, Tensor]:
        """:meth:`token_nll` (under this batch's own injection) for rows in groups of ``group`` sharing a prefix.

        Rows ``g * group ... g * group + group - 1`` are variants of one record (same user, item and prompt) that
        differ only towards the end, as in the forced-choice community test. The shared tokens run once per group
        (:func:`~xrec_pl.models.lm_loss.grouped_hidden_states`). A group whose reserved tokens do not all lie in
        the shared part, or rows that are no such groups, fall back to the plain forward of the whole batch.
        """
        keys = ("user_id", "item_id", "user_pos", "item_pos")
        shared = self._shared_prefixes(batch, group, keys)
        if shared is None:
            with self.injecting(batch):
                return self.token_nll(batch)

        def prefix_context(firsts: Tensor) -> contextlib.AbstractContextManager:
            return self.injecting({key: batch[key][firsts] for key in keys})

        with torch.no_grad():  # scoring only
            hidden = grouped_hidden_states(
                self.llm, batch["input_ids"], batch["attention_mask"], group, shared, prefix_context
            )
        return token_nll(self.llm, hidden, batch["labels"])

    @staticmethod
    def _shared_prefixes(batch: dict[str, Any], group: int, keys: tuple[str, ...]) -> Tensor | None:
        """Tokens each group of ``group`` rows shares ``(G,)``, or ``None`` when the rows are not groups of one
        record (same ``keys``) whose reserved tokens all lie inside a non-empty shared part."""
        rows = batch["input_ids"].shape[0]
        if group < 2 or rows % group:
            return None
        if not all(bool((batch[k].view(-1, group) == batch[k].view(-1, group)[:, :1]).all()) for k in keys):
            return None
        shared = common_prefix_lengths(batch["input_ids"], batch["attention_mask"].sum(1), group)
        reserved = torch.stack([batch["user_pos"], batch["item_pos"]], dim=1).amax(1).view(-1, group)  # (G, group)
        if bool((reserved.amax(1) >= shared).any()) or bool((shared < 1).any()):
            return None
        return shared

    # ------------------------------------------------------------------------------------------ generation
    @contextlib.contextmanager
    def generating(self, batch: dict[str, Any]) -> Iterator[None]:
        """Adapters in eval mode (no dropout, no gate noise) and the batch's injection, for generation."""
        with eval_mode(*self.adapters()), self.injecting(batch):
            yield

    def generate_tokens(
        self, input_ids: Tensor, attention_mask: Tensor, config: Any, decoder: Decoder = "compact"
    ) -> Tensor:
        """New tokens ``(B, N)`` for a left-padded prompt batch ``(B, T)``, under the context in force.

        ``decoder="compact"`` is the KV-cached loop whose finished rows leave the batch
        (:func:`~xrec_pl.models.decoding.greedy_with_config`); ``"hf"`` calls ``llm.generate``. Same tokens (tested).
        ``config`` is a ``GenerationConfig`` (:func:`~xrec_pl.models.decoding.greedy_config`).
        """
        return decode(self.llm, input_ids, attention_mask, config, decoder)
