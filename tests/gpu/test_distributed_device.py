"""Multi-process training through the real CLI: DDP on every visible GPU (two CPU processes in the normal suite),
resume under DDP equal to a straight run, and the FSDP / DeepSpeed configs fitting a few steps (CUDA only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.gpu.conftest import gpu_count
from tests.integration.cli_runs import REPO, assert_same_tensors, run, stage2_args, tensors

pytestmark = pytest.mark.integration


def _trainer_yaml(path: Path) -> Path:
    """Checkpoint after every optimizer step (all kept, fixed names), RNG state, no validation."""
    path.write_text(
        """
trainer:
  max_epochs: 5
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        monitor: null
        every_n_train_steps: 1
        save_top_k: -1
        save_last: true
        enable_version_counter: false
        filename: "step{step:03d}"
        auto_insert_metric_name: false
    - class_path: callbacks.resumption.RNGState
"""
    )
    return path


def _placement(device: str) -> list[str]:
    if device == "cuda":
        return ["--trainer.accelerator=gpu", "--trainer.devices=-1", "--trainer.precision=bf16-true"]
    return ["--trainer.accelerator=cpu", "--trainer.devices=2"]


def _fit(data_dir: Path, root: Path, tmp_path: Path, *extra: str) -> None:
    args = stage2_args(data_dir, root, "-c", str(_trainer_yaml(tmp_path / "trainer.yaml")), *extra)
    done = run("fit", [*args, "--model.max_new_tokens=2"], timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_ddp_fit_on_every_device(device, synthetic_dir, tmp_path):
    """``strategy=ddp`` on all visible GPUs (2 CPU processes on CPU): the steps run, adapters only in the checkpoint."""
    root = tmp_path / "ddp"
    _fit(synthetic_dir, root, tmp_path, *_placement(device), "--trainer.strategy=ddp", "--trainer.max_steps=3")
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert state["state_dict"] and all(
        k.startswith(("net.user_adapter.", "net.item_adapter.")) for k in state["state_dict"]
    )
    if device == "cuda":
        assert gpu_count() >= 1


def test_resume_under_ddp_equals_straight_run(device, synthetic_dir, tmp_path):
    """Save at step 2 under DDP, resume from it to step 4: the same adapters and optimizer state as a straight run
    (bit-identical on CPU; to bf16 rounding on CUDA, where kernels need not be deterministic)."""
    placement = [*_placement(device), "--trainer.strategy=ddp", "--trainer.max_steps=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _fit(synthetic_dir, straight, tmp_path, *placement)
    step2 = straight / "checkpoints" / "step002.ckpt"
    assert step2.is_file(), sorted(p.name for p in (straight / "checkpoints").iterdir())
    _fit(synthetic_dir, resumed, tmp_path, *placement, "--ckpt_path", str(step2))
    a, b = straight / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt"
    if device == "cpu":
        assert_same_tensors(a, b)
        return
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(tb[key].float(), ta[key].float(), rtol=2e-2, atol=2e-3, msg=key)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_config_fits_steps(strategy, synthetic_dir, tmp_path):
    """``configs/trainer/{fsdp,deepspeed}.yaml`` on every visible GPU: three optimizer steps and a checkpoint."""
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install 'xrec-pl[gpu]')")
    root = tmp_path / strategy
    cfg = ["-c", str(REPO / f"configs/trainer/{strategy}.yaml"), "--trainer.max_steps=3"]
    _fit(synthetic_dir, root, tmp_path, *cfg)
    assert any((root / "checkpoints").glob("last*")), list(root.rglob("*"))
