"""One process per run folder: a second fit stops with one line naming the holder; a killed holder leaves no lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xrec_pl.cli import main
from xrec_pl.errors import DataError
from xrec_pl.run_lock import lock_run_folder, release_all

REPO = Path(__file__).resolve().parents[2]
_HOLD = (
    "import sys, time; from xrec_pl.run_lock import lock_run_folder; lock_run_folder(sys.argv[1]); "
    "print('held', flush=True); time.sleep(120)"
)


def _holder(folder: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for var in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_until_the_holder_dies(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(DataError, match=rf"run folder in use by pid {proc.pid} on "):
            lock_run_folder(run)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_run_folder(run) == run.resolve() / ".xrec-pl.lock"  # kill -9 left no stale lock
    release_all()


def test_fit_into_a_folder_in_use_is_one_line(tmp_path, capsys, repo_root, synthetic_dir):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        config = str(repo_root / "configs" / "stage1" / "synthetic.yaml")
        code = main(["fit", "-c", config, f"--data.data_dir={synthetic_dir}", f"--trainer.default_root_dir={run}"])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"pid {proc.pid}" in err[0] and str(run.resolve()) in err[0], err
    assert sorted(p.name for p in run.iterdir()) == [".xrec-pl.lock"]  # nothing of the refused run was written


def test_lock_is_released_when_the_command_ends(tmp_path, repo_root, synthetic_dir):
    run = tmp_path / "run"
    config = str(repo_root / "configs" / "stage1" / "synthetic.yaml")
    args = ["-c", config, f"--data.data_dir={synthetic_dir}", f"--trainer.default_root_dir={run}"]
    assert main(["fit", *args, "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]) == 0
    started = time.monotonic()
    proc = _holder(run)  # another process can take it at once
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert time.monotonic() - started < 30


def test_run_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(DataError, match="run folder is a file"):
        lock_run_folder(tmp_path / "run")


def test_lock_file_replaced_by_a_link_never_touches_its_target(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run / ".xrec-pl.lock").symlink_to(victim)
    with pytest.raises(DataError, match="is a link"):
        lock_run_folder(run)
    assert victim.read_text() == "keep me"
