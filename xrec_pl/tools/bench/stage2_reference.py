"""The reference-style side of the stage-2 bench: XRec's explainer loop re-implemented for the comparison.

One record per step, tokenised inside the step, eager attention, full-vocabulary logits, in-place injection into the
q/k/v states (see :mod:`xrec_pl.tools.bench.stage2`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --------------------------------------------------------------------------------------------------------------------
# reference-style implementation (written for the comparison; mirrors XRec's explainer loop)
class _InPlaceInjector:
    """XRec-style injection: in-place assignment into the input embeddings and ``+=`` into the 4-D q/k/v states."""

    def __init__(self, llm: nn.Module) -> None:
        from xrec_pl.models.injection import find_projections

        cfg = llm.config
        self.hidden = int(cfg.hidden_size)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // cfg.num_attention_heads)
        self.llm = llm
        self.projections = [proj for _, proj in find_projections(llm)]
        self.positions: list[int] = []
        self.vectors: Tensor | None = None  # (2, H)
        self.handles: list[Any] = []

    def __enter__(self) -> _InPlaceInjector:
        self.handles.append(self.llm.get_input_embeddings().register_forward_hook(self._embedding_hook))
        self.handles += [p.register_forward_hook(self._projection_hook) for p in self.projections]
        self._attn = self.llm.config._attn_implementation
        self.llm.set_attn_implementation("eager")  # XRec's modified attention was the eager one
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.llm.set_attn_implementation(self._attn)

    def _embedding_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.vectors is None or output.shape[1] <= 1:
            return None
        for slot, pos in enumerate(self.positions):
            output[:, pos] = self.vectors[slot].to(output.dtype)
        return None

    def _projection_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.vectors is None or output.shape[1] <= 1:
            return None
        b, t, width = output.shape
        states = output.view(b, t, width // self.head_dim, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)
        for slot, pos in enumerate(self.positions):
            vec = self.vectors[slot]  # (H,)
            if width != self.hidden:  # grouped-query rule of this project (XRec's is undefined there)
                vec = F.linear(vec, module.weight)
            states[:, :, pos, :] += vec.to(states.dtype).view(width // self.head_dim, self.head_dim)
        return None


def reference_train(module, builder, records: list[dict], adapters, opt, device: str) -> None:
    user_adapter, item_adapter = adapters
    llm = module.llm
    with _InPlaceInjector(llm) as inj:
        for rec in records:
            enc = builder.encode_train(rec)  # per-sample tokenisation inside the step
            input_ids = torch.tensor([enc["input_ids"]], device=device)
            labels = torch.tensor([enc["labels"]], device=device)
            uid = torch.tensor([int(rec["uid"])], device=device)
            iid = torch.tensor([int(rec["iid"])], device=device)
            user_vec, item_vec = module.graph_vectors(uid, iid)
            inj.vectors = torch.cat([user_adapter(user_vec), item_adapter(item_vec)], 0)  # (2, H)
            inj.positions = [enc["user_pos"], enc["item_pos"]]
            loss = llm(input_ids=input_ids, labels=labels, use_cache=False).loss  # full-vocabulary logits
            opt.zero_grad()
            loss.backward()
            opt.step()
            inj.vectors = None


@torch.no_grad()
def reference_generate(module, builder, records: list[dict], max_new_tokens: int, device: str) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=module.stop_ids(),
        pad_token_id=module.tokenizer.pad_token_id,
        suppress_tokens=sorted(set(module.llm_info.reserved_token_ids.values())),
    )
    if not module.llm.get_output_embeddings().weight.is_contiguous():  # the reference is transformers' usual layout
        raise RuntimeError("the reference loop must run the LLM's row-major weights (a decoding layout is held)")
    outs = []
    adapters = [module.user_adapter, module.item_adapter]
    modes = [a.training for a in adapters]
    for a in adapters:
        a.eval()  # no dropout / gate noise while generating (as generate_explanations)
    with _InPlaceInjector(module.llm) as inj:
        for rec in records:
            enc = builder.encode_prompt(rec)
            input_ids = torch.tensor([enc["input_ids"]], device=device)
            uid = torch.tensor([int(rec["uid"])], device=device)
            iid = torch.tensor([int(rec["iid"])], device=device)
            user_vec, item_vec = module.graph_vectors(uid, iid)
            inj.vectors = torch.cat([module.user_adapter(user_vec), module.item_adapter(item_vec)], 0)
            inj.positions = [enc["user_pos"], enc["item_pos"]]
            out = module.llm.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
            )
            outs.append(out[0, input_ids.shape[1] :].tolist())
            inj.vectors = None
    for a, mode in zip(adapters, modes):
        a.train(mode)
    return outs
