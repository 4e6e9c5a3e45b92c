"""The community metric: does a prediction name the graph-only phrase its reference names."""

import math

import pytest

from xrec_pl.metrics import build_metric
from xrec_pl.metrics.phrase import PhraseRecall
from xrec_pl.tools.evaluate import evaluate

REFS = [
    "Great plot. Like other members of the harbour book exchange, they will pass it on.",
    "Fun read. Readers from the Midnight Lantern Circle keep recommending it.",
    "A good book with no community sentence at all.",
    "Calm read. It is also a favourite at the riverside swap meet, where this user belongs.",
]


def test_scores_hits_misses_and_skips_references_without_a_phrase():
    preds = [
        "Like other members of the harbour  book exchange, they pass it on.",  # same phrase (spacing differs)
        "Readers from the riverside swap meet keep recommending it.",  # wrong community
        "Anything.",  # reference names none: skipped
        "No community named here.",  # missed
    ]
    metric = build_metric("community")
    metric.update(preds, REFS, ids=[0, 1, 2, 3])
    out = metric.compute()
    assert out["community"] == pytest.approx(1 / 3)
    assert out["community_named"] == pytest.approx(2 / 3)
    assert out["community_n"] == 3
    samples = metric.sample_scores()
    assert samples["community"][0] == 1 and samples["community"][1] == 0 and math.isnan(samples["community"][2])


def test_custom_phrases_and_evaluate_per_sample():
    result = evaluate(
        ["they love the red barn"],
        ["the red barn club"],
        ["community"],
        per_sample=True,
        community_phrases=["red barn"],
    )
    assert result["community"] == 1.0 and result["per_sample"]["community"] == [1.0]


@pytest.mark.parametrize("phrases", [[], "one string", [""]])
def test_rejects_bad_phrase_lists(phrases):
    with pytest.raises(ValueError):
        PhraseRecall(phrases=phrases)
