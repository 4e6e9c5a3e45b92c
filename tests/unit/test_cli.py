"""The CLI's own logic: command dispatch, one-line errors, run-folder placement."""

from __future__ import annotations

import pytest
from jsonargparse import Namespace

from xrec_pl.cli import main
from xrec_pl.errors import ConfigError
from xrec_pl.tools.stage_cli import place_run_outputs


def _trainer_cfg(root, ckpt_dirpath=None):
    return Namespace(
        default_root_dir=str(root),
        logger=[Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(name="logs"))],
        callbacks=[
            Namespace(
                class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                init_args=Namespace(dirpath=ckpt_dirpath, monitor="val/loss"),
            ),
            Namespace(class_path="callbacks.run_artifacts.MetricsJson", init_args=Namespace()),
        ],
    )


def test_outputs_follow_default_root_dir(tmp_path):
    cfg = _trainer_cfg(tmp_path / "run")
    place_run_outputs(cfg, subcommand="fit", ckpt_path=None)
    assert cfg.logger[0].init_args.save_dir == str(tmp_path / "run")
    assert cfg.callbacks[0].init_args.dirpath == str(tmp_path / "run" / "checkpoints")


def test_explicit_checkpoint_dir_is_kept(tmp_path):
    cfg = _trainer_cfg(tmp_path / "run", ckpt_dirpath=str(tmp_path / "elsewhere"))
    place_run_outputs(cfg, subcommand="fit", ckpt_path=None)
    assert cfg.callbacks[0].init_args.dirpath == str(tmp_path / "elsewhere")


def test_fit_refuses_to_write_over_previous_checkpoints(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"previous run")
    with pytest.raises(ConfigError, match="--ckpt_path last"):
        place_run_outputs(_trainer_cfg(tmp_path / "run"), subcommand="fit", ckpt_path=None)
    # resuming, or evaluating, the same folder is fine
    place_run_outputs(_trainer_cfg(tmp_path / "run"), subcommand="fit", ckpt_path="last")
    place_run_outputs(_trainer_cfg(tmp_path / "run"), subcommand="test", ckpt_path=None)
    assert (ckpts / "last.ckpt").read_bytes() == b"previous run"


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "pipeline" in capsys.readouterr().out
    assert main(["train-me"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    code = main(["convert", "--src", str(tmp_path / "ds"), "--dst", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("xrec-pl: error: ") and len(err.splitlines()) == 1
    assert str(tmp_path / "ds") in err


def test_make_synthetic_refuses_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["make-synthetic", "--out", str(out), "--size", "tiny"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_damaged_checkpoint_path_is_one_line(tmp_path, capsys, repo_root):
    junk = tmp_path / "broken.ckpt"
    junk.write_bytes(b"PK\x03\x04 not really a checkpoint")
    config = str(repo_root / "configs" / "stage1" / "synthetic.yaml")
    code = main(["test", "-c", config, "--ckpt_path", str(junk), f"--trainer.default_root_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"xrec-pl: error: {junk}: unreadable checkpoint")
    assert junk.read_bytes() == b"PK\x03\x04 not really a checkpoint"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["fit", "-c", "configs/stage2/synthetic.yaml", "--model.adapter=moee"],
            "--model.adapter: Expected a typing.Literal['moe', 'linear', 'none']. Got value: moee",
        ),
        (
            ["fit", "-c", "configs/stage2/synthetic.yaml", "--model.nosuch=1"],
            "--model: Option 'nosuch' is not accepted",
        ),
        (
            ["make-synthetic", "--size", "huge"],
            "--size: Expected a typing.Literal['default', 'tiny', 'smoke']. Got value: huge",
        ),
        (["make-synthetic", "--nope", "1"], "unrecognized arguments: --nope 1"),
    ],
    ids=["typo-in-switch", "unknown-model-option", "typo-in-tool-switch", "unknown-tool-option"],
)
def test_bad_option_is_one_line_and_exit_2(args, expected, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"xrec-pl: error: {expected}") and len(err.splitlines()) == 1, err
    assert "usage:" not in captured.out + captured.err


def test_help_lists_the_choices_of_a_switch(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "xrec_pl.lit.explainer.ExplainerModule"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "--model.adapter {moe,linear,none}" in out
    assert "--model.embedding_source {graph,fixed,random,redrawn}" in out


def test_explicit_checkpoint_file_follows_the_same_rule_as_last(tmp_path, capsys, repo_root, synthetic_dir):
    """`--ckpt_path FILE` never replaces options given on the command line: a changed training option is refused
    (naming it) exactly as with `--ckpt_path last`, and evaluation runs with the options as given."""
    config = str(repo_root / "configs" / "stage1" / "synthetic.yaml")
    root = tmp_path / "run"
    common = ["-c", config, f"--data.data_dir={synthetic_dir}", f"--trainer.default_root_dir={root}"]
    fast = ["--trainer.enable_progress_bar=false", "--trainer.check_val_every_n_epoch=1"]
    assert main(["fit", *common, *fast, "--trainer.max_epochs=1"]) == 0
    ckpt = str(root / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    for resume in (ckpt, "last"):
        code = main(["fit", *common, *fast, "--trainer.max_epochs=2", "--model.lr=0.5", f"--ckpt_path={resume}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "model.lr: 0.005 -> 0.5" in err[0], err
    code = main(["test", *common, *fast, "--model.num_layers=2", f"--ckpt_path={ckpt}"])
    assert code == 0  # LightGCN's layer count has no weights: the command line's value is the one that ran
    latest = max((root / "logs").glob("version_*/config.yaml"), key=lambda p: int(p.parent.name.split("_")[1]))
    assert "num_layers: 2" in latest.read_text()


class _Checked:
    def __init__(self, lr: float) -> None:
        self._check(lr)

    def _check(self, lr: float) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")


class _CallsLibrary:
    def __init__(self) -> None:
        import json

        json.loads("{")  # a ValueError raised inside third-party code: a bug, not bad input


def test_constructor_error_accepts_checks_a_constructor_calls_and_nothing_else():
    from xrec_pl.error_lines import constructor_error

    try:
        _Checked(-1.0)
    except ValueError as err:
        assert constructor_error(err, ("unit",)) == "_Checked: lr must be positive, got -1.0"
    try:
        _CallsLibrary()
    except ValueError as err:
        assert constructor_error(err, ("unit",)) is None
    try:
        _Checked.__new__(_Checked)._check(-2.0)  # the check alone, not called by a constructor
    except ValueError as err:
        assert constructor_error(err, ("unit",)) is None
