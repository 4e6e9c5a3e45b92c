"""Does the explainer know the user's hidden community? A forced-choice likelihood test on synthetic data.

On the synthetic dataset the last sentence of every explanation names the user's community, which only the
interaction graph reveals (``xrec_pl.data.synthetic``). Whether greedy generation *writes* that sentence depends on
how far training has got with the rest of the template; this test asks the model directly. For each record of a
split, the reference explanation is scored (teacher-forced, with the record's injection) once with each community
name in place of the true one. A language model prefers some names whatever the record (their prior), so each
name's negative log-likelihood is first centred on its mean over the tested records; the record counts as correct
when the true name then has the lowest value (``correct``; without centring: ``correct_raw``). The centring uses no
labels. Chance is ``1 / #communities``; a model whose collaborative input carries no community information (fixed
or random embeddings) stays near it, since the community is independent of everything in the text.

``CommunityChoice`` runs the test at the end of ``predict`` (the weights being predicted with) when the data folder
has a ``meta.json`` with ``communities`` (written by ``xrec-pl make-synthetic``) and writes
``<run>/community_choice.jsonl``: ``uid, iid, truth, chosen, correct, correct_raw, nll`` per record. Elsewhere it does nothing.
``xrec-pl pipeline`` adds the accuracy (``community_choice``) and the per-record hits to its metrics, so suites report
it with a paired significance test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from xrec_pl import run_layout
from xrec_pl.metrics.phrase import find_phrases
from xrec_pl.utils import write_jsonl


def read_communities(data_dir: str | Path) -> list[str] | None:
    """The community names of a synthetic data folder (``meta.json``), or ``None`` for any other dataset."""
    meta = Path(data_dir) / "meta.json"
    if not meta.is_file():
        return None
    try:
        names = json.loads(meta.read_text()).get("communities")
    except (json.JSONDecodeError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and len(names) > 1 else None


def _find(text: str, phrases: list[str]) -> int | None:
    hits = find_phrases(text, phrases)
    return hits.pop() if len(hits) == 1 else None


def _swap(text: str, old: str, new: str) -> str:
    start = text.lower().index(old.lower())
    return text[:start] + new + text[start + len(old) :]


@torch.no_grad()
def sequence_nll(module: Any, batch: dict[str, Any], group: int = 1) -> Tensor:
    """Summed negative log-likelihood of each row's labelled tokens ``(B,)``, with the row's injection.

    ``group > 1``: the rows come in groups of variants of one record that share their start (the community test's
    four versions of one explanation); a module with ``token_nll_grouped`` then runs each group's shared tokens once.
    """
    batch = {k: (v.to(module.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    if group > 1 and hasattr(module, "token_nll_grouped"):
        nll, rows = module.token_nll_grouped(batch, group)
    else:
        with module.injecting_batch(batch):
            nll, rows = module.token_nll(batch)  # (N,), (N,)
    return torch.zeros(batch["labels"].shape[0], dtype=nll.dtype, device=nll.device).index_add_(0, rows, nll)


def community_choice(
    module: Any, datamodule: Any, phrases: list[str], split: str = "tst", batch_size: int = 16, subset: bool = False
) -> list[dict[str, Any]]:
    """Forced-choice test over the (subset of the) ``split`` records; one result row per record naming a community.

    Args:
        module: an ``ExplainerModule`` (eval mode is set for the test and restored).
        datamodule: the ``ExplanationDataModule`` (set up; its builder encodes the variants).
        phrases: the community names.
        split: ``"tst"``, ``"val"`` or ``"trn"``.
        batch_size: sequences per forward pass (each record gives ``len(phrases)``; rounded down to whole records,
            at least one). The variants of a record share every token before the community's name, which runs once
            per record (``token_nll_grouped``, where the module has it).
        subset: test only the DataModule's ``eval_subset`` of the split (default: every record; the test is cheap,
            forward passes only, so it can use more records than generation does).
    """
    from data_modules.batching import PadCollator

    builder = datamodule.prompt_builder
    collate = PadCollator(datamodule.pad_id, side="right")
    items, meta = [], []
    rows = datamodule.subset_rows(split) if subset else range(datamodule.num_records(split))
    for row in [int(r) for r in rows]:
        record = datamodule.record(split, row)
        truth = _find(str(record["explanation"]), phrases)
        if truth is None or phrases[truth].lower() not in str(record["explanation"]).lower():
            continue  # no single community named (verbatim): nothing to swap
        meta.append((int(record["uid"]), int(record["iid"]), truth))
        for phrase in phrases:
            variant = {**record, "explanation": _swap(str(record["explanation"]), phrases[truth], phrase)}
            enc = builder.encode_train(variant)
            enc.update(user_id=int(record["uid"]), item_id=int(record["iid"]), index=int(row))
            items.append(enc)
    was_training = module.training
    module.eval()
    try:
        k = len(phrases)
        step = max(1, batch_size // k) * k
        scores = [sequence_nll(module, collate(items[i : i + step]), k) for i in range(0, len(items), step)]
    finally:
        module.train(was_training)
    if not meta:
        return []
    nll = torch.cat(scores).view(len(meta), len(phrases)).double().cpu()  # (R, K)
    raw = nll.argmin(1).tolist()
    # calibrated: remove each name's own prior (its mean NLL over the records) so only record-specific evidence counts
    chosen = (nll - nll.mean(0, keepdim=True)).argmin(1).tolist() if len(meta) > 1 else raw
    return [
        {
            "uid": uid,
            "iid": iid,
            "truth": phrases[t],
            "chosen": phrases[c],
            "correct": float(c == t),
            "correct_raw": float(r == t),
            "nll": row,
        }
        for (uid, iid, t), c, r, row in zip(meta, chosen, raw, nll.tolist())
    ]


class CommunityChoice(pl.Callback):
    """Run :func:`community_choice` after ``predict`` on synthetic data; write ``<run>/community_choice.jsonl``.

    Args:
        split: the split to test (default: the test split, which ``predict`` generates for).
        batch_size: sequences per forward pass.
        subset: only the DataModule's ``eval_subset`` of the split (default: all its records).
    """

    def __init__(self, split: str = "tst", batch_size: int = 16, subset: bool = False) -> None:
        self.split = split
        self.batch_size = batch_size
        self.subset = subset

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        phrases = read_communities(getattr(dm, "data_dir", "")) if dm is not None else None
        if phrases is None or not trainer.is_global_zero or not hasattr(pl_module, "token_nll"):
            return
        with trainer.precision_plugin.forward_context():
            rows = community_choice(pl_module, dm, phrases, self.split, self.batch_size, self.subset)
        path = Path(trainer.default_root_dir) / run_layout.COMMUNITY_CHOICE
        write_jsonl(path, rows)
        if rows:
            accuracy = sum(r["correct"] for r in rows) / len(rows)
            rank_zero_info(f"community choice: {accuracy:.3f} of {len(rows)} records (chance {1 / len(phrases):.3f})")
