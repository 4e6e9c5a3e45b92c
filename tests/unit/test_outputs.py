"""Output paths are checked before any work: never an input overwritten, never a late failure to write."""

from __future__ import annotations

import json

import pytest

from xrec_pl.cli import main
from xrec_pl.errors import DataError
from xrec_pl.outputs import check_output_dir, check_output_file, check_run_files


def _predictions(tmp_path):
    path = tmp_path / "predictions.jsonl"
    rows = [{"prediction": "a good book", "reference": "a great book"}, {"prediction": "x", "reference": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xrec-pl: error: "), err
    return err[0]


def test_evaluate_refuses_to_write_over_its_predictions(tmp_path, capsys):
    preds = _predictions(tmp_path)
    before = preds.read_bytes()
    code = main(["evaluate", "--predictions", str(preds), "--metrics", "[usr]", "--output", str(preds)])
    assert code == 2 and "--output" in _one_error(capsys) and preds.read_bytes() == before


@pytest.mark.parametrize("where", ["folder", "under-a-file", "read-only-fs"])
def test_evaluate_unwritable_output_fails_before_scoring(tmp_path, capsys, monkeypatch, where):
    import xrec_pl.tools.evaluate as ev

    preds = _predictions(tmp_path)
    (tmp_path / "afile").write_text("x")
    target = {"folder": tmp_path, "under-a-file": tmp_path / "afile" / "out.json", "read-only-fs": "/proc/xrec.json"}
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("scored before checking --output"))
    code = main(["evaluate", "--predictions", str(preds), "--metrics", "[usr]", "--output", str(target[where])])
    assert code == 2 and "--output" in _one_error(capsys)


def test_compare_and_convert_and_synthetic_outputs(tmp_path, synthetic_dir, capsys):
    with pytest.raises(DataError, match="is also an input"):
        check_output_file(synthetic_dir / "tst.pkl", "--output", [synthetic_dir / "tst.pkl"])
    assert main(["convert", "--src", str(synthetic_dir), "--dst", str(synthetic_dir / "converted")]) == 2
    assert "lies in the input" in _one_error(capsys)
    assert not (synthetic_dir / "converted").exists()
    (tmp_path / "file").write_text("x")
    assert main(["make-synthetic", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in _one_error(capsys)


def test_run_folder_checks(tmp_path, synthetic_dir, repo_root, capsys):
    (tmp_path / "run" / "embeddings.safetensors").mkdir(parents=True)
    with pytest.raises(DataError, match="is a folder where the run writes a file"):
        check_run_files(tmp_path / "run", ["embeddings.safetensors"], "--trainer.default_root_dir")
    config = str(repo_root / "configs" / "stage1" / "synthetic.yaml")
    args = ["-c", config, f"--data.data_dir={synthetic_dir}"]
    assert main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'run'}"]) == 2
    assert "embeddings.safetensors is a folder" in _one_error(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()
    (tmp_path / "plain").write_text("x")
    assert main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'plain'}"]) == 2
    assert "is a file" in _one_error(capsys)
    with pytest.raises(DataError, match="lies in the input"):
        check_output_dir(synthetic_dir / "run", "--trainer.default_root_dir", [synthetic_dir])
