"""Embedding-swap test: does the collaborative embedding of *this* user / item reach the text?

For every record of a split, the mean token NLL of its reference explanation is computed three times, on the same
batches: with its own (user, item) vectors, with another record's user (item kept), and with another record's item
(user kept). "Another" comes from a seeded derangement of the records, repaired so that the partner's user (item)
id differs from the record's own. The differences ``swapped - own`` are paired per record (bootstrap CI, paired t,
Wilcoxon). A positive mean difference means the model explains a record better with its own embeddings.

Optionally (``generate > 0``) the first ``generate`` records (of a seeded order) are also generated three times, and
the change in text is scored with BERTScore between the own-embedding generation and each swapped one (1.0 = the
swap changed nothing).

Arms without per-id embeddings (``fixed``), or without adapters, give exactly zero difference: the injected vectors
are identical, so the computation is. That is the test's own sanity check.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from xrec_pl.metrics.significance import compare_paired
from xrec_pl.tools.analysis.run import LoadedRun, adapter_vectors, record_nll, teacher_batches

__all__ = ["derangement", "swap_partners", "swap_test"]

KINDS = ("user", "item")


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (Sattolo's single cycle; identity for ``n < 2``)."""
    perm = np.arange(n)
    rng = np.random.default_rng(seed)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: one cycle, no fixed point
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def swap_partners(ids: np.ndarray, seed: int, max_rounds: int = 100) -> np.ndarray:
    """Partner record of every record, from a seeded derangement, such that ``ids[partner] != ids`` where possible.

    Records whose partner shares their id are re-paired by exchanging partners with a random other record when the
    exchange fixes one and breaks none. Records that cannot be re-paired (e.g. one id everywhere) keep their partner.
    """
    ids = np.asarray(ids)
    n = ids.size
    perm = derangement(n, seed)
    rng = np.random.default_rng(seed + 1)
    for _ in range(max_rounds):
        bad = np.flatnonzero(ids[perm] == ids)
        if bad.size == 0:
            break
        for i in bad:
            for j in rng.permutation(n)[: min(n, 64)]:
                if j == i:
                    continue
                a, b = perm[j], perm[i]  # exchanged partners
                if a != i and b != j and ids[a] != ids[i] and ids[b] != ids[j]:
                    perm[i], perm[j] = a, b
                    break
    return perm


def _summary(own: np.ndarray, swapped: np.ndarray, seed: int) -> dict[str, Any]:
    out = compare_paired(swapped, own, seed=seed)  # mean_diff = swapped - own
    diff = swapped - own
    out["mean_own"] = out.pop("mean_b")
    out["mean_swapped"] = out.pop("mean_a")
    out["share_worse_when_swapped"] = float((diff > 0).mean()) if diff.size else float("nan")
    out["max_abs_diff"] = float(np.abs(diff).max()) if diff.size else float("nan")
    return out


@torch.no_grad()
def swap_test(
    run: LoadedRun,
    split: str = "tst",
    seed: int = 0,
    generate: int = 0,
    precision: str = "32",
    bertscore_kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the swap test on ``split`` of a loaded run.

    Args:
        run: from :func:`xrec_pl.tools.analysis.run.load_run`.
        split: ``tst`` or ``val``.
        seed: seed of the derangements (user and item partners use ``seed`` and ``seed + 1``).
        generate: also generate for this many records (0: NLL only) and report BERTScore own-vs-swapped text.
        precision: ``"32"`` or ``"bf16-mixed"``.
        bertscore_kwargs: options for the BERTScore metric (backbone etc.).

    Returns:
        ``(summary, rows)``: the summary dict (per swap kind: paired statistics of the NLL, optionally BERTScore),
        and one row per record (``index, uid, iid, partner uids/iids, nll_own, nll_user_swap, nll_item_swap``).
    """
    module = run.module
    started = time.perf_counter()
    batches = list(teacher_batches(run, split))
    index = torch.cat([b["index"] for b in batches]).numpy()
    uid = torch.cat([b["user_id"] for b in batches]).numpy()
    iid = torch.cat([b["item_id"] for b in batches]).numpy()
    references = [text for b in batches for text in b["reference"]]
    order = np.argsort(index, kind="stable")  # partners are drawn over records in file order
    partner_pos = {"user": np.empty_like(order), "item": np.empty_like(order)}
    for k, (kind, ids) in enumerate((("user", uid), ("item", iid))):
        perm = swap_partners(ids[order], seed + k)
        partner_pos[kind][order] = order[perm]  # batch-concatenated position of each record's partner
    swapped_uid = uid[partner_pos["user"]]
    swapped_iid = iid[partner_pos["item"]]

    nll = {"own": [], "user": [], "item": []}
    start = 0
    for batch in batches:
        size = batch["input_ids"].shape[0]
        sl = slice(start, start + size)
        start += size
        own_u, own_i = batch["user_id"], batch["item_id"]
        variants = {
            "own": (own_u, own_i),
            "user": (torch.as_tensor(swapped_uid[sl]), own_i),
            "item": (own_u, torch.as_tensor(swapped_iid[sl])),
        }
        for name, (u, i) in variants.items():
            nll[name].append(record_nll(module, batch, adapter_vectors(module, u, i), precision).numpy())
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in nll.items()}

    summary: dict[str, Any] = {
        "split": split,
        "n": int(index.size),
        "seed": seed,
        "embedding_source": module.hparams.embedding_source,
        "injection": module.hparams.injection,
        "adapter": module.hparams.adapter,
        "checkpoint": str(run.checkpoint),
        "precision": precision,
        "user_partner_same_id": int((swapped_uid == uid).sum()),
        "item_partner_same_id": int((swapped_iid == iid).sum()),
        "nll": {kind: _summary(arrays["own"], arrays[kind], seed) for kind in KINDS},
    }
    rows = [
        {
            "index": int(index[p]),
            "uid": int(uid[p]),
            "iid": int(iid[p]),
            "swap_uid": int(swapped_uid[p]),
            "swap_iid": int(swapped_iid[p]),
            "nll_own": float(arrays["own"][p]),
            "nll_user_swap": float(arrays["user"][p]),
            "nll_item_swap": float(arrays["item"][p]),
            "reference": references[p],
        }
        for p in order
    ]
    if generate > 0:
        summary["generation"] = _generation_change(run, split, rows, generate, seed, bertscore_kwargs or {})
    summary["wall_s"] = time.perf_counter() - started
    return summary, rows


def _generation_change(
    run: LoadedRun,
    split: str,
    rows: list[dict[str, Any]],
    limit: int,
    seed: int,
    bertscore_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Generate with own / swapped vectors for ``limit`` seeded records; BERTScore between the texts (in ``rows``)."""
    module = run.module
    chosen = sorted(np.random.default_rng(seed).permutation(len(rows))[:limit].tolist())
    by_index = {rows[i]["index"]: rows[i] for i in chosen}
    texts: dict[str, dict[int, str]] = {"own": {}, "user": {}, "item": {}}
    for batch in run.datamodule.generation_dataloader(split, indices=sorted(by_index)):
        recs = [by_index[int(x)] for x in batch["index"].tolist()]
        variants = {
            "own": batch,
            "user": {**batch, "user_id": torch.tensor([r["swap_uid"] for r in recs])},
            "item": {**batch, "item_id": torch.tensor([r["swap_iid"] for r in recs])},
        }
        for name, variant in variants.items():
            for r, text in zip(recs, module.generate_explanations(variant)):
                texts[name][r["index"]] = text
    keys = sorted(by_index)
    own = [texts["own"][k] for k in keys]
    references = [by_index[k]["reference"] for k in keys]
    for k in keys:
        by_index[k]["generation_own"] = texts["own"][k]
    own_vs_ref = _bertscore_f1(own, references, bertscore_kwargs)
    out: dict[str, Any] = {"n": len(keys), "bertscore_f1_vs_reference_own": float(np.mean(own_vs_ref["f1"]))}
    out["backbone"] = own_vs_ref["backbone"]
    usable = [j for j, t in enumerate(own) if t.strip()]  # an empty own text cannot serve as a BERTScore reference
    for kind in KINDS:
        swapped = [texts[kind][k] for k in keys]
        vs_ref = _bertscore_f1(swapped, references, bertscore_kwargs)["f1"]
        vs_own = np.full(len(keys), np.nan)
        if usable:
            scores = _bertscore_f1([swapped[j] for j in usable], [own[j] for j in usable], bertscore_kwargs)["f1"]
            vs_own[usable] = scores
        for j, k in enumerate(keys):
            by_index[k][f"generation_{kind}_swap"] = swapped[j]
            by_index[k][f"bertscore_f1_own_vs_{kind}_swap"] = float(vs_own[j])
        out[kind] = {
            "identical_text_share": float(np.mean([a == b for a, b in zip(own, swapped)])) if keys else float("nan"),
            "bertscore_f1_own_vs_swap": float(np.nanmean(vs_own)) if usable else float("nan"),
            "empty_own": len(keys) - len(usable),
            # paired: F1 against the reference, swapped minus own (negative: the swap hurts the metric)
            "bertscore_f1_vs_reference": compare_paired(vs_ref, own_vs_ref["f1"], seed=seed),
        }
    return out


def _bertscore_f1(predictions: list[str], references: list[str], options: dict[str, Any]) -> dict[str, Any]:
    from xrec_pl.tools.evaluate import evaluate

    res = evaluate(predictions, references, metrics=("bertscore",), per_sample=True, bertscore=options)
    return {"f1": np.asarray(res["per_sample"]["bertscore_f1"], dtype=np.float64), "backbone": res["backbones"]}
