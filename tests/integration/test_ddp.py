"""DDP with 2 CPU processes (gloo, ``ddp_fork``) for both stages: training completes, validation metrics equal the
single-process ones, and run-folder files (embeddings, metrics.json, predictions) are written once, by rank zero.

``ddp_fork`` (not ``ddp``, which would re-run the pytest session; not ``ddp_spawn``, which re-imports everything):
the workers inherit this process, including the write counters patched in below.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

pytestmark = pytest.mark.integration  # ~5 s: forked workers, tiny models


def _trainer(root: Path, devices: int, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        **kwargs,
    )


@pytest.fixture
def write_log(tmp_path, monkeypatch):
    """Count calls of the run-folder writers, across forked ranks (one appended line per call)."""
    log = tmp_path / "writes.log"

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            with open(log, "a") as f:
                f.write(f"{name} {os.getpid()}\n")
            return fn(*args, **kwargs)

        return wrapper

    import callbacks.embedding_export as export
    import callbacks.run_artifacts as artifacts
    import xrec_pl.lit.generation as generation

    monkeypatch.setattr(export, "save_embeddings", counting("embeddings", export.save_embeddings))
    monkeypatch.setattr(artifacts, "dump_json", counting("metrics", artifacts.dump_json))
    monkeypatch.setattr(generation, "write_jsonl", counting("predictions", generation.write_jsonl))
    return lambda: sorted(line.split()[0] for line in log.read_text().splitlines()) if log.exists() else []


def _close(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-9), key


def test_stage1_ddp_fit_and_metrics_equal_single(synthetic_dir, tmp_path, write_log):
    from callbacks.embedding_export import EmbeddingExport
    from callbacks.run_artifacts import MetricsJson
    from data_modules.graph import InteractionDataModule
    from xrec_pl.lit.recommender import LightGCNModule

    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = LightGCNModule(dim=16, num_layers=2, lr=0.01)
    dm = InteractionDataModule(str(synthetic_dir), batch_size=64, eval_batch_size=7)  # uneven val shards
    ddp = _trainer(tmp_path / "ddp", 2, max_epochs=1, callbacks=[EmbeddingExport(source="last"), MetricsJson()])
    ddp.fit(module, dm)  # the main process gets rank zero's weights back (not its loop counters)
    assert ddp.state.finished
    assert (tmp_path / "ddp" / "embeddings.safetensors").is_file()
    assert write_log() == ["embeddings", "metrics"]  # once each, rank zero only

    dm = InteractionDataModule(str(synthetic_dir), batch_size=64, eval_batch_size=7)
    single = _trainer(tmp_path / "single", 1).validate(module, dm)[0]
    multi = _trainer(tmp_path / "multi", 2).validate(module, dm)[0]
    keys = [k for k in single if k.startswith("val/")]
    assert {"val/recall@20", "val/ndcg@20"} <= set(keys)
    _close(multi, single, keys)


def test_stage2_ddp_fit_val_loss_equal_single_and_predictions_once(synthetic_dir, tmp_path, write_log):
    import json

    from data_modules.explanations import ExplanationDataModule
    from xrec_pl.lit.explainer import ExplainerModule

    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = ExplainerModule(llm="tiny-random", embedding_source="random", lr=1e-2, max_new_tokens=4)

    def dm():
        return ExplanationDataModule(str(synthetic_dir), batch_size=4, eval_batch_size=3)  # 10 val records: uneven

    before = [p.detach().clone() for p in module.adapter_parameters()]
    fit = _trainer(tmp_path / "ddp", 2, max_steps=3, limit_val_batches=0)
    fit.fit(module, dm())
    assert fit.state.finished
    assert any(not torch.equal(a, b) for a, b in zip(before, module.adapter_parameters()))  # rank zero's weights

    single = _trainer(tmp_path / "single", 1).validate(module, dm())[0]
    multi = _trainer(tmp_path / "multi", 2).validate(module, dm())[0]
    _close(multi, single, ["val/loss"])

    _trainer(tmp_path / "pred", 2).predict(module, dm(), return_predictions=False)
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and len({(r["uid"], r["iid"], r["reference"]) for r in rows}) == len(rows)
    assert write_log() == ["predictions"]
