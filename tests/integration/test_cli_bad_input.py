"""Bad data through the real CLI: one line naming the file and the problem, exit 2, nothing written."""

from __future__ import annotations

import shutil

import pytest

from xrec_pl.cli import main

pytestmark = pytest.mark.integration


def _broken_copy(src, dst, mutate):
    shutil.copytree(src, dst)
    mutate(dst)
    return dst


def _rename_column(folder):
    path = folder / "total_trn.csv"
    path.write_text(path.read_text().replace("user,item", "usr,item", 1))


def _out_of_range(folder):
    path = folder / "total_val.csv"
    path.write_text(path.read_text() + "999999,0\n")


def _empty_split(folder):
    (folder / "total_tst.csv").write_text("user,item\n")


def _malicious_pickle(folder):
    import pickle

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {folder / 'pwned'}",))

    (folder / "para_dict.pickle").write_bytes(pickle.dumps(Exploit()))


@pytest.mark.parametrize(
    ("mutate", "file", "words"),
    [
        (_rename_column, "total_trn.csv", "user"),
        (_out_of_range, "total_val.csv", "999999"),
        (_empty_split, "total_tst.csv", "no interactions"),
        (lambda d: (d / "total_trn.csv").unlink(), "total_trn.csv", "not found"),
        (_malicious_pickle, "para_dict.pickle", "posix.system"),
    ],
    ids=["renamed-column", "id-out-of-range", "empty-split", "missing-file", "malicious-pickle"],
)
def test_stage1_fit_refuses_bad_data(synthetic_dir, tmp_path, capsys, repo_root, mutate, file, words):
    data = _broken_copy(synthetic_dir, tmp_path / "data", mutate)
    run = tmp_path / "run"
    code = main(
        [
            "fit",
            "-c",
            str(repo_root / "configs" / "stage1" / "synthetic.yaml"),
            f"--data.data_dir={data}",
            f"--trainer.default_root_dir={run}",
        ]
    )
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("xrec-pl: error:")]
    assert code == 2 and len(err_lines) == 1, err_lines
    assert str(data / file) in err_lines[0] and words in err_lines[0], err_lines[0]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (data / "pwned").exists()
