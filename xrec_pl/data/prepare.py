"""Turn a raw XRec release folder (HKUDS/XRec ``data/{amazon,yelp,google}``) into the folder xrec-pl reads.

:func:`prepare_folder` reads the release's files through the project's checked readers (pickles only through the
restricted unpickler), rebuilds the files a release folder lacks (:mod:`xrec_pl.data.release_graph`), optionally
splits the public text records by the graph (``records="graph_split"``, how ``../shared/data`` was made), writes
everything into a temporary folder beside the destination, reads that folder back with the loaders the datamodules
use, and only then renames it into place: an error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from xrec_pl.data.io import (
    RECORD_SUFFIXES,
    SPLITS,
    check_records,
    load_record_frame,
    read_interactions,
    read_para_dict,
    read_records,
)
from xrec_pl.data.pickles import safe_load_pickle
from xrec_pl.data.release_graph import DERIVED_PARA, ReleaseGraph, check_present, is_lfs_pointer, read_release_graph
from xrec_pl.errors import DataError
from xrec_pl.outputs import check_output_dir
from xrec_pl.utils import check_choice

DatasetName = Literal["amazon", "yelp", "google"]
RecordSource = Literal["release", "graph_split"]
DOMAINS = {"amazon": "books", "yelp": "business", "google": "business"}
RELEASE_SIZES = {"amazon": (15349, 15247), "yelp": (15962, 14085)}  # users, items of the release's graphs
REFERENCE_OUTPUTS = ("tst_pred.pkl", "tst_ref.pkl")  # the reference model's predictions / references (optional)
SPLIT_HINT = "; or pass --records graph_split to split tst.pkl's public records by the graph instead"

Writer = Callable[[Path], None]


@dataclass
class PrepareSummary:
    """What :func:`prepare_folder` wrote, counted from the prepared folder as the loaders read it.

    Attributes:
        out: The prepared folder.
        dataset: ``amazon``, ``yelp``, ``google`` or ``None`` (not given and not the folder's name).
        num_users: Users of the graph.
        num_items: Items of the graph.
        interactions: Interaction rows per split.
        records: Text records per split.
        derived: Written file -> what it was rebuilt from.
        copied: Files copied unchanged (after being checked).
        skipped: Source entries not needed by xrec-pl.
        notes: Facts about the input worth reading.
    """

    out: Path
    dataset: str | None
    num_users: int
    num_items: int
    interactions: dict[str, int]
    records: dict[str, int]
    derived: dict[str, str] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary as text lines for the terminal."""
        domain = f" (use --data.domain {DOMAINS[self.dataset]})" if self.dataset else ""
        lines = [
            f"prepared {self.out}: {self.dataset or 'XRec'} dataset{domain}",
            f"graph: {self.num_users:,} users, {self.num_items:,} items",
            "interactions: " + ", ".join(f"{s} {n:,}" for s, n in self.interactions.items()),
            "records: " + ", ".join(f"{s} {n:,}" for s, n in self.records.items()),
        ]
        lines += [f"derived {name} from {how}" for name, how in self.derived.items()]
        lines.append("copied unchanged: " + (", ".join(self.copied) or "nothing"))
        if self.skipped:
            lines.append("not needed, not copied: " + ", ".join(self.skipped))
        return lines + [f"note: {note}" for note in self.notes]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form of the summary."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


# -------------------------------------------------------------------------------------------------------- records
def _record_file(source: Path, split: str, hint: str) -> Path:
    for suffix in RECORD_SUFFIXES:
        path = source / f"{split}{suffix}"
        if path.is_file() and not is_lfs_pointer(path):
            return path
    pickled = source / f"{split}.pkl"
    return check_present(pickled, hint)  # raises: a pointer, or nothing at all


def _record_frame(path: Path) -> tuple[pd.DataFrame, bool]:
    """The records of ``path`` and whether the file itself is in a form the loaders read (else it is rewritten).

    The release's processing scripts pickle a list of per-record dicts; its loaders want a DataFrame. Both are read.
    """
    if path.suffix != ".pkl":
        return load_record_frame(path), True
    obj = safe_load_pickle(path)
    if isinstance(obj, pd.DataFrame):
        return obj, True
    if isinstance(obj, list) and obj and all(isinstance(row, dict) for row in obj):
        return pd.DataFrame(obj), False
    raise DataError(f"{path}: expected a pandas DataFrame or a list of record dicts, found {type(obj).__name__}")


def _parquet_writer(frame: pd.DataFrame) -> Writer:
    return lambda dst: frame.to_parquet(dst, index=False)


def _copier(src: Path) -> Writer:
    return lambda dst: shutil.copyfile(src, dst)


def _release_records(source: Path, graph: ReleaseGraph, plan: dict[str, Writer], summary: PrepareSummary) -> list[Path]:
    used = []
    for split in SPLITS:
        path = _record_file(source, split, SPLIT_HINT if split != "tst" else "")
        frame, readable = _record_frame(path)
        records = check_records(frame, path, graph.user_num, graph.item_num)
        used.append(path)
        if readable:
            plan[path.name] = _copier(path)
            summary.copied.append(path.name)
        else:
            plan[f"{split}.parquet"] = _parquet_writer(records)
            summary.derived[f"{split}.parquet"] = f"{path.name} (a pickled list of record dicts)"
    return used


def _graph_split_records(
    source: Path, graph: ReleaseGraph, plan: dict[str, Writer], summary: PrepareSummary
) -> list[Path]:
    """Split ``tst``'s records into trn/val/tst by the graph split that holds each record's ``(uid, iid)`` edge."""
    path = _record_file(source, "tst", "")
    records = check_records(_record_frame(path)[0], path, graph.user_num, graph.item_num)
    keys = records["uid"].to_numpy() * np.int64(graph.item_num) + records["iid"].to_numpy()
    inside = np.stack([np.isin(keys, graph.edge_keys(split)) for split in SPLITS])  # (3, R)
    home = np.where(inside.any(axis=0), inside.argmax(axis=0), -1)  # the first split holding the edge
    for k, split in enumerate(SPLITS):
        part = records[home == k].reset_index(drop=True)
        if part.empty:
            raise DataError(
                f"{path}: no record's (uid, iid) edge lies in the graph's {split} split; cannot split by it"
            )
        plan[f"{split}.parquet"] = _parquet_writer(part)
        summary.derived[f"{split}.parquet"] = f"{path.name}: its records whose (uid, iid) edge is in total_{split}.csv"
    if (home < 0).any():
        summary.notes.append(
            f"{int((home < 0).sum())} record(s) of {path.name} whose edge is in no split were left out"
        )
    if (inside.sum(axis=0) > 1).any():
        summary.notes.append(
            f"{int((inside.sum(axis=0) > 1).sum())} record(s) of {path.name} have an edge in several splits; "
            "each went to the first of trn, val, tst"
        )
    summary.notes.append(
        "the text records are the release's public test records, split by the graph; scores are not comparable "
        "with the paper's"
    )
    return [path]


# ---------------------------------------------------------------------------------------------------- other files
def _reference_outputs(source: Path, plan: dict[str, Writer], summary: PrepareSummary) -> list[Path]:
    used, lengths = [], {}
    for name in REFERENCE_OUTPUTS:
        path = source / name
        if not path.is_file():
            continue
        if is_lfs_pointer(path):
            summary.notes.append(f"{name} is a Git LFS pointer (not copied; `git lfs pull` fetches it)")
            continue
        texts = safe_load_pickle(path)
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DataError(f"{path}: expected a pickled list of strings, found {type(texts).__name__}")
        lengths[name] = len(texts)
        plan[name] = _copier(path)
        summary.copied.append(name)
        used.append(path)
    if len(set(lengths.values())) > 1:
        raise DataError(
            f"{source / REFERENCE_OUTPUTS[1]}: {lengths[REFERENCE_OUTPUTS[1]]} strings, but "
            f"{REFERENCE_OUTPUTS[0]} holds {lengths[REFERENCE_OUTPUTS[0]]}"
        )
    return used


def _graph_files(graph: ReleaseGraph, plan: dict[str, Writer], summary: PrepareSummary) -> list[Path]:
    if graph.para_file is not None:
        plan[graph.para_file.name] = _copier(graph.para_file)
        summary.copied.append(graph.para_file.name)
    else:
        text = json.dumps(graph.para_dict(), separators=(",", ":")) + "\n"
        plan[DERIVED_PARA] = lambda dst: dst.write_text(text, encoding="utf-8")
    for split in SPLITS:
        name = f"total_{split}.csv"
        if split in graph.csv_files:
            plan[name] = _copier(graph.csv_files[split])
            summary.copied.append(name)
        else:
            plan[name] = lambda dst, s=split: dst.write_text(graph.csv_text(s), encoding="utf-8")
    summary.derived.update(graph.derived)
    summary.notes.extend(graph.notes)
    return [p for p in (graph.para_file, *graph.csv_files.values(), graph.total_file) if p is not None]


# ---------------------------------------------------------------------------------------------------------- write
def _check_prepared(folder: Path, summary: PrepareSummary) -> None:
    """Read the written folder as the datamodules do and count it (a file that does not load stops everything)."""
    para = read_para_dict(folder)
    if (para["user_num"], para["item_num"]) != (summary.num_users, summary.num_items):
        raise DataError(f"{folder}: the written para_dict does not hold the graph's sizes")  # a bug, not bad input
    for split in SPLITS:
        summary.interactions[split] = len(read_interactions(folder, split, summary.num_users, summary.num_items))
        summary.records[split] = len(read_records(folder, split, summary.num_users, summary.num_items))


def _write_atomically(out: Path, plan: dict[str, Writer], summary: PrepareSummary) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".preparing", dir=out.parent))
    try:
        for name, write in plan.items():
            write(staging / name)
        _check_prepared(staging, summary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes a private folder; give it a plain mkdir's mode
        if out.is_dir():
            out.rmdir()  # empty: checked before anything was read
        try:
            os.rename(staging, out)
        except OSError as err:
            raise DataError(f"--out {out}: could not be created ({err.strerror or err}); nothing was written") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def prepare_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    dataset: DatasetName | None = None,
    records: RecordSource = "release",
) -> PrepareSummary:
    """Prepare an XRec release folder for xrec-pl: check every file, rebuild the missing ones, write ``out`` whole.

    Args:
        source: The release's ``data/<name>`` folder (after ``git lfs pull``), or any XRec-format folder.
        out: The folder to create; it must not exist or be empty. It is written in one rename at the end.
        dataset: ``amazon``, ``yelp`` or ``google``; defaults to the source folder's name when it is one of them.
            Names the prompt domain and compares the graph with the release's size.
        records: ``release``: the release's ``{trn,val,tst}.pkl`` are checked and copied. ``graph_split``: only
            ``tst.pkl`` (the release's public records) is read and split into trn/val/tst by the graph split of each
            record's ``(uid, iid)`` edge, written as ``{split}.parquet``.

    Returns:
        The :class:`PrepareSummary`, counted from the written folder.

    Raises:
        DataError: a missing, malformed, unsafe or Git-LFS-pointer input file, files that disagree, or an ``out``
            that exists and is not empty.
    """
    check_choice("records", records, RecordSource)
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DataError(f"--source {source}: not a folder")
    check_output_dir(out, "--out", [source])
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"--out {out}: exists and is not empty; prepare-data only creates a new folder")
    if dataset is None and source.resolve().name.lower() in get_args(DatasetName):
        dataset = source.resolve().name.lower()
    if dataset is not None:
        check_choice("dataset", dataset, DatasetName)
    graph = read_release_graph(source)
    summary = PrepareSummary(out, dataset, graph.user_num, graph.item_num, {}, {})
    plan: dict[str, Writer] = {}
    used = _graph_files(graph, plan, summary)
    if records == "graph_split":
        used += _graph_split_records(source, graph, plan, summary)
    else:
        used += _release_records(source, graph, plan, summary)
    used += _reference_outputs(source, plan, summary)
    names = {p.name for p in used} | set(plan)
    summary.skipped = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in source.iterdir()
        if p.name not in names and not p.name.startswith(".")
    )
    expected = RELEASE_SIZES.get(dataset or "")
    if expected and expected != (graph.user_num, graph.item_num):
        summary.notes.append(
            f"the release's {dataset} graph has {expected[0]:,} users and {expected[1]:,} items; is this its folder?"
        )
    _write_atomically(out, plan, summary)
    return summary
