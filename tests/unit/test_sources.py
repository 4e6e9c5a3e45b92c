"""EmbeddingSource: the four kinds of collaborative vectors, without an LLM."""

from __future__ import annotations

import pytest
import torch

from xrec_pl.models.sources import EmbeddingSource


def test_graph_source_indexes_the_tables_and_keeps_them_out_of_the_state_dict():
    user, item = torch.randn(5, 4), torch.randn(3, 4)
    source = EmbeddingSource("graph", 4, user=user, item=item)
    u, i = source(torch.tensor([4, 0]), torch.tensor([2, 2]))
    assert torch.equal(u, user[[4, 0]]) and torch.equal(i, item[[2, 2]])
    assert (source.num_users, source.num_items) == (5, 3)
    assert source.state_dict() == {}
    with pytest.raises(ValueError, match="needs the stage-1"):
        EmbeddingSource("graph", 4)


def test_random_kinds_are_seeded_scaled_and_sized_late():
    ids = torch.arange(3)
    fixed_u, fixed_i = EmbeddingSource("fixed", 4, seed=1)(ids, ids)
    assert torch.equal(fixed_u[0], fixed_u[2]) and not torch.equal(fixed_u[0], fixed_i[0])
    late = EmbeddingSource("random", 4, seed=1)
    with pytest.raises(ValueError, match="num_users"):
        late(ids, ids)
    late.size(6, 7)
    assert torch.equal(late(ids, ids)[0], EmbeddingSource("random", 4, seed=1, num_users=6, num_items=7)(ids, ids)[0])
    assert not torch.equal(
        late(ids, ids)[0], EmbeddingSource("random", 4, seed=2, num_users=6, num_items=7)(ids, ids)[0]
    )
    big = 100 * torch.ones(2, 4)
    big[0] = -100
    scaled = EmbeddingSource("redrawn", 4, user=big, item=big)
    first, second = scaled(torch.zeros(500, dtype=torch.long), ids)[0], scaled(ids, ids)[0]
    assert first.std() > 50 and not torch.equal(first[:3], second)
    with pytest.raises(ValueError, match="unknown embedding_source"):
        EmbeddingSource("learned", 4)
