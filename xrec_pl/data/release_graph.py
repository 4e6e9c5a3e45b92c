"""The interaction graph of a raw XRec release folder: read the files it has, rebuild the ones it lacks.

XRec's release (HKUDS/XRec, ``data/<name>``) builds its graph files in this order: ``total.csv`` holds every kept
``(user, item)`` edge; a seeded 80/10/10 split of it gives ``total_{trn,val,tst}.csv``; ``para_dict.pickle`` then
holds ``user_num``/``item_num`` (the numbers of distinct users and items in ``total.csv``) and, per split, each
user's items (``{split}_user_nb``) and each item's users (``{split}_item_nb``) in the split CSV's row order. Its
folders do not all ship every file (Amazon lacks ``total_trn.csv``, Yelp and Google lack ``para_dict.pickle``);
:func:`read_release_graph` rebuilds what is missing from the rest the same way and checks that the files it has
agree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xrec_pl.data.io import SPLITS, read_interaction_csv, read_interactions, read_para_dict
from xrec_pl.errors import DataError

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
PARA_NAMES = ("para_dict.json", "para_dict.pickle", "para_dict.pkl")  # the order xrec_pl.data.io reads them in
DERIVED_PARA = "para_dict.json"  # a rebuilt para_dict is written as JSON: no pickle to read, any pandas version


def is_lfs_pointer(path: Path) -> bool:
    """Whether ``path`` is a Git LFS pointer file (a clone without ``git lfs pull``) rather than the data."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        return False


def check_present(path: Path, hint: str = "") -> Path:
    """Return ``path`` if it is a file holding data; else raise a one-line :class:`DataError` (``hint`` appended)."""
    if path.is_file() and is_lfs_pointer(path):
        raise DataError(f"{path}: a Git LFS pointer, not the data (run `git lfs pull` in the clone){hint}")
    if not path.is_file():
        raise DataError(f"{path}: file not found{hint}")
    return path


@dataclass
class ReleaseGraph:
    """A checked interaction graph and where each of its files comes from.

    Attributes:
        user_num: Users of the graph (ids ``0 .. user_num - 1``).
        item_num: Items of the graph.
        pairs: ``split -> (N, 2)`` int64 ``[user, item]`` rows, in the order they are written.
        para_file: The source's para_dict file to copy, or ``None`` when it is rebuilt (:meth:`para_dict`).
        csv_files: ``split -> source CSV`` to copy; the splits missing here are written from ``pairs``.
        total_file: The source's ``total.csv`` when the sizes were counted from it.
        derived: Output file name -> what it was rebuilt from.
        notes: Facts about the input worth a line in the summary.
    """

    user_num: int
    item_num: int
    pairs: dict[str, np.ndarray]
    para_file: Path | None
    csv_files: dict[str, Path]
    total_file: Path | None = None
    derived: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def edge_keys(self, split: str) -> np.ndarray:
        """Sorted unique ``user * item_num + item`` keys of ``split``'s edges."""
        return _keys(self.pairs[split], self.item_num)

    def para_dict(self) -> dict:
        """The para_dict the release builds from the split CSVs: sizes and per-split neighbour lists in row order."""
        out: dict = {"user_num": self.user_num, "item_num": self.item_num}
        for split in SPLITS:
            users: list[list[int]] = [[] for _ in range(self.user_num)]
            items: list[list[int]] = [[] for _ in range(self.item_num)]
            for user, item in self.pairs[split].tolist():
                users[user].append(item)
                items[item].append(user)
            out[f"{split}_user_nb"], out[f"{split}_item_nb"] = users, items
        return out

    def csv_text(self, split: str) -> str:
        """``split``'s interactions as the CSV the loaders read (header ``user,item``)."""
        rows = "".join(f"{user},{item}\n" for user, item in self.pairs[split].tolist())
        return "user,item\n" + rows


def _keys(pairs: np.ndarray, item_num: int) -> np.ndarray:
    return np.unique(pairs[:, 0] * np.int64(item_num) + pairs[:, 1])


def _pairs_from_lists(lists: list[list[int]]) -> np.ndarray:
    """``(N, 2)`` rows ``[owner, member]`` of neighbour lists, sorted by owner then member."""
    rows = [(owner, member) for owner, members in enumerate(lists) for member in sorted(members)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _from_para_dict(source: Path, para_file: Path) -> ReleaseGraph:
    para = read_para_dict(source)
    n_users, n_items = para["user_num"], para["item_num"]
    graph = ReleaseGraph(n_users, n_items, {}, para_file, {})
    for split in SPLITS:
        csv = source / f"total_{split}.csv"
        user_key, item_key = f"{split}_user_nb", f"{split}_item_nb"
        from_users = _pairs_from_lists(para[user_key]) if user_key in para else None
        if from_users is not None and item_key in para:
            from_items = _pairs_from_lists(para[item_key])[:, ::-1]
            if not np.array_equal(_keys(from_users, n_items), _keys(from_items, n_items)):
                raise DataError(f"{para_file}: '{user_key}' and '{item_key}' hold different edges")
        if csv.is_file():
            check_present(csv)
            pairs = read_interactions(source, split, n_users, n_items)
            if from_users is not None:
                ours, theirs = _keys(pairs, n_items), _keys(from_users, n_items)
                if not np.array_equal(ours, theirs):
                    differ = np.setxor1d(ours, theirs).size
                    raise DataError(
                        f"{csv}: {differ} edge(s) differ from {para_file.name}'s '{user_key}' "
                        "(are the two files from the same release?)"
                    )
            graph.csv_files[split] = csv
        elif from_users is None:
            raise DataError(f"{csv}: file not found, and {para_file.name} has no '{user_key}' to rebuild it from")
        else:
            pairs = from_users
            graph.derived[csv.name] = f"{para_file.name} '{user_key}' (one row per edge, sorted by user, item)"
        if len(pairs) == 0:
            raise DataError(f"{para_file}: '{user_key}' holds no edges")
        graph.pairs[split] = pairs
    return graph


def _from_csvs(source: Path) -> ReleaseGraph:
    hint = "; without para_dict.pickle the graph is rebuilt from total_trn.csv, total_val.csv and total_tst.csv"
    paths = {split: check_present(source / f"total_{split}.csv", hint) for split in SPLITS}
    pairs = {split: read_interaction_csv(path, None, None) for split, path in paths.items()}
    union = np.concatenate(list(pairs.values()))
    total = source / "total.csv"
    graph = ReleaseGraph(0, 0, pairs, None, dict(paths))
    if total.is_file():
        check_present(total)
        everything = read_interaction_csv(total, None, None)
        graph.total_file, origin = total, "total.csv"
        width = np.int64(max(union[:, 1].max(), everything[:, 1].max()) + 1)
        differ = np.setxor1d(_keys(union, width), _keys(everything, width)).size
        if differ:
            graph.notes.append(f"total.csv and the three split CSVs differ in {differ} edge(s); the splits were used")
    else:
        everything, origin = union, "total_{trn,val,tst}.csv"
    # the release counts distinct ids; an id above that count (ids with gaps) still needs a row of the tables
    distinct = [np.unique(everything[:, j]).size for j in (0, 1)]
    graph.user_num, graph.item_num = (max(distinct[j], int(union[:, j].max()) + 1) for j in (0, 1))
    for j, (name, size) in enumerate((("user", graph.user_num), ("item", graph.item_num))):
        unused = size - np.unique(union[:, j]).size
        if unused:
            graph.notes.append(f"{unused} of the {size:,} {name} ids have no interaction in any split")
    graph.derived[DERIVED_PARA] = (
        f"the split CSVs as the release builds para_dict.pickle (user_num/item_num: distinct users/items of {origin}; "
        "neighbour lists in row order)"
    )
    return graph


def read_release_graph(source: str | Path) -> ReleaseGraph:
    """Read and check the graph files of an XRec folder, rebuilding a missing ``total_{split}.csv`` or para_dict.

    With a para_dict, a missing split CSV is rebuilt from its ``{split}_user_nb`` lists, and every CSV present must
    hold the same edges as its lists. Without one, the three split CSVs are required and the para_dict is rebuilt:
    sizes from ``total.csv`` when present (the release's own source), else from the three splits.

    Args:
        source: The release folder (``HKUDS/XRec`` ``data/<name>``, after ``git lfs pull``).

    Returns:
        The checked :class:`ReleaseGraph`.

    Raises:
        DataError: a missing, malformed or Git-LFS-pointer file, or files that disagree.
    """
    source = Path(source)
    para_file = next((source / name for name in PARA_NAMES if (source / name).is_file()), None)
    if para_file is not None:
        check_present(para_file)
    graph = _from_csvs(source) if para_file is None else _from_para_dict(source, para_file)
    per_user = np.bincount(graph.edge_keys("trn") // graph.item_num, minlength=graph.user_num)
    full = np.flatnonzero(per_user >= graph.item_num)
    if full.size:  # the check stage 1 makes before training, made here before anything is written
        origin = graph.csv_files.get("trn", para_file)
        raise DataError(
            f"{origin}: user {int(full[0])} has interacted with all {graph.item_num} items in the training split; "
            "BPR training needs a negative item for every user"
        )
    return graph
