"""The stage-2 bench runs end to end on the tiny random Llama (the code path of ``llm="random-7b"`` on a GPU)."""

from __future__ import annotations

import pytest
import torch

from xrec_pl.tools.bench import stage2, stage2_common, stage2_reference


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (see the ``one_thread`` fixture)."""


def test_bench_random_tiny_end_to_end(synthetic_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = stage2.run_stage2_bench(
        synthetic_dir,
        parts=("stage2", "generation", "ablation"),
        quick=True,
        llm="random-tiny",
        repeats=1,
        train_records=4,
        gen_records=4,
        batch_size=2,
        gen_batch_size=2,
        max_new_tokens=6,
        memory=False,
        device="cpu",
        out_json=out,
    )
    assert out.is_file()
    train, gen = result["stage2"], result["generation"]
    for part in (train, gen):
        assert part["machine"]["llm"] == "random-tiny" and part["machine"]["quick"] is True
        assert len(part["load_after"]) == 3
    assert train["records"] == 4 and train["ours_samples_per_s"] > 0 and train["reference_samples_per_s"] > 0
    assert train["ratio"] == pytest.approx(train["ours_samples_per_s"] / train["reference_samples_per_s"])
    assert train["target_tokens"] > 0 and train["ours_target_tokens_per_s"] > 0
    assert 0 < train["checkpoint_bytes"] < train["frozen_llm_bytes"]
    assert gen["records"] == 4 and gen["ours_new_tokens_per_s"] > 0
    # same weights, same injection (in place vs out of place), greedy: the texts agree on the tiny model
    assert gen["texts_equal"] + gen["texts_differ"] == 4
    assert gen["texts_equal"] == 4
    steps = result["ablation"]["steps"]
    assert len(steps) == 6 and steps[0]["vs_first"] == 1.0 and all(s["samples_per_s"] > 0 for s in steps)
    table = stage2.format_table(result, quick=True)
    assert "train samples/s" in table and "quick" in table


def test_reference_injection_equals_ours(synthetic_dir):
    """The reference-style in-place 4-D injection gives the same loss as the module's out-of-place hooks."""
    module, dm = stage2_common.build("random-tiny", synthetic_dir, "cpu", seed=0, batch_size=1)
    rows, records = stage2._pick(dm, "trn", 1, seed=0)
    enc = dm.builder.encode_train(records[0])
    batch = {
        "input_ids": torch.tensor([enc["input_ids"]]),
        "attention_mask": torch.ones(1, len(enc["input_ids"]), dtype=torch.long),
        "labels": torch.tensor([enc["labels"]]),
        "user_pos": torch.tensor([enc["user_pos"]]),
        "item_pos": torch.tensor([enc["item_pos"]]),
        "user_id": torch.tensor([int(records[0]["uid"])]),
        "item_id": torch.tensor([int(records[0]["iid"])]),
    }
    module.eval()
    with torch.no_grad():
        with module.injecting_batch(batch):
            ours = module.lm_loss(batch)
        user_vec, item_vec = module.graph_vectors(batch["user_id"], batch["item_id"])
        with stage2_reference._InPlaceInjector(module.llm) as inj:
            inj.vectors = torch.cat([module.user_adapter(user_vec), module.item_adapter(item_vec)], 0)
            inj.positions = [enc["user_pos"], enc["item_pos"]]
            ref = module.llm(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        plain = module.lm_loss(batch)
    assert module.llm.config._attn_implementation == "sdpa"  # restored
    assert float(ref) == pytest.approx(float(ours), rel=1e-4, abs=1e-5)
    assert abs(float(plain) - float(ours)) > 1e-6  # the injection did something


def test_random_7b_dimensions_and_peak_table():
    from transformers import LlamaConfig

    cfg = LlamaConfig()  # what _random_llm("random-7b") builds (not instantiated here: 7B parameters)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (4096, 11008, 32, 32000)
    assert stage2_common.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert stage2_common.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert stage2_common.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert stage2_common.peak_flops("cpu") is None


def test_bench_with_bf16_weights_keeps_an_fp32_reference(synthetic_dir):
    """``llm_dtype="bfloat16"``: ours trains and generates on a bf16 copy, the reference side stays fp32."""
    result = stage2.run_stage2_bench(
        synthetic_dir,
        parts=("stage2", "generation"),
        quick=True,
        llm="random-tiny",
        repeats=1,
        train_records=4,
        gen_records=2,
        batch_size=2,
        gen_batch_size=2,
        max_new_tokens=4,
        llm_dtype="bfloat16",
        memory=False,
        device="cpu",
    )
    machine = result["stage2"]["machine"]
    assert (machine["ours_llm_dtype"], machine["reference_llm_dtype"]) == ("torch.bfloat16", "torch.float32")
    assert result["stage2"]["ours_samples_per_s"] > 0 and result["generation"]["ours_new_tokens_per_s"] > 0
    assert result["generation"]["texts_equal"] + result["generation"]["texts_differ"] == 2


def test_xrec_pl_bench_times_the_llm_dtype_the_configs_ship(monkeypatch, tmp_path):
    """``xrec-pl bench`` puts our side on the shipped configs' dtype (bf16 weights on a bf16 CPU) unless told."""
    import xrec_pl.models.llm as llm_mod
    import xrec_pl.tools.bench as bench_mod
    import xrec_pl.tools.bench.stage2 as stage2_mod

    seen = []
    monkeypatch.setattr(stage2_mod, "run_stage2_bench", lambda *a, **k: seen.append(k["llm_dtype"]) or {})
    for native, expected in ((True, "bfloat16"), (False, "auto")):
        monkeypatch.setattr(llm_mod, "cpu_has_native_bf16", lambda native=native: native)
        bench_mod.bench(parts=["stage2"], out=str(tmp_path / f"{native}.json"))
        assert seen[-1] == expected
    bench_mod.bench(parts=["generation"], out=str(tmp_path / "f32.json"), llm_dtype="float32")
    assert seen[-1] == "float32"


def test_bench_refuses_to_write_over_its_own_data(synthetic_dir, tmp_path, monkeypatch):
    """``--out`` naming a file of the data folder (even in a subfolder) is one error before any work; the file stays."""
    import shutil

    import xrec_pl.tools.bench as bench_mod
    import xrec_pl.tools.bench.compare_pyg as compare_pyg
    import xrec_pl.tools.bench.stage1 as stage1_mod
    import xrec_pl.tools.bench.stage2 as stage2_mod
    from xrec_pl.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    (data / "extra").mkdir()
    (data / "extra" / "records.pkl").write_bytes(b"keep")
    monkeypatch.setattr(stage2_mod, "run_stage2_bench", lambda *a, **k: pytest.fail("the bench ran"))
    for target in (data / "trn.pkl", data / "extra" / "records.pkl"):
        before = target.read_bytes()
        with pytest.raises(DataError, match="is also an input"):
            bench_mod.bench(parts=["stage2"], data_dir=str(data), out=str(target))
        for main in (stage1_mod.main, stage2_mod.main, compare_pyg.main):
            with pytest.raises(SystemExit) as exit_info:
                main([str(data), "--out", str(target)])
            assert exit_info.value.code == 2
        assert target.read_bytes() == before
