"""PeftExplainerModule: peft LoRA or peft prompt tuning on the frozen LLM — comparison arms without graph embeddings.

The same frozen LLM, the same prompt and the same training/generation/checkpoint machinery as
:class:`~xrec_pl.lit.explainer.ExplainerModule` (both build on :class:`~xrec_pl.lit.frozen_lm.FrozenLMModule`; nothing
is injected and there is no graph file), so only the parameter-efficient method differs between the arms:

- ``method="lora"``: ``peft.get_peft_model`` adds LoRA matrices to ``target_modules`` (default ``q_proj``/``v_proj``)
  of every decoder layer, in place; the loss and ``generate()`` run through the LLM as usual.
- ``method="prompt_tuning"``: ``num_virtual_tokens`` trainable input embeddings (peft's ``PromptEmbedding``) are
  prepended to every sequence. We do the prepending ourselves (``inputs_embeds`` + an attention mask extended by
  ones) for the loss and for generation, because peft 0.21's cached ``PeftModelForCausalLM.generate()`` returns wrong
  tokens after the first one for prompt tuning. Generation runs the *base* model's ``generate()`` on those
  embeddings with the KV cache; positions come from the attention mask, so a left-padded row reads
  ``[virtual tokens][padding][prompt]`` with the prompt at positions ``P..``, as in training. Tests compare it with
  ``tests/oracles.greedy_uncached`` (no cache, the whole sequence recomputed at each step) and the loss with peft's own forward.

The prompt text is exactly the explainer's (DESIGN §1), reserved tokens included: ``<USER_EMBED>``/``<ITEM_EMBED>``
stay in the text with their new, untrained embeddings (the mean of the vocabulary rows), as in the ``no_injection``
arm. Nothing from the graph reaches the LLM; ``user_pos``/``item_pos``/``user_id``/``item_id`` are ignored.

Trainable parameters are found structurally (the LoRA layers' ``lora_*`` submodules, or peft's prompt encoder);
checkpoints hold exactly those (plus optimizer state) and the method's identity, and loading validates both. LoRA's
own dropout follows the module's train/eval mode while the frozen LLM stays in eval mode.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from xrec_pl import run_layout
from xrec_pl.lit.frozen_lm import FrozenLMModule
from xrec_pl.lit.optim import OptimizerName
from xrec_pl.models.decoding import greedy_with_config, padded_attention_kernels
from xrec_pl.models.explainer import Decoder

__all__ = ["PeftExplainerModule", "PeftMethod", "PromptInit"]

PeftMethod = Literal["lora", "prompt_tuning"]
PromptInit = Literal["vocab", "text", "random"]
# The explainer's switches as these arms' checkpoints have always recorded them (nothing injected, no adapter), so
# that checkpoints stay comparable with the explainer's and loadable across versions.
_EXPLAINER_IDENTITY = {"adapter": "none", "injection": "none", "graph_dim": 64, "num_experts": None}


class PeftExplainerModule(FrozenLMModule):
    """Frozen LLM + peft LoRA or prompt tuning, trained on the explainer's prompts (no graph embeddings).

    Args:
        method: ``"lora"`` or ``"prompt_tuning"``.
        llm: ``"embedded"`` (SmolLM2-135M-Instruct), ``"tiny-random"``, ``"tiny-random-gqa"``, a hub id or a path.
        llm_dtype: ``"auto"``, ``"fastest"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_dropout: dropout on the LoRA branch input (active in training only).
        target_modules: module names (suffixes) that get LoRA, e.g. ``["q_proj", "v_proj"]``.
        num_virtual_tokens: length of the trained soft prompt (prompt tuning).
        prompt_init: soft-prompt initialisation: ``"vocab"`` (embeddings of random vocabulary tokens),
            ``"text"`` (the embeddings of ``prompt_init_text``, repeated/cut to length) or ``"random"`` (``N(0, 1)``,
            far larger than the LLM's embeddings).
        prompt_init_text: text for ``prompt_init="text"``.
        lr: learning rate.
        weight_decay: decoupled weight decay (AdamW) / L2 (Adam).
        optimizer: ``"adamw"`` or ``"adam"``.
        warmup_steps: linear learning-rate warmup over this many optimizer steps (0: constant).
        decay_steps: linear decay of the learning rate towards zero over the last this-many optimizer steps of the
            run (warmup-stable-decay; 0: constant to the end). A run trained at a constant rate may be resumed with a
            decay that starts at or after its checkpoint's step (a cooldown); anything else is refused.
        max_new_tokens: generation budget per explanation.
        decoder: ``"compact"`` or ``"hf"`` (see :class:`~xrec_pl.lit.explainer.ExplainerModule`).
        gradient_checkpointing: recompute decoder layers in backward (non-reentrant).
        predictions_file: file name of the predictions JSONL written into ``trainer.default_root_dir``.
        seed: seed of the LLM's new token rows (as the explainer's); the peft weights use the global RNG.
    """

    # the method and its shape first, then the explainer's switches (all "none" here)
    IDENTITY_KEYS = ("method", "lora_r", "lora_alpha", "target_modules", "num_virtual_tokens", *_EXPLAINER_IDENTITY)

    def __init__(
        self,
        method: PeftMethod = "lora",
        llm: str = "embedded",
        llm_dtype: str = "auto",
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
        num_virtual_tokens: int = 20,
        prompt_init: PromptInit = "vocab",
        prompt_init_text: str = "Explain why the user would enjoy the item.",
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.check_hparams({"method": PeftMethod, "prompt_init": PromptInit})
        self.init_frozen_llm(llm, llm_dtype, seed)
        self.enable_gradient_checkpointing()
        import peft

        if method == "lora":
            config = peft.LoraConfig(
                task_type="CAUSAL_LM",
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=list(target_modules),
                bias="none",
            )
        else:
            init = {"vocab": "SAMPLE_VOCAB", "text": "RANDOM", "random": "RANDOM"}[prompt_init]
            config = peft.PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=init
            )
        self.llm = peft.get_peft_model(self.llm, config)
        if method == "prompt_tuning" and prompt_init == "text":
            self._init_prompt_from_text(prompt_init_text)
        self.llm.eval()
        self.train(self.training)  # LoRA dropout follows the module's mode
        n_train = sum(p.numel() for p in self.adapter_parameters())
        rank_zero_info(f"PeftExplainerModule: method={method}, {n_train:,} trainable parameters")

    # ------------------------------------------------------------------------------------------ peft pieces
    def _lora_layers(self) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.llm.modules() if isinstance(m, LoraLayer)]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, found structurally: the LoRA matrices or the soft-prompt embedding."""
        if self.hparams.method == "prompt_tuning":
            return list(self.llm.prompt_encoder.parameters())
        return [
            p
            for layer in self._lora_layers()
            for name in layer.adapter_layer_names
            for p in getattr(layer, name).parameters()
        ]

    @property
    def trains_anything(self) -> bool:
        return True

    def describe_arm(self) -> str:
        return f"peft {self.hparams.method} (no graph embeddings)"

    def _init_prompt_from_text(self, text: str) -> None:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("prompt_init_text tokenises to nothing")
        n = self.hparams.num_virtual_tokens
        ids = torch.tensor((ids * (n // len(ids) + 1))[:n], device=self.llm.word_embeddings.weight.device)
        weight = self.llm.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            weight.copy_(self.llm.word_embeddings(ids).to(weight.dtype))

    def with_virtual_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs_embeds (B, P+T, H), attention_mask (B, P+T))``: the soft prompt prepended (``P = 0`` for LoRA)."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, H)
        if self.hparams.method != "prompt_tuning":
            return embeds, attention_mask
        prompts = self.llm.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)  # (B, P, H)
        ones = attention_mask.new_ones(input_ids.shape[0], prompts.shape[1])
        return torch.cat([prompts, embeds], dim=1), torch.cat([ones, attention_mask], dim=1)

    # ------------------------------------------------------------------------------------------ loss and generation
    def lm_hidden_states(self, batch: dict[str, Any]) -> Tensor:
        if self.hparams.method != "prompt_tuning":
            return super().lm_hidden_states(batch)  # LoRA acts inside the decoder
        embeds, mask = self.with_virtual_tokens(batch["input_ids"], batch["attention_mask"])
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        return hidden[:, self.hparams.num_virtual_tokens :]  # (B, T, H): virtual positions carry no labels

    def generate_tokens(self, input_ids: Tensor, attention_mask: Tensor, config: Any) -> Tensor:
        if self.hparams.method != "prompt_tuning":
            return super().generate_tokens(input_ids, attention_mask, config)
        embeds, mask = self.with_virtual_tokens(input_ids, attention_mask)
        base = self.llm.get_base_model()
        if self.hparams.get("decoder", "compact") == "compact":
            return greedy_with_config(base, config, mask, inputs_embeds=embeds)
        # generating from inputs_embeds alone returns only the new tokens (B, N)
        with padded_attention_kernels(embeds.device):
            return base.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)

    # ------------------------------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> PeftExplainerModule:
        """The frozen LLM stays in eval mode; only LoRA's own dropout follows ``mode``."""
        super().train(mode)
        for layer in self._lora_layers() if "llm" in self._modules else ():
            layer.lora_dropout.train(mode)
        return self

    # ------------------------------------------------------------------------------------------ checkpoints
    def arm_identity(self) -> dict[str, Any]:
        hp = self.hparams
        lora = hp.method == "lora"
        return {
            **_EXPLAINER_IDENTITY,
            "method": hp.method,
            "lora_r": hp.lora_r if lora else None,
            "lora_alpha": hp.lora_alpha if lora else None,
            "target_modules": sorted(hp.target_modules) if lora else None,
            "num_virtual_tokens": None if lora else hp.num_virtual_tokens,
        }
