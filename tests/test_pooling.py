"""Category-gated pooling: the compact-then-MEAN-pool path equals the plain reference."""

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from embeddings.pooling import category_filtered_mean_reference, filter_history_by_category, with_filtered_history


def _random_case(batch, max_len, num_items, num_cats, seed, lengths=None):
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    n = int(lengths.sum())
    items = torch.randint(0, num_items, (n,), generator=g)
    cats = torch.randint(0, num_cats, (n,), generator=g)
    target = torch.randint(0, num_cats, (batch,), generator=g)
    return items, cats, lengths, target


def _fused_mean(table, items, cats, lengths, target, window=None):
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="item", embedding_dim=table.shape[1], num_embeddings=table.shape[0],
                                   feature_names=["h"], pooling=PoolingType.MEAN)]
    )
    with torch.no_grad():
        ebc.embedding_bags["item"].weight.copy_(table)
    values, counts = filter_history_by_category(items, cats, lengths, target, window)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["h"], values=values, lengths=counts)
    return ebc(kjt).to_dict()["h"], counts, ebc


@pytest.mark.parametrize(
    "batch, max_len, num_cats, lengths",
    [
        (32, 50, 5, None),  # random, with some empty sequences
        (8, 2000, 100, None),  # the paper's length
        (4, 1, 2, torch.tensor([1, 1, 1, 1])),  # length 1
        (5, 10, 3, torch.zeros(5, dtype=torch.long)),  # all empty
        (6, 30, 1, None),  # one category: everything matches
    ],
)
def test_forward_and_backward_equal_reference(batch, max_len, num_cats, lengths):
    items, cats, lengths, target = _random_case(batch, max_len, 50, num_cats, seed=batch + max_len, lengths=lengths)
    table = torch.randn(50, 8)
    for window in (None, 7):
        ref_table = table.clone().requires_grad_(True)
        ref, ref_counts = category_filtered_mean_reference(ref_table, items, cats, lengths, target, window)
        got, counts, ebc = _fused_mean(table, items, cats, lengths, target, window)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(counts, ref_counts)
        assert torch.all(got[counts == 0] == 0) and torch.isfinite(got).all()
        upstream = torch.randn_like(ref)
        (ref * upstream).sum().backward()
        (got * upstream).sum().backward()
        torch.testing.assert_close(ebc.embedding_bags["item"].weight.grad, ref_table.grad, atol=1e-5, rtol=1e-5)


def test_no_match_and_duplicates():
    items = torch.tensor([3, 3, 3, 4, 1])
    cats = torch.tensor([0, 0, 0, 1, 2])
    lengths = torch.tensor([4, 1])
    target = torch.tensor([0, 7])  # sample 1 has no behaviour of category 7
    table = torch.randn(5, 4)
    got, counts, _ = _fused_mean(table, items, cats, lengths, target)
    assert counts.tolist() == [3, 0]
    torch.testing.assert_close(got[0], table[3])
    assert torch.all(got[1] == 0)


def test_recency_window_keeps_the_last_behaviours():
    items = torch.tensor([10, 11, 12, 13])
    cats = torch.zeros(4, dtype=torch.long)
    values, counts = filter_history_by_category(items, cats, torch.tensor([4]), torch.tensor([0]), recency_window=2)
    assert values.tolist() == [12, 13] and counts.tolist() == [2]


def test_with_filtered_history_builds_lookup_kjt():
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["category_id", "user_id", "hist_item_ids", "hist_category_ids"],
        values=torch.tensor([1, 2, 7, 8, 5, 6, 9, 1, 2, 1]),
        lengths=torch.tensor([1, 1, 1, 1, 2, 1, 2, 1]),
    )
    # sample 0: target cat 1, hist items [5, 6] with cats [1, 2]; sample 1: target 2, hist [9] cat [1]
    out, counts = with_filtered_history(
        kjt, ["category_id", "user_id"], "hist_item_ids", "hist_category_ids", "category_id", "match"
    )
    d = out.to_dict()
    assert out.keys() == ["category_id", "user_id", "match"]
    assert d["match"].values().tolist() == [5] and counts.tolist() == [1, 0]
    assert d["user_id"].values().tolist() == [7, 8]
