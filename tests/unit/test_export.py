"""xrec-pl export: adapters + tables as safetensors/JSON, loaded back without the run; peft arms in peft's layout."""

from __future__ import annotations

import json
import pickle

import lightning.pytorch as pl
import pytest
import torch

from data_modules.explanations import ExplanationDataModule
from tests.fixtures.data import random_embeddings_file
from tests.helpers import quiet_trainer
from tests.unit.test_analysis import _train_run
from xrec_pl.cli import main
from xrec_pl.errors import DataError, LLMLoadError
from xrec_pl.models.export import CONFIG_FILE, WEIGHTS_FILE, load_exported, read_export_config
from xrec_pl.tools.analysis.run import load_run, record_nll, teacher_batches
from xrec_pl.tools.export import export


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one torch thread."""


@pytest.fixture(scope="module")
def runs(synthetic_dir, tmp_path_factory):
    emb = random_embeddings_file(tmp_path_factory.mktemp("emb"), dim=16)
    base = tmp_path_factory.mktemp("runs")
    return {
        source: _train_run(base / source, synthetic_dir, emb, source, llm, steps=3)
        for source, llm in (("graph", "tiny-random-gqa"), ("fixed", "tiny-random"), ("random", "tiny-random"))
    }


@pytest.mark.parametrize("source", ["graph", "fixed", "random"])
def test_exported_adapters_score_like_the_run(runs, source, tmp_path):
    out = tmp_path / "export"
    export(str(runs[source]), str(out))
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]
    config = read_export_config(out)
    assert config["embedding_source"] == source and config["num_experts"] == 2 and config["graph_dim"] == 16
    assert config["trained"]["global_step"] == 3 and "moe_adapter" in config["arithmetic"]

    run = load_run(runs[source])
    net = load_exported(out)
    batch = next(teacher_batches(run, "tst"))
    ids = batch["user_id"], batch["item_id"]
    assert torch.equal(net.adapted_vectors(*ids), run.module.net.adapted_vectors(*ids))
    want = record_nll(run.module, batch, run.module.net.adapted_vectors(*ids))
    run.module.injector.remove()
    got = record_nll(net, batch, net.adapted_vectors(*ids))
    assert torch.allclose(got, want, atol=1e-6)


def test_export_refuses_what_it_cannot_write_or_read(runs, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--run", str(runs["graph"]), "--out", str(out)]) == 0
    before = (out / WEIGHTS_FILE).read_bytes()
    assert main(["export", "--run", str(runs["fixed"]), "--out", str(out)]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert (out / WEIGHTS_FILE).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert main(["export", "--run", str(runs["fixed"]), "--out", str(tmp_path / "link")]) == 2
    assert "is a link" in capsys.readouterr().err and not any((tmp_path / "elsewhere").iterdir())

    with pytest.raises(LLMLoadError, match="does not match"):
        load_exported(out, llm="tiny-random")  # trained on tiny-random-gqa

    config = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**config, "graph_dim": 8}))
    with pytest.raises(DataError, match="shape"):
        load_exported(out)
    (out / CONFIG_FILE).write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(DataError, match="not an xrec-pl adapter export"):
        load_exported(out)


class _Payload:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_in_place_of_the_weights_never_runs(runs, tmp_path):
    out = tmp_path / "export"
    export(str(runs["graph"]), str(out))
    marker = tmp_path / "pwned"
    (out / WEIGHTS_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DataError, match="safetensors"):
        load_exported(out)
    assert not marker.exists()


def test_peft_arm_exports_in_peft_layout(synthetic_dir, tmp_path):
    import peft

    from xrec_pl.lit.peft_explainer import PeftExplainerModule
    from xrec_pl.models.llm import load_frozen_llm

    pl.seed_everything(0)
    module = PeftExplainerModule(method="lora", llm="tiny-random", lr=5e-2)
    dm = ExplanationDataModule(str(synthetic_dir), batch_size=4, eval_batch_size=4)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints", save_last=True)
    trainer = quiet_trainer(
        tmp_path / "run", max_steps=2, limit_val_batches=0, callbacks=[ckpt], enable_checkpointing=True
    )
    trainer.fit(module, dm)
    out = tmp_path / "peft-export"
    export(str(tmp_path / "run"), str(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "xrec_peft.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "xrec_peft.json").read_text())["method"] == "lora"

    base, _ = load_frozen_llm("tiny-random")
    reloaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    module.llm.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, module.llm(input_ids=ids).logits, atol=1e-5)
