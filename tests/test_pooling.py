"""Category-gated pooling: every implementation equals the plain reference (gather + mask + mean).

The compact-then-MEAN-pool path through a TorchRec EBC, the dispatching
:func:`category_filtered_mean` (CPU path and the ``cdp_rec::category_filtered_pool``
custom op), forward and backward, with recency window and per-behaviour weights; the
Triton kernel under Triton's interpreter when Triton is installed, and on CUDA when
there is a GPU (skipped otherwise).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from embeddings import pooling_triton
from embeddings.pooling import (
    _bag_offsets,
    _match_positions,
    category_filtered_mean,
    category_filtered_mean_reference,
    filter_history_by_category,
    with_filtered_history,
)


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


# ---------------------------------------------------------------------------------------
# category_filtered_mean: the dispatching function and its backends.
# ---------------------------------------------------------------------------------------

CASES = {
    # name: (batch, max_len, num_items, num_cats, lengths, target offset)
    "random_with_empty": (32, 50, 40, 5, None, 0),
    "length_2000": (6, 2000, 500, 100, torch.tensor([2000, 1999, 0, 2000, 1, 2000]), 0),
    "length_1": (5, 1, 10, 2, torch.ones(5, dtype=torch.long), 0),
    "all_empty": (4, 10, 10, 3, torch.zeros(4, dtype=torch.long), 0),
    "all_match": (6, 30, 20, 1, None, 0),
    "no_match": (6, 30, 20, 4, None, 10),  # targets 10..13 never occur
    "duplicates": (8, 60, 3, 2, None, 0),  # 3 items: every bag repeats ids
}


def _case(name, seed=0):
    batch, max_len, num_items, num_cats, lengths, shift = CASES[name]
    items, cats, lengths, target = _random_case(batch, max_len, num_items, num_cats, seed, lengths=lengths)
    g = torch.Generator().manual_seed(seed + 1)
    table = torch.randn(num_items, 8, generator=g)
    weights = torch.rand(items.numel(), generator=g) + 0.1
    return table, items, cats, lengths, target + shift, weights


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ["auto", "op"])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("weighted", [False, True])
def test_category_filtered_mean_equals_reference(name, backend, window, weighted):
    table, items, cats, lengths, target, weights = _case(name)
    ref_table, got_table = table.clone().requires_grad_(True), table.clone().requires_grad_(True)
    ref_w = weights.clone().requires_grad_(True) if weighted else None
    got_w = weights.clone().requires_grad_(True) if weighted else None
    ref, ref_counts = category_filtered_mean_reference(ref_table, items, cats, lengths, target, window, weights=ref_w)
    got, counts = category_filtered_mean(
        got_table, items, cats, lengths, target, window, weights=got_w, backend=backend
    )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert counts.dtype == torch.int64 and torch.equal(counts, ref_counts)
    assert torch.all(got[counts == 0] == 0) and torch.isfinite(got).all()
    if name == "no_match" or name == "all_empty":
        assert counts.sum() == 0
    upstream = torch.randn_like(ref)
    (ref * upstream).sum().backward()
    (got * upstream).sum().backward()
    torch.testing.assert_close(got_table.grad, ref_table.grad, atol=1e-5, rtol=1e-5)
    # gradient reaches matching rows only
    pos, _ = _match_positions(cats, _bag_offsets(lengths, None, items.numel()), target, window)
    untouched = torch.ones(table.shape[0], dtype=torch.bool)
    untouched[items[pos]] = False
    assert torch.all(got_table.grad[untouched] == 0)
    if weighted:
        torch.testing.assert_close(got_w.grad, ref_w.grad, atol=1e-4, rtol=1e-4)


def test_matches_filter_at_every_chunk_size():
    """The chunked CPU filter agrees with a one-shot mask however bags fall on chunk borders."""
    lengths = torch.tensor([0, 5, 0, 0, 3, 17, 0, 1, 9, 0])
    items, cats, lengths, target = _random_case(10, 0, 30, 3, seed=3, lengths=lengths)
    offsets = _bag_offsets(lengths, None, items.numel())
    segment = torch.repeat_interleave(torch.arange(10), lengths)
    expected = torch.nonzero(cats == target[segment]).squeeze(1)
    for chunk in (1, 2, 3, 7, 16, 1000):
        pos, seg = _match_positions(cats, offsets, target, chunk=chunk)
        assert torch.equal(pos, expected) and torch.equal(seg, segment[expected])


def test_inputs_lengths_offsets_dtypes_and_modules():
    table, items, cats, lengths, target, weights = _case("random_with_empty")
    ref, ref_counts = category_filtered_mean_reference(table, items, cats, lengths, target)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    offsets[1:] = lengths.cumsum(0)
    variants = {
        "offsets": category_filtered_mean(table, items, cats, None, target, offsets=offsets),
        "int32": category_filtered_mean(table, items.int(), cats.int(), lengths.int(), target.int()),
        "embedding_bag": category_filtered_mean(nn.EmbeddingBag.from_pretrained(table), items, cats, lengths, target),
        "reference_backend": category_filtered_mean(table, items, cats, lengths, target, backend="reference"),
    }
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=n, embedding_dim=8, num_embeddings=table.shape[0], feature_names=[f], pooling=PoolingType.MEAN
            )
            for n, f in (("user", "u"), ("item", "i"))
        ]
    )
    with torch.no_grad():
        ebc.embedding_bags["item"].weight.copy_(table)
    variants["ebc"] = category_filtered_mean(ebc, items, cats, lengths, target)
    for name, (got, counts) in variants.items():
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)
        assert torch.equal(counts, ref_counts), name
    # the EBC's own parameter gets the gradient
    got, _ = category_filtered_mean(ebc, items, cats, lengths, target, table_name="item")
    got.sum().backward()
    assert ebc.embedding_bags["item"].weight.grad is not None
    with pytest.raises(ValueError, match="tables"):
        category_filtered_mean(ebc, items, cats, lengths, target, table_name="query")
    with pytest.raises(TypeError, match="with_filtered_history"):
        category_filtered_mean(nn.Linear(2, 2), items, cats, lengths, target)
    with pytest.raises(ValueError, match="cover"):
        category_filtered_mean(table, items, cats, lengths + 1, target)


def test_sparse_gradient_equals_dense():
    table, items, cats, lengths, target, weights = _case("duplicates")
    dense, sparse = table.clone().requires_grad_(True), table.clone().requires_grad_(True)
    for t, s in ((dense, False), (sparse, True)):
        out, _ = category_filtered_mean(t, items, cats, lengths, target, 5, weights=weights, sparse=s)
        (out * torch.arange(8.0)).sum().backward()
    assert sparse.grad.is_sparse
    torch.testing.assert_close(sparse.grad.to_dense(), dense.grad)


def test_zero_weight_sum_gives_zero_vector():
    table = torch.randn(4, 3)
    items, cats = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 1])
    lengths, target = torch.tensor([2, 1]), torch.tensor([0, 1])
    weights = torch.tensor([0.0, 0.0, 2.0])
    for backend in ("torch", "op", "reference"):
        got, counts = category_filtered_mean(table, items, cats, lengths, target, weights=weights, backend=backend)
        assert counts.tolist() == [2, 1]
        assert torch.all(got[0] == 0)
        torch.testing.assert_close(got[1], table[3])


def test_custom_op_opcheck():
    table, items, cats, lengths, target, weights = _case("random_with_empty")
    offsets = _bag_offsets(lengths, None, items.numel())
    args = (table.clone().requires_grad_(True), items, cats, offsets, target)
    torch.library.opcheck(pooling_triton.category_filtered_pool, (*args, weights.clone().requires_grad_(True), 4))
    torch.library.opcheck(pooling_triton.category_filtered_pool, (*args, None, None))


_TRITON_INTERPRETER_CHECK = """
import torch
from embeddings import pooling_triton as pt
from embeddings.pooling import category_filtered_mean_reference
g = torch.Generator().manual_seed(0)
for B, maxl, C, D in [(16, 300, 5, 8), (5, 2000, 50, 64), (5, 3, 2, 130), (4, 0, 3, 16)]:
    lengths = torch.randint(0, maxl + 1, (B,), generator=g); lengths[0] = 0
    N = int(lengths.sum())
    items = torch.randint(0, 100, (N,), generator=g); cats = torch.randint(0, C, (N,), generator=g)
    target = torch.randint(0, C + 1, (B,), generator=g); w = torch.rand(N, generator=g)
    table = torch.randn(100, D, generator=g)
    offsets = torch.zeros(B + 1, dtype=torch.long); offsets[1:] = lengths.cumsum(0)
    for window in (None, 5):
        for weights in (None, w):
            got, counts, _ = pt._triton_forward(table, items, cats, offsets, target, weights, window)
            ref, ref_counts = category_filtered_mean_reference(
                table, items, cats, lengths, target, window, weights=weights
            )
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert torch.equal(counts, ref_counts)
            # the table-gradient kernel (atomic scatter) against the PyTorch backward
            _, _, den = pt._triton_forward(table, items, cats, offsets, target, weights, window)
            grad = torch.randn(B, D, generator=g)
            gw = pt._triton_backward_table(grad, table, items, cats, offsets, target, weights, den, window)
            ref_gw, _ = pt._backward_torch(grad, torch.zeros(B), table, items, cats, offsets, target, weights, got,
                                           den, window, True, False)
            torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=1e-5)
print("ok")
"""


@pytest.mark.skipif(not pooling_triton.HAS_TRITON, reason="triton not installed")
def test_triton_kernel_under_interpreter():
    """The Triton kernel itself, on CPU, through Triton's interpreter."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", _TRITON_INTERPRETER_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# The CUDA parity tests live in tests/test_pooling_cuda.py (no TorchRec import, for GPU images).
