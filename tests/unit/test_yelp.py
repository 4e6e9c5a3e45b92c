"""Yelp (XRec's data/yelp in ../shared/data/yelp) as a first-class dataset: loading, the business wording, configs.

Fast: a few records only. Any XRec-format folder (Google's too) goes through the same code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data_modules.explanations import ExplanationDataModule
from data_modules.graph import InteractionDataModule
from xrec_pl.data.prompts import PromptBuilder

YELP = Path("/work/shared/data/yelp")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
pytestmark = pytest.mark.skipif(not (YELP / "trn.pkl").is_file(), reason="needs ../shared/data/yelp")


def test_yelp_graph_and_record_counts():
    dm = InteractionDataModule(YELP)
    assert (dm.num_users, dm.num_items) == (15962, 14085)
    assert dm.interactions("trn").shape[1] == 2 and dm.val_items.nnz > 0
    text = ExplanationDataModule(str(YELP))
    counts = [text.num_records(s) for s in ("trn", "val", "tst")]
    assert sum(counts) == 3000 and min(counts) > 250  # the release's 3,000 public records, split by the graph


@pytest.mark.parametrize("style", ["chat", "xrec"])
def test_yelp_prompts_use_the_business_wording(tiny_tokenizer, style):
    dm = ExplanationDataModule(str(YELP), style=style, domain="business", tokenizer=tiny_tokenizer, eval_subset=3)
    dm.setup("predict")
    batch = next(iter(dm.generation_dataloader("tst", indices=[0, 1, 2], batch_size=3)))
    text = tiny_tokenizer.decode(batch["input_ids"][0])
    assert "business record:" in text and "business name:" in text and "business profile:" in text
    assert "enjoy the business within 50 words" in text and "book" not in text.split("business name:")[0]
    assert batch["input_ids"].shape[0] == 3 and len(batch["reference"]) == 3


def test_yelp_reference_prompt_for_one_record(tiny_tokenizer):
    import pandas as pd

    from xrec_pl.data.reference_prompt import reference_text

    row = pd.read_pickle(YELP / "tst.pkl").iloc[0]
    text = reference_text("business", row["title"], row["user_summary"], row["item_summary"])
    assert text.startswith(
        "<s>[INST] <<SYS>>Explain why the user would enjoy the business within 50 words.<</SYS>>user record: "
        f"<USER_EMBED> business record: <ITEM_EMBED> business name: {row['title']} user profile: "
    )
    assert text.endswith(f"business profile: {row['item_summary']} <EXPLAIN_POS>[/INST]")
    encoded = PromptBuilder(tiny_tokenizer, "chat", "business").encode_prompt(row.to_dict())
    assert encoded["user_pos"] < encoded["item_pos"]


@pytest.mark.parametrize("kind", ["stage1", "stage2", "pipeline"])
@pytest.mark.parametrize("dataset", ["yelp", "google"])
def test_dataset_configs(kind, dataset):
    cfg = yaml.safe_load((CONFIGS / kind / f"{dataset}.yaml").read_text())
    data_dir = cfg["data_dir"] if kind == "pipeline" else cfg["data"]["init_args"]["data_dir"]
    assert data_dir == f"../shared/data/{dataset}"
    if kind == "stage2":
        assert cfg["data"]["init_args"]["domain"] == "business"
    if kind == "pipeline":
        assert cfg["stage2_config"] == f"configs/stage2/{dataset}.yaml"
