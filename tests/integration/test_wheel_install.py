"""From a wheel in a fresh venv, in an empty folder outside the repository: the shipped configs are package data
(``-c xrec:...``), ``make-synthetic`` and ``pipeline`` on the embedded default run without the clone.

The fresh venv gets the wheel with ``--no-deps``; its dependencies (torch, lightning, ...) come from this test's own
environment through a ``.pth`` line, so nothing is downloaded. ``PYTHONPATH`` is cleared and the working folder is
empty: the repository cannot be imported by accident (checked).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.cli_runs import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the venv's bin folder, its environment, an empty working folder) with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    _sh(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO), "-w", str(dist)],
        root,
    )
    (wheel,) = dist.glob("xrec_pl-*.whl")
    venv = root / "venv"
    _sh([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_xrec_test_deps.pth").write_text("\n".join(deps) + "\n")  # torch & co. from this environment
    bin_dir = venv / "bin"
    _sh(
        [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps", "-q", str(wheel)],
        root,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", PATH=f"{bin_dir}{os.pathsep}{env['PATH']}"
    )
    work = root / "work"
    work.mkdir()
    return bin_dir, env, work


def test_installed_package_is_not_the_clone(installed):
    bin_dir, env, work = installed
    code = "import xrec_pl, callbacks, xrec_pl.config_files as c; print(xrec_pl.__file__); print(callbacks.__file__); print(c.configs_dir())"
    lines = _sh([str(bin_dir / "python"), "-c", code], work, env).stdout.split()
    assert all(str(REPO) not in line for line in lines), lines
    assert lines[2].endswith(os.path.join("xrec_pl", "configs"))


def test_make_synthetic_and_pipeline_from_the_wheel(installed):
    bin_dir, env, work = installed
    xrec = str(bin_dir / "xrec-pl")
    _sh([xrec, "make-synthetic", "--out", "data", "--size", "tiny"], work, env)
    assert (work / "data" / "trn.pkl").is_file()
    args = [
        xrec, "pipeline", "-c", "xrec:pipeline/synthetic", "--data_dir", "data", "--out_dir", "runs/wheel",
        "--stage1_args", "[--trainer.max_epochs=1]",
        "--stage2_args", "[--trainer.max_epochs=1, --trainer.limit_train_batches=2, --model.max_new_tokens=4]",
        "--metrics", "[usr]", "--show", "0",
    ]  # fmt: skip
    _sh(args, work, env, timeout=900)
    metrics = json.loads((work / "runs" / "wheel" / "metrics.json").read_text())
    assert "usr" in json.dumps(metrics)
    predictions = work / "runs" / "wheel" / "stage2" / "predictions.jsonl"
    assert predictions.is_file()
    scored = json.loads(
        _sh([xrec, "evaluate", "--predictions", str(predictions), "--metrics", "[usr]"], work, env).stdout
    )
    assert "usr" in scored
    # a short name that is not shipped: one line, exit 2
    bad = subprocess.run([xrec, "fit", "-c", "xrec:stage2/nope"], cwd=work, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "no such shipped config" in bad.stderr
