"""Attacks through a run folder: an edited or replaced checkpoint never runs code and never leads outside the run.

Each case trains the tiny synthetic stage 1 for two epochs through the real CLI, tampers with the run folder as
someone sharing it could, then resumes with ``--ckpt_path last``: the resume must end with exit 2 and one line naming
the file, and the tampering must have had no effect (no marker file, no file outside the run touched).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.integration.cli_runs import run, stage1_args

pytestmark = pytest.mark.integration

ARGS = ("--data.batch_size=128", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained_run(synthetic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("security") / "run"
    done = run("fit", stage1_args(synthetic_dir, root, *ARGS, "--trainer.max_epochs=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("xrec-pl: error:")]


def _best(root: Path) -> Path:
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("ModelCheckpoint")]
    return Path(state["callbacks"][key]["best_model_path"])


def test_replaced_best_checkpoint_never_runs(trained_run, synthetic_dir, tmp_path):
    root = _copy(trained_run, tmp_path / "run")
    best = root / "checkpoints" / _best(root).name  # the copy's own file (the stored path names the original)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _Exploit(marker)}, best)
    # resume in place of the original folder: same dirpath, so Lightning restores best_model_path from last.ckpt
    os.replace(trained_run, tmp_path / "original")
    os.replace(root, trained_run)
    try:
        proc = run("fit", stage1_args(synthetic_dir, trained_run, *ARGS, "--trainer.max_epochs=2", "--ckpt_path=last"))
    finally:
        os.replace(trained_run, root)
        os.replace(tmp_path / "original", trained_run)
    lines = _error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert best.name in lines[0] and "refused checkpoint" in lines[0] and "posix.system" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    assert not marker.exists()


def test_moved_run_folder_still_resumes(trained_run, synthetic_dir, tmp_path):
    root = _copy(trained_run, tmp_path / "moved")  # its checkpoints name the old folder: Lightning ignores those
    proc = run("fit", stage1_args(synthetic_dir, root, *ARGS, "--trainer.max_epochs=3", "--ckpt_path=last"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "embeddings.safetensors").is_file()


def test_checkpoint_naming_files_outside_the_run_is_refused(trained_run, synthetic_dir, tmp_path):
    root = _copy(trained_run, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    last = root / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("ModelCheckpoint")]
    mc = state["callbacks"][key]
    mc["dirpath"] = str(root / "checkpoints")  # as if the run had always been here: every stored path is its own
    for field in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if mc.get(field):
            mc[field] = str(root / "checkpoints" / Path(mc[field]).name)
    mc["best_k_models"] = {str(victim): torch.tensor(0.0)}  # ...but one that Lightning would delete lies outside
    torch.save(state, last)
    before = last.read_bytes()
    proc = run("fit", stage1_args(synthetic_dir, root, *ARGS, "--trainer.max_epochs=3", "--ckpt_path=last"))
    lines = _error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "victim.txt" in lines[0] and "outside the run's folder" in lines[0], lines[0]
    assert victim.read_text() == "keep me" and last.read_bytes() == before
