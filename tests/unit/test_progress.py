"""Progress bars of the tool commands: on at a terminal, off under CI / in pipes, per metric and per experiment run."""

from __future__ import annotations

import io
import logging

import pytest

from xrec_pl.progress import progress_bar, progress_enabled


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_enabled_only_at_a_terminal_and_not_under_ci(monkeypatch):
    monkeypatch.delenv("XREC_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert progress_enabled(_Tty()) and not progress_enabled(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled(_Tty())
    monkeypatch.setenv("XREC_PROGRESS", "1")  # forced on, even under CI
    assert progress_enabled(io.StringIO())
    monkeypatch.setenv("XREC_PROGRESS", "0")
    assert not progress_enabled(_Tty())
    assert progress_bar(3, "x").disable


def test_evaluate_shows_one_bar_per_metric(monkeypatch, capsys):
    from xrec_pl.tools.evaluate import evaluate

    monkeypatch.setenv("XREC_PROGRESS", "1")
    preds = [f"a good book number {i}" for i in range(7)]
    evaluate(preds, list(reversed(preds)), metrics=["usr"])
    err = capsys.readouterr().err
    assert "usr (1/1)" in err and "7/7" in err and "pair" in err


def test_experiment_bar_and_eta_log(tmp_path, monkeypatch, capsys, caplog):
    from tests.unit.test_experiment import _fake_run
    from xrec_pl.tools.experiment import experiment

    monkeypatch.setenv("XREC_PROGRESS", "1")
    for arm in ("xrec", "fixed_emb"):
        for seed in (0, 1):
            _fake_run(tmp_path / arm / f"seed{seed}", [0.5, 0.6, 0.7], 1.0)  # finished: nothing trains
    with caplog.at_level(logging.INFO, logger="xrec_pl.tools.experiment"):
        experiment(name="t", arms=["xrec", "fixed_emb"], out_dir=str(tmp_path), seeds=[0, 1], metrics=["bertscore"])
    err = capsys.readouterr().err
    assert "experiment t" in err and "4/4" in err and "arm fixed_emb (4/4), seed 1" in err
    lines = [r.getMessage() for r in caplog.records if "runs done" in r.getMessage()]
    assert len(lines) == 4 and "4/4 runs done (arm fixed_emb, seed 1)" in lines[-1] and "ETA 0 s" in lines[-1]


@pytest.mark.parametrize("ci", ["true", "1"])
def test_no_bar_under_ci(monkeypatch, capsys, ci):
    from xrec_pl.tools.evaluate import evaluate

    monkeypatch.delenv("XREC_PROGRESS", raising=False)
    monkeypatch.setenv("CI", ci)
    evaluate(["a b c"], ["a b d"], metrics=["usr"])
    assert "usr (1/1)" not in capsys.readouterr().err
