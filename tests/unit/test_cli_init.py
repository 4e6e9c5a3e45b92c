"""`xrec-pl init DIR` writes the shipped configs into DIR/configs and never overwrites."""

from __future__ import annotations

from xrec_pl.cli import main
from xrec_pl.config_files import configs_dir, shipped_configs


def test_init_writes_every_shipped_config(tmp_path, capsys, monkeypatch):
    assert main(["init", str(tmp_path / "proj")]) == 0
    written = sorted(str(p.relative_to(tmp_path / "proj/configs").with_suffix("")) for p in tmp_path.rglob("*.yaml"))
    assert written == shipped_configs() and "stage2/llama2_7b" in written
    same = (tmp_path / "proj/configs/stage2/llama2_7b.yaml").read_text() == (
        configs_dir() / "stage2/llama2_7b.yaml"
    ).read_text()
    assert same
    assert f"wrote {len(written)} configs" in capsys.readouterr().out
    # the copies are what a relative -c configs/... uses inside DIR
    monkeypatch.chdir(tmp_path / "proj")
    (tmp_path / "proj/configs/trainer/gpu.yaml").write_text("trainer:\n  devices: 3\n")
    capsys.readouterr()
    try:
        main(["fit", "-c", "configs/stage2/synthetic.yaml", "-c", "configs/trainer/gpu.yaml", "--print_config"])
    except SystemExit as stop:
        assert stop.code in (0, None)
    assert "devices: 3" in capsys.readouterr().out


def test_init_refuses_to_overwrite(tmp_path, capsys):
    existing = tmp_path / "configs/stage1/amazon.yaml"
    existing.parent.mkdir(parents=True)
    existing.write_text("mine\n")
    assert main(["init", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "amazon.yaml: exists" in err
    assert existing.read_text() == "mine\n"
    assert list(tmp_path.rglob("*.yaml")) == [existing]  # nothing else was written


def test_init_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["init", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
