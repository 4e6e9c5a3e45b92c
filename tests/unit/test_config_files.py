"""Shipped configs by short name (``xrec:stage2/synthetic``) and the fallback of repository-relative paths."""

from __future__ import annotations

import pytest

from xrec_pl.cli import main
from xrec_pl.config_files import expand_config_args, resolve_config, shipped_configs
from xrec_pl.errors import ConfigError


def test_short_names_resolve_to_the_shipped_files(repo_root):
    names = shipped_configs()
    assert {"stage1/synthetic", "stage2/synthetic", "stage2/llama2_7b", "pipeline/synthetic"} <= set(names)
    assert len(names) == len(list((repo_root / "configs").rglob("*.yaml")))
    for name in ("stage2/synthetic", "stage2/synthetic.yaml"):
        assert resolve_config(f"xrec:{name}").read_text() == (repo_root / "configs/stage2/synthetic.yaml").read_text()


def test_relative_paths_fall_back_to_the_shipped_configs(tmp_path, monkeypatch, repo_root):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert resolve_config("configs/stage1/synthetic.yaml").samefile(repo_root / "configs/stage1/synthetic.yaml")
    (tmp_path / "configs" / "stage1").mkdir(parents=True)
    (tmp_path / "configs" / "stage1" / "synthetic.yaml").write_text("trainer: {}\n")  # a local file wins
    assert resolve_config("configs/stage1/synthetic.yaml").resolve() == (tmp_path / "configs/stage1/synthetic.yaml")


@pytest.mark.parametrize("name", ["xrec:stage2/nope", "xrec:../pyproject.toml", "xrec:"])
def test_unknown_short_name_is_one_line(name, capsys):
    with pytest.raises(ConfigError, match="no such shipped config"):
        resolve_config(name)
    assert main(["fit", "-c", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such shipped config" in err


def test_expand_config_args(repo_root):
    out = expand_config_args(["fit", "-c", "xrec:stage2/synthetic", "--config=xrec:logger/wandb", "--x=xrec:a"])
    assert out[:2] == ["fit", "-c"] and out[4] == "--x=xrec:a"
    assert out[2].endswith("configs/stage2/synthetic.yaml") and out[3].endswith("configs/logger/wandb.yaml")
    assert out[3].startswith("--config=")


def test_stage_command_takes_a_short_name(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", "xrec:stage1/synthetic", "--print_config"])
    assert stop.value.code in (0, None)
    assert "LightGCNModule" in capsys.readouterr().out
