"""Helpers for the integration tests that run the real ``xrec-pl`` CLI in subprocesses (resume, preemption, W&B)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[2]
XREC = str(Path(sys.executable).parent / "xrec-pl")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: one thread (2 shared cores), offline, this checkout importable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        WANDB_MODE=env.get("WANDB_MODE", "offline"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    env.pop("WANDB_SERVICE", None)  # a W&B service started by an in-process test is never shared with a child run
    return env


def stage2_args(data_dir: Path, root: Path, *extra: str, llm: str = "tiny-random") -> list[str]:
    """``fit`` arguments of the synthetic stage-2 config on a tiny random Llama with per-id random embeddings."""
    return [
        "-c",
        str(REPO / "configs/stage2/synthetic.yaml"),
        f"--model.llm={llm}",
        "--model.embedding_source=random",
        "--model.embeddings_path=null",
        f"--data.data_dir={data_dir}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def stage1_args(data_dir: Path, root: Path, *extra: str) -> list[str]:
    """``fit`` arguments of the synthetic stage-1 config on the given data."""
    return [
        "-c",
        str(REPO / "configs/stage1/synthetic.yaml"),
        f"--data.data_dir={data_dir}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def run(command: str, args: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """Run ``xrec-pl COMMAND ARGS`` to completion; output captured."""
    return subprocess.run(
        [XREC, command, *args], cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout
    )


def start(command: str, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``xrec-pl COMMAND ARGS`` in the background, output into ``log``."""
    out = open(log, "w")  # noqa: SIM115 (closed by the OS when the child ends; the test reads it afterwards)
    return subprocess.Popen([XREC, command, *args], cwd=REPO, env=cli_env(**env), stdout=out, stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until ``path`` exists; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGKILL)
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint that training changes: weights and optimizer state, flattened by key."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    out = {f"state_dict/{k}": v for k, v in state["state_dict"].items()}
    for i, opt in enumerate(state.get("optimizer_states", [])):
        for pid, slots in opt["state"].items():
            for name, value in slots.items():
                out[f"optimizer{i}/{pid}/{name}"] = torch.as_tensor(value)
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    """Bit-identical weights and optimizer state in two checkpoints."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors differ between {a} and {b}: {differ[:5]}"


class PauseAtStep(pl.Callback):
    """Test helper: at the start of the batch after ``step`` optimizer steps, write ``marker`` and wait.

    The checkpoint of step ``step`` has been written by then (``ModelCheckpoint`` runs at the end of each batch),
    and the next batch has been fetched: a SIGKILL now interrupts the run in the middle of its epoch. The run goes on
    when ``<marker>.go`` appears (or after ``seconds``).
    """

    def __init__(self, step: int, marker: str, seconds: float = 600.0) -> None:
        self.step, self.marker, self.seconds = int(step), marker, float(seconds)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(self.step))
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline and not Path(self.marker + ".go").exists():
                time.sleep(0.05)


class KillDuringSave(pl.Callback):
    """Test helper: when the checkpoint of ``step`` starts being written, SIGKILL this process ``delay`` s later.

    ``on_save_checkpoint`` runs while Lightning builds the checkpoint, before it is serialised and written, so a
    short delay lands the kill inside the serialisation or the file write of that checkpoint (or of the next one).
    """

    def __init__(self, step: int, delay: float) -> None:
        self.step, self.delay, self.armed = int(step), float(delay), True

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict) -> None:
        if self.armed and trainer.global_step == self.step:
            import threading

            self.armed = False
            threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
