"""xrec_pl.data.synthetic: determinism, format, taste structure, graph-only explanation content."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from xrec_pl.data import io as dio
from xrec_pl.data.synthetic import COMMUNITIES, GRAPH_ONLY_WORDS, make_synthetic


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_bytes(synthetic_dir: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", seed=0, size="tiny")
    assert _files(again) == _files(synthetic_dir)
    other = make_synthetic(tmp_path / "other", seed=1, size="tiny")
    assert _files(other)["trn.pkl"] != _files(synthetic_dir)["trn.pkl"]


def test_tiny_format_and_sizes(synthetic_dir: Path) -> None:
    expected = {"para_dict.pickle", "meta.json", "README.md", "trn.pkl", "val.pkl", "tst.pkl"}
    expected |= {f"total_{s}.csv" for s in dio.SPLITS}
    assert {p.name for p in synthetic_dir.iterdir()} == expected
    para = dio.read_para_dict(synthetic_dir)
    assert (para["user_num"], para["item_num"]) == (60, 50)
    # para_dict is a plain pickle of builtins only: the restricted unpickler needs no globals at all
    assert type(pickle.loads((synthetic_dir / "para_dict.pickle").read_bytes())) is dict
    records = {s: dio.read_records(synthetic_dir, s, 60, 50) for s in dio.SPLITS}
    assert [len(records[s]) for s in dio.SPLITS] == [40, 10, 10]
    assert all(str(records[s]["title"].dtype) == "object" for s in dio.SPLITS)  # like the reference pickles


def test_records_are_edges_of_their_split(synthetic_dir: Path) -> None:
    para = dio.read_para_dict(synthetic_dir)
    all_edges = set()
    for split in dio.SPLITS:
        pairs = dio.read_interactions(synthetic_dir, split, para["user_num"], para["item_num"])
        edges = set(map(tuple, pairs.tolist()))
        assert len(edges) == len(pairs) and not edges & all_edges  # no duplicates, splits disjoint
        all_edges |= edges
        records = dio.read_records(synthetic_dir, split)
        assert set(zip(records["uid"].tolist(), records["iid"].tolist())) <= edges
        assert sorted(para[f"{split}_user_nb"][0]) == sorted(i for u, i in edges if u == 0)
    # every user has train, validation and test edges
    assert all(para[f"{s}_user_nb"][u] for s in dio.SPLITS for u in range(para["user_num"]))


def test_default_sizes_and_explanation_lengths(synthetic_default_dir: Path) -> None:
    para = dio.read_para_dict(synthetic_default_dir)
    assert (para["user_num"], para["item_num"]) == (600, 500)
    degrees = np.array([sum(len(para[f"{s}_user_nb"][u]) for s in dio.SPLITS) for u in range(600)])
    assert degrees.min() >= 15 and degrees.max() <= 25
    counts = []
    for split in dio.SPLITS:
        records = dio.read_records(synthetic_default_dir, split, 600, 500)
        counts.append(len(records))
        words = records["explanation"].str.split().str.len()
        assert words.min() >= 25 and words.max() <= 45
        assert records["explanation"].nunique() >= 0.9 * len(records)  # templates give variety
    assert counts == [400, 60, 60]


def test_graph_only_part_is_absent_from_text_inputs(synthetic_default_dir: Path) -> None:
    meta = json.loads((synthetic_default_dir / "meta.json").read_text())
    user_community = meta["user_community"]
    for split in dio.SPLITS:
        records = dio.read_records(synthetic_default_dir, split)
        visible = " ".join(records[["title", "user_summary", "item_summary"]].to_numpy().ravel()).lower()
        assert not any(word in visible.split() or name in visible for word in GRAPH_ONLY_WORDS for name in COMMUNITIES)
        for uid, explanation in zip(records["uid"], records["explanation"]):
            named = [c for c in COMMUNITIES if c in explanation]
            assert named == [COMMUNITIES[user_community[uid]]]


def _recall_at(scores: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = 20) -> float:
    scores = np.where(train > 0, -np.inf, scores)
    top = np.argsort(-scores, axis=1)[:, :k]
    hits = np.take_along_axis(test, top, axis=1).sum(1)
    return float((hits / np.maximum(test.sum(1), 1)).mean())


def test_interactions_follow_tastes_and_communities(synthetic_default_dir: Path) -> None:
    para = dio.read_para_dict(synthetic_default_dir)
    n_u, n_i = para["user_num"], para["item_num"]
    mats = {}
    for split in ("trn", "tst"):
        pairs = dio.read_interactions(synthetic_default_dir, split, n_u, n_i)
        mats[split] = np.zeros((n_u, n_i))
        mats[split][pairs[:, 0], pairs[:, 1]] = 1.0
    train, test = mats["trn"], mats["tst"]
    popularity = np.broadcast_to(train.sum(0), train.shape)
    cooccurrence = train @ (train.T @ train)  # item-item co-occurrence, summed over each user's train items
    pop, cf = _recall_at(popularity, train, test), _recall_at(cooccurrence, train, test)
    assert cf > 1.5 * pop, (cf, pop)

    meta = json.loads((synthetic_default_dir / "meta.json").read_text())
    user_comm, item_comm = np.array(meta["user_community"]), np.array(meta["item_community"])
    per_comm = train @ np.eye(meta["config"]["num_communities"])[item_comm]  # (U, C) train items per community
    assert (per_comm.argmax(1) == user_comm).mean() > 0.7  # the hidden community shows in the graph


def test_refuses_to_overwrite_real_data(tmp_path: Path) -> None:
    (tmp_path / "para_dict.pickle").write_bytes(pickle.dumps({}))
    with pytest.raises(dio.DataError, match=rf"^{tmp_path}: holds XRec data not made by make_synthetic"):
        make_synthetic(tmp_path, size="tiny")
    with pytest.raises(ValueError, match="size must be one of"):
        make_synthetic(tmp_path / "x", size="huge")


def test_overrides(tmp_path: Path) -> None:
    out = make_synthetic(tmp_path, seed=3, size="tiny", num_users=30, records=(5, 2, 2))
    assert dio.read_para_dict(out)["user_num"] == 30
    assert [len(dio.read_records(out, s)) for s in dio.SPLITS] == [5, 2, 2]
