"""Same seed, same machine, two threads: the shipped synthetic stage 1 writes bit-identical embeddings.

Without ``trainer.deterministic`` the multi-threaded embedding-gradient sums differ in the last bit between runs
(measured 2.4e-7 on the default synthetic data), and stage 2's Adam steps turn that into different explanations and
scores (``make train`` gave BERTScore-F1 0.531 / 0.525 and community choice 0.483 / 0.383 for the same seed). Stage 2
itself is deterministic given the same embeddings (checked by hand: identical adapter weights after six steps).
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.integration.cli_runs import run, stage1_args

pytestmark = pytest.mark.integration

ARGS = ("--trainer.enable_progress_bar=false",)


def test_stage1_is_bit_identical_across_runs_with_two_threads(tmp_path):
    """The default synthetic dataset and the shipped config, as ``make train`` runs them.

    The control (``--trainer.deterministic=false``) gave different tables in each of three tries here; it is not part
    of the suite, since a nondeterministic result may also happen to agree.
    """
    from xrec_pl.data.synthetic import make_synthetic

    data = tmp_path / "data"
    make_synthetic(data, seed=0, size="default")
    tables = []
    for name in ("a", "b"):
        args = stage1_args(data, tmp_path / name, *ARGS)
        done = run("fit", args, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
        assert done.returncode == 0, done.stderr[-2000:]
        tables.append(load_file(str(tmp_path / name / "embeddings.safetensors")))
    for key in ("user", "item"):
        assert tables[0][key].equal(tables[1][key]), key
