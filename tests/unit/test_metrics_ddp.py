"""Two CPU processes (gloo on 127.0.0.1): synced metrics and the callback equal the single-process results."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from callbacks.explanation_metrics import ExplanationMetricsCallback, shard_indices
from tests.unit.test_explanation_callback import FakeDataModule, FakeExplainer
from tests.unit.test_metrics import FakeScorer
from xrec_pl.metrics import USR, BERTScore

WORLD = 2
PREDS = ["a fun book", "a fun book", "dark thriller", "space opera", "romance", "cooking", "a fun book"]
REFS = ["fun book", "a book", "a thriller", "opera", "a romance", "home cooking", "books"]


def _metrics():
    return [USR(), BERTScore(scorer=FakeScorer())]


def _scores(metrics) -> dict[str, float]:
    out = {}
    for m in metrics:
        out.update(m.compute())
    return out


def _single_process() -> dict[str, dict]:
    metrics = _metrics()
    for m in metrics:
        m.update(PREDS, REFS, ids=range(len(PREDS)))
    empty = _metrics()
    for m in empty:
        m.update(PREDS[:3], REFS[:3], ids=[0, 1, 2])
    cb = ExplanationMetricsCallback(num_samples=9, metrics=("usr", "bertscore"))
    cb.metric_kwargs = {"bertscore": {"scorer": FakeScorer()}}
    cb_scores, cb_rows = cb.generate_and_score(FakeExplainer().eval(), FakeDataModule())
    return {"padded": _scores(metrics), "empty_rank": _scores(empty), "callback": cb_scores, "rows": cb_rows}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = {}
        # 1. DistributedSampler-style shards: rank 1 gets a padded duplicate of sample 0, in small batches
        metrics = _metrics()
        shard = shard_indices(range(len(PREDS)), rank, WORLD)
        for start in range(0, len(shard), 2):
            idx = shard[start : start + 2]
            for m in metrics:
                m.update([PREDS[i] for i in idx], [REFS[i] for i in idx], ids=idx)
        result["padded"] = _scores(metrics)
        result["samples"] = {k: v.tolist() for k, v in metrics[1].sample_scores().items()}
        # 2. a rank without any sample (int64 ids and hashes must survive the gather)
        empty = _metrics()
        if rank == 0:
            for m in empty:
                m.update(PREDS[:3], REFS[:3], ids=[0, 1, 2])
        result["empty_rank"] = _scores(empty)
        # 3. the callback's generate -> update -> synced compute path, and the row gather for the table
        cb = ExplanationMetricsCallback(num_samples=9, metrics=("usr", "bertscore"))
        cb.metric_kwargs = {"bertscore": {"scorer": FakeScorer()}}
        scores, rows = cb.generate_and_score(FakeExplainer().eval(), FakeDataModule(), rank, WORLD)
        result["callback"] = scores
        result["rows"] = cb._gather_rows(SimpleNamespace(world_size=WORLD), rows)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_sync_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))  # loopback only
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected = _single_process()
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # bit-identical: dedup by id + sort by id gives the same samples in the same order
        assert got["padded"] == expected["padded"]
        assert got["empty_rank"] == expected["empty_rank"]
        assert got["callback"] == expected["callback"]
        assert got["samples"]["sample_id"] == list(range(len(PREDS)))
    assert expected["padded"]["usr_n"] == len(PREDS) and expected["padded"]["usr"] == pytest.approx(5 / 7)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["rows"] == sorted(expected["rows"], key=lambda r: r["index"])
