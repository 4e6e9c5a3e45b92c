"""Atomic writes: all or nothing, with ordinary file permissions."""

from __future__ import annotations

import os

import pytest

from xrec_pl.utils import atomic_path, atomic_write_text, dump_json


def test_atomic_write_has_umask_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "hello")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "hello"
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_failed_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    dump_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_phase_table_lists_the_phases_run_with_their_share():
    from xrec_pl.tools.pipeline import phase_table

    table = phase_table({"stage1_train_s": 30.0, "stage2_predict_s": 10.0, "evaluate_s": 10.0, "total_s": 50.0})
    lines = table.splitlines()
    assert lines[0] == "[xrec-pl] time per phase:"
    assert any("stage 1 training" in ln and "30.0 s" in ln and "60.0 %" in ln for ln in lines)
    assert not any("stage 2 training" in ln for ln in lines)  # phases not run are not listed
    assert lines[-1].split()[-2:] == ["50.0", "s"]
