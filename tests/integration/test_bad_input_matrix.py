"""The bad-input and fault matrix: every command, every class of bad input, one line, exit 2, nothing written.

Each case builds its input (a damaged copy of the tiny synthetic folder, a forged checkpoint, a bad option, an output
path that cannot be written), runs ``xrec-pl`` in process, and checks:

* exit status 2 and exactly one ``xrec-pl: error:`` line on stderr, no traceback;
* the line names what is wrong (each case lists words that must appear: the file or the option);
* no code ran (payloads touch a marker file) and no file changed: the input folders and any existing run folder hash
  the same before and after, and a new run folder holds no checkpoint, metrics or predictions.

Classes (ids start with the class): ``config`` (config files of every command), ``data`` (damaged data folders,
for stage 1, stage 2 and the pipeline), ``emb`` (stage-2 embedding files), ``opt`` (option values and typos),
``ckpt`` (checkpoints: malicious, damaged, foreign, outside paths), ``out`` (outputs: inputs overwritten, folders in
the way, unwritable), ``tool`` (tool commands' own inputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from xrec_pl.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STAGE1 = str(REPO / "configs/stage1/synthetic.yaml")
STAGE2 = str(REPO / "configs/stage2/synthetic.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
S2 = ["--model.llm=tiny-random", "--model.embedding_source=random", "--model.embeddings_path=null"]
WRITTEN = ("checkpoints", "metrics.json", "predictions.jsonl", "embeddings.safetensors", "community_choice.jsonl")


@dataclass
class Case:
    """``argv(ctx)`` builds the command line; ``words(ctx)`` the strings the error line must hold."""

    id: str
    argv: Callable[[Ctx], list[str]]
    words: Callable[[Ctx], list[str]]
    prepare: Callable[[Ctx], None] = lambda ctx: None


@dataclass
class Ctx:
    tmp: Path
    data: Path  # a private copy of the tiny synthetic folder (mutable by prepare)
    s1: Path  # a private copy of a finished stage-1 run
    s2: Path  # a private copy of a finished stage-2 run
    marker: Path
    extra: dict = field(default_factory=dict)

    @property
    def run(self) -> Path:
        return self.tmp / "new_run"


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------------ builders
def s1_fit(ctx: Ctx, *extra: str, data: Path | None = None) -> list[str]:
    data = data or ctx.data
    return ["fit", "-c", STAGE1, f"--data.data_dir={data}", f"--trainer.default_root_dir={ctx.run}", *QUIET, *extra]


def s2(cmd: str, ctx: Ctx, *extra: str, root: Path | None = None) -> list[str]:
    root = root or ctx.run
    return [cmd, "-c", STAGE2, *S2, f"--data.data_dir={ctx.data}", f"--trainer.default_root_dir={root}", *QUIET, *extra]


def s1(cmd: str, ctx: Ctx, *extra: str, root: Path | None = None) -> list[str]:
    root = root or ctx.run
    return [cmd, "-c", STAGE1, f"--data.data_dir={ctx.data}", f"--trainer.default_root_dir={root}", *QUIET, *extra]


def pipeline(ctx: Ctx, *extra: str) -> list[str]:
    return [
        "pipeline",
        "--data_dir",
        str(ctx.data),
        "--out_dir",
        str(ctx.run),
        "--stage2_args",
        json.dumps([*S2, "--trainer.max_steps=1"]),
        *extra,
    ]


def prepare_data(ctx: Ctx) -> list[str]:
    return ["prepare-data", "--source", str(ctx.data), "--out", str(ctx.run)]


def _preds(ctx: Ctx) -> Path:
    path = ctx.tmp / "predictions.jsonl"
    if not path.exists():
        path.write_text(json.dumps({"prediction": "a good book", "reference": "a great book"}) + "\n")
    return path


def experiment(ctx: Ctx, *extra: str) -> list[str]:
    return ["experiment", "-c", str(REPO / "configs/experiments/smoke.yaml"), "--out_dir", str(ctx.run), *extra]


def evaluate(ctx: Ctx, *extra: str) -> list[str]:
    return ["evaluate", "--predictions", str(_preds(ctx)), "--metrics", "[usr]", *extra]


# ------------------------------------------------------------------------------------------------- data faults
def _csv(name: str, text: str, mode: str = "append") -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        path = ctx.data / name
        path.write_text(path.read_text() + text if mode == "append" else text)

    return prepare


def _bytes(name: str, data: bytes) -> Callable[[Ctx], None]:
    return lambda ctx: (ctx.data / name).write_bytes(data)


def _unlink(name: str) -> Callable[[Ctx], None]:
    return lambda ctx: (ctx.data / name).unlink()


def _exploit(name: str) -> Callable[[Ctx], None]:
    return lambda ctx: (ctx.data / name).write_bytes(pickle.dumps(_Exploit(ctx.marker)))


def _all_items(ctx: Ctx) -> None:
    path = ctx.data / "total_trn.csv"
    path.write_text(path.read_text() + "".join(f"0,{i}\n" for i in range(50)))


def _dup_column(ctx: Ctx) -> None:
    path = ctx.data / "total_trn.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["user,user", *lines[1:]]) + "\n")


def _arrow_offset(ctx: Ctx) -> None:
    import pandas as pd

    raw = bytearray(pickle.dumps(pd.DataFrame({"explanation": ["hello world", "yy"]}), protocol=4))
    at = raw.find(struct.pack("<3q", 0, 11, 13))
    if at < 0:  # pandas 2 writes object columns: damage the frame's pickle instead
        raw = raw[: len(raw) // 2]
    else:
        raw[at + 16 : at + 24] = struct.pack("<q", 10**7)
    (ctx.data / "trn.pkl").write_bytes(bytes(raw))


def _stale_json(ctx: Ctx) -> None:
    (ctx.data / "para_dict.json").write_text(json.dumps({"user_num": 3}))


def _missing_column_pkl(ctx: Ctx) -> None:
    import pandas as pd

    frame = pd.read_pickle(ctx.data / "trn.pkl").drop(columns=["explanation"])  # our own fixture: safe to read
    (ctx.data / "trn.pkl").write_bytes(pickle.dumps(frame))


DATA_FAULTS: list[tuple[str, Callable[[Ctx], None], list[str]]] = [
    ("missing-para-dict", _unlink("para_dict.pickle"), ["para_dict.pickle", "not found"]),
    ("malicious-para-dict", _exploit("para_dict.pickle"), ["para_dict.pickle", "refused global"]),
    (
        "truncated-para-dict",
        lambda c: _bytes("para_dict.pickle", (c.data / "para_dict.pickle").read_bytes()[:30])(c),
        ["para_dict.pickle", "not a readable pickle"],
    ),
    ("stale-json", _stale_json, ["para_dict.json", "para_dict.pickle"]),
    ("renamed-column", _csv("total_trn.csv", "usr,item\n0,1\n", mode="replace"), ["total_trn.csv", "user"]),
    ("id-out-of-range", _csv("total_val.csv", "999999,0\n"), ["total_val.csv", "999999"]),
    ("id-2^63", _csv("total_val.csv", "9223372036854775808,0\n"), ["total_val.csv", "9223372036854775808"]),
    ("id-1e400", _csv("total_val.csv", "1e400,0\n"), ["total_val.csv", "1e400"]),
    ("id-negative", _csv("total_trn.csv", "-1,0\n"), ["total_trn.csv", "-1"]),
    ("empty-split", _csv("total_tst.csv", "user,item\n", mode="replace"), ["total_tst.csv", "no interactions"]),
    ("missing-split", _unlink("total_trn.csv"), ["total_trn.csv", "not found"]),
    ("binary-csv", _bytes("total_trn.csv", b"user,item\n\xff\xfe\x00,\x80\n"), ["total_trn.csv", "readable"]),
    ("duplicate-column", _dup_column, ["total_trn.csv", "item"]),
    ("all-items-user", _all_items, ["total_trn.csv", "all 50 items"]),
]
TEXT_FAULTS: list[tuple[str, Callable[[Ctx], None], list[str]]] = [
    ("malicious-records", _exploit("trn.pkl"), ["trn.pkl", "refused global"]),
    ("arrow-offset", _arrow_offset, ["trn.pkl"]),
    ("missing-records", _unlink("trn.pkl"), ["trn"]),
    ("records-not-pickle", _bytes("trn.pkl", b"\x00garbage"), ["trn.pkl", "pickle"]),
    ("corrupt-parquet", _bytes("trn.parquet", b"PAR1garbagePAR1"), ["trn.parquet", "Parquet"]),
    ("missing-records-column", _missing_column_pkl, ["trn.pkl", "explanation"]),
]


PREDICT_FAULTS: list[tuple[str, Callable[[Ctx], None], list[str]]] = [  # predict reads the test split only
    ("malicious-records", _exploit("tst.pkl"), ["tst.pkl", "refused global"]),
    ("missing-records", _unlink("tst.pkl"), ["tst"]),
    ("records-not-pickle", _bytes("tst.pkl", b"\x00garbage"), ["tst.pkl", "pickle"]),
]


# ------------------------------------------------------------------------------------------- embedding faults
def _emb(**tensors: torch.Tensor) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(ctx.tmp / "emb.safetensors"))

    return prepare


def _emb_pt(ctx: Ctx) -> None:
    torch.save(
        {"user": torch.zeros(60, 64), "item": torch.zeros(50, 64), "x": _Exploit(ctx.marker)},
        ctx.tmp / "emb.safetensors",
    )


EMB_FAULTS: list[tuple[str, Callable[[Ctx], None], list[str]]] = [
    ("missing", lambda ctx: None, ["emb.safetensors", "not found"]),
    ("1-D", _emb(user=torch.zeros(60), item=torch.zeros(50)), ["emb.safetensors", "2-D"]),
    ("nan", _emb(user=torch.full((60, 64), float("nan")), item=torch.zeros(50, 64)), ["emb.safetensors", "finite"]),
    ("inf", _emb(user=torch.zeros(60, 64), item=torch.full((50, 64), float("inf"))), ["emb.safetensors", "finite"]),
    ("wrong-keys", _emb(users=torch.zeros(60, 64), items=torch.zeros(50, 64)), ["emb.safetensors", "user"]),
    ("wrong-width", _emb(user=torch.zeros(60, 32), item=torch.zeros(50, 32)), ["emb.safetensors", "graph_dim"]),
    ("too-few-rows", _emb(user=torch.zeros(3, 64), item=torch.zeros(50, 64)), ["3"]),
    ("int-dtype", _emb(user=torch.zeros(60, 64, dtype=torch.int64), item=torch.zeros(50, 64)), ["emb.safetensors"]),
    ("torch-pickle", _emb_pt, ["emb.safetensors", "safetensors"]),
    ("garbage", lambda ctx: (ctx.tmp / "emb.safetensors").write_bytes(b"\x00" * 20), ["emb.safetensors"]),
    ("folder", lambda ctx: (ctx.tmp / "emb.safetensors").mkdir(), ["emb.safetensors"]),
]


def _graph_s2(ctx: Ctx) -> list[str]:
    args = s2("fit", ctx)
    args[args.index("--model.embedding_source=random")] = "--model.embedding_source=graph"
    args[args.index("--model.embeddings_path=null")] = f"--model.embeddings_path={ctx.tmp / 'emb.safetensors'}"
    return args


# --------------------------------------------------------------------------------------------- option faults
OPT_FAULTS: list[tuple[str, Callable[[Ctx], list[str]], list[str]]] = [
    ("s2-adapter-typo", lambda c: s2("fit", c, "--model.adapter=moee"), ["adapter", "moee"]),
    ("s2-injection-typo", lambda c: s2("fit", c, "--model.injection=layer"), ["injection", "layer"]),
    ("s2-source-typo", lambda c: s2("fit", c, "--model.embedding_source=graf"), ["embedding_source", "graf"]),
    ("s2-batch-0", lambda c: s2("fit", c, "--data.batch_size=0"), ["batch_size"]),
    ("s2-batch-text", lambda c: s2("fit", c, "--data.batch_size=many"), ["batch_size"]),
    ("s2-experts-0", lambda c: s2("fit", c, "--model.num_experts=0"), ["num_experts"]),
    ("s2-dropout-2", lambda c: s2("fit", c, "--model.adapter_dropout=2"), ["dropout"]),
    ("s2-llm-missing", lambda c: s2("fit", c, "--model.llm=/nonexistent/model"), ["/nonexistent/model"]),
    ("s2-llm-broken-dir", lambda c: s2("fit", c, f"--model.llm={c.tmp}"), ["LLM"]),
    ("s2-unknown-option", lambda c: s2("fit", c, "--model.nope=3"), ["nope"]),
    ("s2-unknown-class", lambda c: s2("fit", c, "--model=xrec_pl.nope.Nope"), ["xrec_pl.nope.Nope"]),
    ("s2-callback-not-callback", lambda c: s2("fit", c, "--trainer.callbacks+=os.system"), ["os.system"]),
    ("s2-graph-without-path", lambda c: s2("fit", c, "--model.embedding_source=graph"), ["embeddings_path"]),
    ("s2-lr-negative", lambda c: s2("fit", c, "--model.lr=-1"), ["lr", "-1"]),
    ("s2-lr-zero", lambda c: s2("fit", c, "--model.lr=0"), ["lr"]),
    ("s2-max-new-tokens-0", lambda c: s2("fit", c, "--model.max_new_tokens=0"), ["max_new_tokens"]),
    ("s2-warmup-negative", lambda c: s2("fit", c, "--model.warmup_steps=-3"), ["warmup_steps"]),
    ("s2-decay-negative", lambda c: s2("fit", c, "--model.decay_steps=-2"), ["decay_steps"]),
    (
        "s2-decay-too-long",
        lambda c: s2("fit", c, "--model.decay_steps=500", "--trainer.max_steps=3"),
        ["model.decay_steps (500)", "3 optimizer steps"],
    ),
    ("s1-dim-neg", lambda c: s1_fit(c, "--model.dim=-5"), ["dim=-5"]),
    ("s1-lr-negative", lambda c: s1_fit(c, "--model.lr=-0.1"), ["lr"]),
    ("s1-layers-neg", lambda c: s1_fit(c, "--model.num_layers=-1"), ["num_layers=-1"]),
    ("s1-combine-typo", lambda c: s1_fit(c, "--model.combine=avg"), ["combine", "avg"]),
    ("s1-epochs-text", lambda c: s1_fit(c, "--trainer.max_epochs=abc"), ["max_epochs"]),
    ("s1-unknown-option", lambda c: s1_fit(c, "--data.nope=1"), ["nope"]),
    ("s1-data-dir-missing", lambda c: s1_fit(c, data=c.tmp / "absent"), ["absent"]),
    ("s1-data-dir-is-file", lambda c: s1_fit(c, data=STAGE1_PATH), ["synthetic.yaml"]),
]
STAGE1_PATH = Path(STAGE1)


# ------------------------------------------------------------------------------------------ checkpoint faults
def _ckpt_exploit(ctx: Ctx) -> None:
    torch.save({"state_dict": {}, "payload": _Exploit(ctx.marker)}, ctx.tmp / "evil.ckpt")


def _ckpt_truncated(ctx: Ctx) -> None:
    data = (ctx.s2 / "checkpoints" / "last.ckpt").read_bytes()
    (ctx.tmp / "evil.ckpt").write_bytes(data[: len(data) // 3])


def _ckpt_garbage(ctx: Ctx) -> None:
    (ctx.tmp / "evil.ckpt").write_bytes(b"PK\x03\x04 garbage")


def _ckpt_outside(ctx: Ctx) -> None:
    last = ctx.s1 / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("ModelCheckpoint")]
    state["callbacks"][key]["dirpath"] = str(ctx.s1 / "checkpoints")
    for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if state["callbacks"][key].get(name):
            state["callbacks"][key][name] = str(ctx.s1 / "checkpoints" / Path(state["callbacks"][key][name]).name)
    state["callbacks"][key]["best_model_path"] = str(ctx.tmp / "victim.ckpt")
    torch.save(state, last)


def _evil(ctx: Ctx) -> str:
    return f"--ckpt_path={ctx.tmp / 'evil.ckpt'}"


CKPT_FAULTS: list[Case] = []
for _cmd in ("fit", "validate", "test", "predict"):
    for _name, _prep, _words in (
        ("malicious", _ckpt_exploit, ["evil.ckpt", "posix.system"]),
        ("truncated", _ckpt_truncated, ["evil.ckpt", "unreadable"]),
        ("garbage", _ckpt_garbage, ["evil.ckpt", "unreadable"]),
    ):
        CKPT_FAULTS.append(
            Case(f"ckpt-s2-{_cmd}-{_name}", lambda c, cmd=_cmd: s2(cmd, c, _evil(c)), lambda c, w=_words: w, _prep)
        )
    CKPT_FAULTS.append(
        Case(
            f"ckpt-s1-{_cmd}-malicious",
            lambda c, cmd=_cmd: s1(cmd, c, _evil(c)),
            lambda c: ["posix.system"],
            _ckpt_exploit,
        )
    )
CKPT_FAULTS += [
    Case(
        "ckpt-missing-file", lambda c: s2("predict", c, f"--ckpt_path={c.tmp / 'none.ckpt'}"), lambda c: ["none.ckpt"]
    ),
    Case(
        "ckpt-stage1-into-stage2",
        lambda c: s2("predict", c, f"--ckpt_path={c.s1 / 'checkpoints' / 'last.ckpt'}"),
        lambda c: ["last.ckpt"],
    ),
    Case(
        "ckpt-stage2-into-stage1",
        lambda c: s1("test", c, f"--ckpt_path={c.s2 / 'checkpoints' / 'last.ckpt'}"),
        lambda c: ["last.ckpt", "another model"],
    ),
    Case(
        "ckpt-resume-changed-lr",
        lambda c: s2("fit", c, "--model.lr=0.5", "--ckpt_path=last", root=c.s2),
        lambda c: ["model.lr"],
    ),
    Case(
        "ckpt-resume-changed-lr-explicit-file",
        lambda c: s2("fit", c, "--model.lr=0.5", f"--ckpt_path={c.s2 / 'checkpoints' / 'last.ckpt'}", root=c.s2),
        lambda c: ["model.lr"],
    ),
    Case(
        "ckpt-names-file-outside-run",
        lambda c: s1("fit", c, "--trainer.max_epochs=3", "--ckpt_path=last", root=c.s1),
        lambda c: ["victim.ckpt", "outside"],
        _ckpt_outside,
    ),
]


# ---------------------------------------------------------------------------------------------- output faults
def _file(ctx: Ctx, name: str = "a_file") -> Path:
    path = ctx.tmp / name
    path.write_text("x")
    return path


OUT_FAULTS: list[Case] = [
    Case("out-evaluate-over-predictions", lambda c: evaluate(c, "--output", str(_preds(c))), lambda c: ["--output"]),
    Case("out-evaluate-is-folder", lambda c: evaluate(c, "--output", str(c.tmp)), lambda c: ["--output", "folder"]),
    Case(
        "out-evaluate-under-file",
        lambda c: evaluate(c, "--output", str(_file(c) / "o.json")),
        lambda c: ["--output", "a_file"],
    ),
    Case("out-evaluate-read-only-fs", lambda c: evaluate(c, "--output", "/proc/xrec.json"), lambda c: ["/proc"]),
    Case(
        "out-evaluate-over-references",
        lambda c: evaluate(c, "--references", str(_preds(c)), "--output", str(_preds(c))),
        lambda c: ["--output"],
    ),
    Case("out-bench-is-folder", lambda c: ["bench", "--parts", "[stage1]", "--out", str(c.tmp)], lambda c: ["--out"]),
    Case(
        "out-convert-into-source",
        lambda c: ["convert", "--src", str(c.data), "--dst", str(c.data / "sub")],
        lambda c: ["--dst", "input"],
    ),
    Case(
        "out-convert-dst-is-file",
        lambda c: ["convert", "--src", str(c.data), "--dst", str(_file(c))],
        lambda c: ["--dst"],
    ),
    Case("out-synthetic-is-file", lambda c: ["make-synthetic", "--out", str(_file(c))], lambda c: ["--out", "a_file"]),
    Case("out-synthetic-not-empty", lambda c: ["make-synthetic", "--out", str(c.data)], lambda c: ["not empty"]),
    Case("out-pipeline-is-file", lambda c: [*pipeline(c)[:3], "--out_dir", str(_file(c))], lambda c: ["--out_dir"]),
    Case(
        "out-run-folder-is-file",
        lambda c: s1_fit(c)[:-2] + [f"--trainer.default_root_dir={_file(c)}"],
        lambda c: ["a_file"],
    ),
    Case(
        "out-embeddings-is-folder",
        lambda c: s1_fit(c),
        lambda c: ["embeddings.safetensors", "folder"],
        lambda c: (c.run / "embeddings.safetensors").mkdir(parents=True),
    ),
    Case(
        "out-predictions-is-folder",
        lambda c: s2("predict", c),
        lambda c: ["predictions.jsonl", "folder"],
        lambda c: (c.run / "predictions.jsonl").mkdir(parents=True),
    ),
    Case(
        "out-run-inside-data",
        lambda c: s1_fit(c)[:-2] + [f"--trainer.default_root_dir={c.data / 'run'}"],
        lambda c: ["input"],
    ),
    Case(
        "out-fit-over-earlier-run",
        lambda c: s1("fit", c, root=c.s1),
        lambda c: ["checkpoints", "--ckpt_path last"],
    ),
]


# ------------------------------------------------------------------------------------------------ tool faults
TOOL_FAULTS: list[Case] = [
    Case("tool-evaluate-unknown-metric", lambda c: evaluate(c, "--metrics", "[nope]"), lambda c: ["--metrics", "nope"]),
    Case(
        "tool-evaluate-missing-file",
        lambda c: ["evaluate", "--predictions", str(c.tmp / "no.jsonl")],
        lambda c: ["no.jsonl"],
    ),
    Case(
        "tool-evaluate-binary-jsonl",
        lambda c: ["evaluate", "--predictions", str(c.tmp / "b.jsonl"), "--metrics", "[usr]"],
        lambda c: ["b.jsonl", "UTF-8"],
        lambda c: (c.tmp / "b.jsonl").write_bytes(b"\xff\xfe\x00x\n"),
    ),
    Case(
        "tool-evaluate-bad-json-line",
        lambda c: ["evaluate", "--predictions", str(c.tmp / "b.jsonl"), "--metrics", "[usr]"],
        lambda c: ["b.jsonl", "line 1"],
        lambda c: (c.tmp / "b.jsonl").write_text("{not json\n"),
    ),
    Case(
        "tool-evaluate-missing-field",
        lambda c: ["evaluate", "--predictions", str(c.tmp / "b.jsonl"), "--metrics", "[usr]"],
        lambda c: ["b.jsonl", "prediction"],
        lambda c: (c.tmp / "b.jsonl").write_text('{"text": "x"}\n'),
    ),
    Case(
        "tool-evaluate-malicious-pickle",
        lambda c: ["evaluate", "--predictions", str(c.tmp / "p.pkl"), "--metrics", "[usr]"],
        lambda c: ["p.pkl", "refused global"],
        lambda c: (c.tmp / "p.pkl").write_bytes(pickle.dumps(_Exploit(c.marker))),
    ),
    Case(
        "tool-evaluate-records-malicious",
        lambda c: evaluate(c, "--records", str(c.data / "tst.pkl")),
        lambda c: ["tst.pkl", "refused global"],
        _exploit("tst.pkl"),
    ),
    Case(
        "tool-synthetic-size",
        lambda c: ["make-synthetic", "--out", str(c.run), "--size", "huge"],
        lambda c: ["--size", "huge"],
    ),
    Case(
        "tool-convert-format",
        lambda c: ["convert", "--src", str(c.data), "--dst", str(c.run), "--format", "csv"],
        lambda c: ["--format", "csv"],
    ),
    Case(
        "tool-convert-malicious",
        lambda c: ["convert", "--src", str(c.data), "--dst", str(c.run)],
        lambda c: ["trn.pkl", "refused global"],
        _exploit("trn.pkl"),
    ),
    Case(
        "tool-convert-src-missing",
        lambda c: ["convert", "--src", str(c.tmp / "x"), "--dst", str(c.run)],
        lambda c: ["x"],
    ),
    Case(
        "tool-bench-unknown-part",
        lambda c: ["bench", "--parts", "[nope]", "--out", str(c.run / "b.json")],
        lambda c: ["nope"],
    ),
    Case("tool-experiment-unknown-arm", lambda c: experiment(c, "--arms", "[nope]"), lambda c: ["nope"]),
    Case("tool-experiment-no-seeds", lambda c: experiment(c, "--seeds", "[]"), lambda c: ["seed"]),
    Case("tool-unknown-command", lambda c: ["frobnicate"], lambda c: ["frobnicate"]),
    Case("tool-pipeline-unknown-option", lambda c: [*pipeline(c), "--nope", "1"], lambda c: ["nope"]),
]


# ---------------------------------------------------------------------------------------------- config faults
CONFIG_COMMANDS: dict[str, Callable[[Ctx, str], list[str]]] = {
    "s1-fit": lambda c, cfg: ["fit", "-c", cfg],
    "s2-fit": lambda c, cfg: ["fit", "-c", cfg],
    "validate": lambda c, cfg: ["validate", "-c", cfg],
    "test": lambda c, cfg: ["test", "-c", cfg],
    "predict": lambda c, cfg: ["predict", "-c", cfg],
    "pipeline": lambda c, cfg: ["pipeline", "-c", cfg],
    "evaluate": lambda c, cfg: ["evaluate", "-c", cfg],
    "experiment": lambda c, cfg: ["experiment", "-c", cfg],
    "convert": lambda c, cfg: ["convert", "-c", cfg],
    "make-synthetic": lambda c, cfg: ["make-synthetic", "-c", cfg],
    "bench": lambda c, cfg: ["bench", "-c", cfg],
    "prepare-data": lambda c, cfg: ["prepare-data", "-c", cfg],
}
CONFIG_FILES: dict[str, tuple[bytes | None, str]] = {
    "missing": (None, "not found"),
    "empty": (b"", "empty"),
    "not-yaml": (b"model: [\n", "not valid YAML"),
    "a-list": (b"- 1\n- 2\n", "mapping"),
    "binary": (b"\xff\xfe\x00\x01", "UTF-8"),
}


def _config_case(command: str, kind: str) -> Case:
    content, words = CONFIG_FILES[kind]

    def prepare(ctx: Ctx) -> None:
        if content is not None:
            (ctx.tmp / "cfg.yaml").write_bytes(content)

    return Case(
        f"config-{command}-{kind}",
        lambda c: CONFIG_COMMANDS[command](c, str(c.tmp / "cfg.yaml")),
        lambda c: ["cfg.yaml", words],
        prepare,
    )


CASES: list[Case] = [
    *(_config_case(cmd, kind) for cmd in CONFIG_COMMANDS for kind in CONFIG_FILES),
    *(Case(f"data-s1-{n}", lambda c: s1_fit(c), lambda c, w=w: w, p) for n, p, w in DATA_FAULTS),
    *(Case(f"data-pipeline-{n}", lambda c: pipeline(c), lambda c, w=w: w, p) for n, p, w in DATA_FAULTS[:6]),
    *(
        Case(f"data-prepare-{n}", prepare_data, lambda c, w=w: w, p)
        for n, p, w in DATA_FAULTS + TEXT_FAULTS + PREDICT_FAULTS
        # prepare-data rebuilds the first two (the release lacks them); all-items-user is refused as well, but first
        # as a total_trn.csv that disagrees with para_dict (tests/unit/test_prepare_data.py has it alone)
        if n not in ("missing-para-dict", "missing-split", "all-items-user")
    ),
    *(Case(f"data-s2-{n}", lambda c: s2("fit", c), lambda c, w=w: w, p) for n, p, w in TEXT_FAULTS),
    *(Case(f"data-s2-predict-{n}", lambda c: s2("predict", c), lambda c, w=w: w, p) for n, p, w in PREDICT_FAULTS),
    *(Case(f"emb-{n}", _graph_s2, lambda c, w=w: w, p) for n, p, w in EMB_FAULTS),
    *(Case(f"opt-{n}", a, lambda c, w=w: w) for n, a, w in OPT_FAULTS),
    Case(
        "opt-s2-random-without-sizes",
        lambda c: s2("fit", c),
        lambda c: ["num_users", "para_dict"],
        _unlink("para_dict.pickle"),
    ),
    *CKPT_FAULTS,
    *OUT_FAULTS,
    *TOOL_FAULTS,
]


# ------------------------------------------------------------------------------------------------------- runner
def _snapshot(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        if not folder.exists():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != ".xrec-pl.lock" and not path.is_symlink():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def runs(synthetic_dir, tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("matrix_runs")
    one = base / "s1"
    assert (
        main(
            [
                "fit",
                "-c",
                STAGE1,
                f"--data.data_dir={synthetic_dir}",
                f"--trainer.default_root_dir={one}",
                *QUIET,
                "--trainer.max_epochs=2",
                "--trainer.check_val_every_n_epoch=1",
            ]
        )
        == 0
    )
    two = base / "s2"
    assert (
        main(
            [
                "fit",
                "-c",
                STAGE2,
                *S2,
                f"--data.data_dir={synthetic_dir}",
                f"--trainer.default_root_dir={two}",
                *QUIET,
                "--trainer.max_steps=2",
            ]
        )
        == 0
    )
    return one, two


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, runs, synthetic_dir, tmp_path, capsys):
    ctx = Ctx(tmp=tmp_path, data=tmp_path / "data", s1=tmp_path / "s1", s2=tmp_path / "s2", marker=tmp_path / "pwned")
    shutil.copytree(synthetic_dir, ctx.data)
    # the runs are copied to the paths their checkpoints name, so Lightning restores (and we check) those paths
    shutil.copytree(runs[0], ctx.s1)
    shutil.copytree(runs[1], ctx.s2)
    case.prepare(ctx)
    argv, words = case.argv(ctx), case.words(ctx)
    before = _snapshot(ctx.data, ctx.s1, ctx.s2)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("xrec-pl: error:")]
    assert code == 2 and len(lines) == 1, f"exit {code}, {len(lines)} error lines; stderr tail:\n{err[-2500:]}"
    assert "Traceback" not in err and "weights_only=False" not in err
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    assert not ctx.marker.exists(), "a payload ran"
    assert _snapshot(ctx.data, ctx.s1, ctx.s2) == before, "an input or an existing run changed"
    if ctx.run.exists():
        left = [p.name for p in ctx.run.iterdir() if p.name in WRITTEN and not case.id.startswith("out-")]
        assert not left, f"a failed run wrote {left}"
