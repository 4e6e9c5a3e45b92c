"""``xrec-pl prepare-data``: a raw XRec release folder -> the folder every other command reads."""

from __future__ import annotations

import sys
from typing import Any

from xrec_pl.data.prepare import DatasetName, RecordSource, prepare_folder


def prepare_data(
    source: str,
    out: str,
    dataset: DatasetName | None = None,
    records: RecordSource = "release",
) -> dict[str, Any]:
    """Prepare a folder of XRec's release (HKUDS/XRec data/amazon, data/yelp, data/google) for xrec-pl.

    Every file is checked with the loaders the commands use (pickles through the restricted unpickler); the files a
    release folder lacks are rebuilt the way the release builds them: total_trn.csv from para_dict.pickle's
    trn_user_nb (Amazon); para_dict (written as para_dict.json) from total.csv and the split CSVs (Yelp, Google).
    The folder is written beside OUT and renamed into place at the end; OUT must not exist or be empty.

    Args:
        source: The release's data/<name> folder (after `git lfs pull`), or any XRec-format folder.
        out: The prepared folder to create.
        dataset: amazon, yelp or google (default: the source folder's name when it is one of them).
        records: release (copy the release's trn/val/tst.pkl) or graph_split (split tst.pkl's public records into
            trn/val/tst by the graph split of each record's (uid, iid) edge, as ../shared/data was made).
    """
    summary = prepare_folder(source, out, dataset=dataset, records=records)
    sys.stdout.write("\n".join(summary.lines()) + "\n")
    return summary.as_dict()
