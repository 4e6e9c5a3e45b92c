"""The stage CLI puts LogProgress in place of Lightning's bar only where stderr is a log (not a terminal, not CI)."""

from __future__ import annotations

import io
import re
import sys

import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from callbacks.log_progress import LogProgress
from xrec_pl.cli import main
from xrec_pl.tools.stage_cli import XrecCLI

LIGHTNING_BARS = (RichProgressBar, TQDMProgressBar)  # Lightning's default: Rich if installed, else TQDM


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("CI", "XREC_PROGRESS", "XREC_PROGRESS_EVERY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _trainer(repo_root, synthetic_dir, tmp_path, *extra: str):
    args = [
        "-c", str(repo_root / "configs" / "stage1" / "synthetic.yaml"), f"--data.data_dir={synthetic_dir}",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_model_summary=false", *extra,
    ]  # fmt: skip
    return XrecCLI(args=args, run=False).trainer


@pytest.mark.parametrize(
    ("env", "tty", "extra", "expected"),
    [
        ({}, False, (), LogProgress),  # stderr is a log file: plain lines
        ({}, True, (), LIGHTNING_BARS),  # a terminal: unchanged
        ({"XREC_PROGRESS": "1"}, False, (), LIGHTNING_BARS),  # bars forced: unchanged
        ({"CI": "true"}, False, (), LIGHTNING_BARS),  # CI: nothing added
        ({"CI": "true", "XREC_PROGRESS": "log"}, False, (), LogProgress),
        ({}, False, ("--trainer.enable_progress_bar=false",), type(None)),  # off stays off
        ({}, False, ("--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",), TQDMProgressBar),
        ({}, False, ("--trainer.callbacks+=callbacks.log_progress.LogProgress",), LogProgress),  # not twice
    ],
)
def test_which_progress_bar_a_stage_gets(clean_env, repo_root, synthetic_dir, tmp_path, env, tty, extra, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    clean_env.setattr(sys, "stderr", _Tty() if tty else io.StringIO())
    trainer = _trainer(repo_root, synthetic_dir, tmp_path, *extra)
    assert isinstance(trainer.progress_bar_callback, expected), trainer.progress_bar_callback
    bars = [cb for cb in trainer.callbacks if isinstance(cb, (LogProgress, *LIGHTNING_BARS))]
    assert len(bars) == (0 if expected is type(None) else 1)
    assert len(trainer.callbacks) > 5  # the config's own callbacks are all still there


def test_interval_comes_from_the_environment(clean_env, repo_root, synthetic_dir, tmp_path):
    clean_env.setenv("XREC_PROGRESS_EVERY", "7.5")
    clean_env.setattr(sys, "stderr", io.StringIO())
    assert _trainer(repo_root, synthetic_dir, tmp_path).progress_bar_callback.every_s == 7.5


def test_bad_interval_is_one_line_and_exit_2(clean_env, repo_root, synthetic_dir, tmp_path, capsys):
    clean_env.setenv("XREC_PROGRESS_EVERY", "soon")
    config = str(repo_root / "configs" / "stage1" / "synthetic.yaml")
    code = main(["fit", "-c", config, f"--data.data_dir={synthetic_dir}", f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "XREC_PROGRESS_EVERY='soon'" in err[-1] and err[-1].startswith("xrec-pl: error:")


def test_fit_in_a_log_prints_a_line_per_step(clean_env, repo_root, synthetic_dir, tmp_path, capsys):
    """`xrec-pl fit ... > log 2>&1`: with XREC_PROGRESS_EVERY=0 one plain line per step, no carriage return."""
    clean_env.setenv("XREC_PROGRESS_EVERY", "0")
    config = str(repo_root / "configs" / "stage1" / "synthetic.yaml")
    args = ["fit", "-c", config, f"--data.data_dir={synthetic_dir}", f"--trainer.default_root_dir={tmp_path}"]
    assert main([*args, "--trainer.max_epochs=1", "--data.batch_size=32", "--trainer.check_val_every_n_epoch=1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    steps = re.findall(r"\[xrec-pl\] fit: epoch 1/1 step (\d+)/(\d+) \(\d+%\) \| global step (\d+) \| \S+ s/step", err)
    total = int(steps[0][1])
    assert total >= 2 and [(int(i), int(g)) for i, _, g in steps] == [(i, i) for i in range(1, total + 1)]
    assert re.search(r"fit: validation \(epoch 1/1\) done, 1 batches \| elapsed \S+ \| val/mrr@20=", err)
    assert f"fit: epoch 1/1 done, {total}/{total} steps" in err and "fit: end after 1 epoch |" in err
    assert "Epoch 0" not in err  # no Rich/TQDM bar as well
