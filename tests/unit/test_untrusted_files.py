"""Untrusted pickles and torch files: nothing runs, nothing crashes, every failure is one DataError naming the file."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch

from xrec_pl.data.pickles import require_inside, safe_load_pickle, safe_torch_load
from xrec_pl.errors import DataError

REPO = Path(__file__).resolve().parents[2]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"explanation": ["hello world", "yy", None, ""], "uid": [1, 2, 3, 4]})


def _offsets_at(data: bytes, values: tuple[int, ...]) -> int:
    where = data.find(struct.pack(f"<{len(values)}q", *values))
    assert where >= 0, "the Arrow offsets buffer was not found in the pickle"
    return where


@pytest.mark.parametrize("patched", [14, 10**7, -1, 2**62], ids=["overrun-by-one", "huge", "negative", "2^62"])
def test_patched_arrow_offset_is_a_data_error(tmp_path, patched):
    raw = bytearray(pickle.dumps(_frame(), protocol=4))
    if pd.__version__.startswith("2"):
        pytest.skip("pandas 2 pickles str columns as object arrays (no Arrow buffers)")
    at = _offsets_at(bytes(raw), (0, 11, 13, 13, 13))
    raw[at + 8 : at + 16] = struct.pack("<q", patched)
    path = tmp_path / "trn.pkl"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"trn\.pkl: damaged Arrow array"):
        safe_load_pickle(path)


def test_arrow_array_with_wrong_buffer_count_is_refused_before_pyarrow_sees_it(tmp_path):
    good = pa.array(["ab", "c"], type=pa.large_string())
    _, (state,) = good.__reduce__()

    class Forged:
        def __reduce__(self):
            dtype, length, nulls, offset, buffers, children, dictionary = state
            return (pa.lib._restore_array, ((dtype, length, nulls, offset, buffers[:1], children, dictionary),))

    path = tmp_path / "forged.pkl"
    path.write_bytes(pickle.dumps(Forged()))
    with pytest.raises(DataError, match="buffers do not fit"):
        safe_load_pickle(path)


def test_real_frames_still_load(tmp_path):
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(_frame(), protocol=protocol))
        assert safe_load_pickle(path).equals(_frame())


_FUZZ = textwrap.dedent(
    """
    import pickle, random, sys
    import pandas as pd
    from xrec_pl.errors import DataError
    from xrec_pl.data.pickles import safe_load_pickle

    seeds, outcomes = range(int(sys.argv[2])), {"error": 0, "frame": 0, "other": 0}
    originals = [open(p, "rb").read() for p in sys.argv[3:]]
    path = sys.argv[1]
    for seed in seeds:
        rng = random.Random(seed)
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            if rng.random() < 0.5:
                data[at] = rng.randrange(256)
            else:  # an 8-byte little-endian integer: how offsets and lengths are stored
                data[at : at + 8] = rng.choice([0, 1, 255, 2**31, 2**40, -1 & (2**64 - 1)]).to_bytes(8, "little")
        open(path, "wb").write(bytes(data))
        try:
            obj = safe_load_pickle(path)
        except DataError as err:
            assert str(err).startswith(path), err
            outcomes["error"] += 1
            continue
        if isinstance(obj, pd.DataFrame):
            for column in obj.columns:  # every value readable: no out-of-bounds read hides in a column
                [repr(v) for v in obj[column].tolist()]
            outcomes["frame"] += 1
        else:
            outcomes["other"] += 1
    print(outcomes)
    """
)


def test_fuzzed_pickles_never_crash_the_process(tmp_path, synthetic_dir):
    """Mutated bytes of real pickles end in a DataError or a readable object, never a signal (run in a child)."""
    sources = []
    for protocol in (2, 4):
        src = tmp_path / f"frame{protocol}.pkl"
        src.write_bytes(pickle.dumps(_frame(), protocol=protocol))
        sources.append(str(src))
    sources += [str(synthetic_dir / "tst.pkl"), str(synthetic_dir / "para_dict.pickle")]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _FUZZ, str(tmp_path / "fuzzed.pkl"), "2500", *sources],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, f"fuzzing ended with {proc.returncode} (negative = signal): {proc.stderr[-2000:]}"
    assert "SystemError" not in proc.stderr, proc.stderr[-2000:]  # e.g. a buffer export outliving its bytearray
    assert "'error'" in proc.stdout


def test_malicious_torch_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "epoch=001.ckpt"
    torch.save({"state_dict": {}, "x": _Exploit(marker)}, path)
    with pytest.raises(DataError) as info:
        safe_torch_load(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "refused checkpoint" in message and "posix.system" in message
    assert "weights_only=False" not in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"", "unreadable"), (b"not a zip at all", "unreadable"), (None, "not found")],
    ids=["empty", "garbage", "missing"],
)
def test_damaged_torch_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "last.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=words) as info:
        safe_torch_load(path)
    assert "\n" not in str(info.value)


def test_truncated_checkpoint_is_a_data_error(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="unreadable checkpoint"):
        safe_torch_load(path)


def test_paths_from_files_must_stay_inside_the_run(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "ok.ckpt").write_bytes(b"x")
    assert require_inside(run / "ok.ckpt", run, "best") == (run / "ok.ckpt").resolve()
    for outside in (tmp_path / "evil.ckpt", run / ".." / ".." / "evil.ckpt"):
        with pytest.raises(DataError, match="outside the run's folder"):
            require_inside(outside, run, "best checkpoint")
    (run / "link.ckpt").symlink_to(tmp_path / "evil.ckpt")
    with pytest.raises(DataError, match="outside"):
        require_inside(run / "link.ckpt", run, "best checkpoint")
