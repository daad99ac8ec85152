"""Tests for cdp_rec.metrics against sklearn and a per-group Python reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from cdp_rec.metrics import (
    CTRMetrics,
    MetricAccumulator,
    auc,
    compute_ctr_metrics,
    group_auc,
)


def _reference_group_auc(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> dict[str, tuple[float, int]]:
    """Plain per-group loop with sklearn; returns ``{weighting: (value, used)}``."""
    values: list[float] = []
    weights: list[int] = []
    for g in np.unique(groups):
        mask = groups == g
        y = labels[mask]
        if y.min() == y.max():
            continue
        values.append(roc_auc_score(y, scores[mask]))
        weights.append(int(mask.sum()))
    if not values:
        return {"uniform": (math.nan, 0), "impressions": (math.nan, 0)}
    w = np.asarray(weights, dtype=float)
    return {
        "uniform": (float(np.mean(values)), len(values)),
        "impressions": (float(np.dot(values, w) / w.sum()), len(values)),
    }


def _random_data(
    rng: np.random.Generator, n: int, n_groups: int, decimals: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = rng.random(n)
    if decimals is not None:
        scores = np.round(scores, decimals)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    groups = rng.integers(0, n_groups, n)
    return scores, labels, groups


# --------------------------------------------------------------------------- auc


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auc_matches_sklearn(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    scores, labels, _ = _random_data(rng, 2000, 1, decimals)
    # Correlate scores with labels so the AUC is not trivially ~0.5.
    scores = scores + 0.3 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_perfect_inverse_and_all_tied() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = labels.astype(float) + np.linspace(0, 0.1, 6)
    assert auc(scores, labels) == 1.0
    assert auc(-scores, labels) == 0.0
    assert auc(np.zeros(6), labels) == 0.5


def test_auc_accepts_bool_and_float_labels() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    expected = roc_auc_score(labels, scores)
    assert auc(scores, labels.astype(bool)) == pytest.approx(expected)
    assert auc(scores, labels.astype(np.float32)) == pytest.approx(expected)


def test_auc_errors() -> None:
    with pytest.raises(ValueError, match=r"non-finite.*2 NaN and 1 inf"):
        auc(np.array([0.1, np.nan, np.nan, np.inf]), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"0 or 1.*2 values outside"):
        auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 2, 0.5]))
    with pytest.raises(ValueError, match=r"only one class.*all 3 labels are 1"):
        auc(np.array([0.1, 0.2, 0.3]), np.array([1, 1, 1]))
    with pytest.raises(ValueError, match=r"lengths differ.*scores=3.*labels=2"):
        auc(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        auc(np.array([]), np.array([]))


# --------------------------------------------------------------------------- group_auc


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("seed", range(3))
def test_group_auc_matches_reference(decimals: int | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # ~4 rows per group: many singleton and one-class groups, interleaved, unsorted ids.
    scores, labels, groups = _random_data(rng, 1200, 300, decimals)
    reference = _reference_group_auc(scores, labels, groups)
    for weighting in ("impressions", "uniform"):
        value, used = group_auc(scores, labels, groups, weighting)
        ref_value, ref_used = reference[weighting]
        assert used == ref_used
        assert 0 < used < len(np.unique(groups))  # some groups really were skipped
        assert value == pytest.approx(ref_value, abs=1e-12)


@pytest.mark.parametrize(
    "id_dtype", [np.int8, np.int32, np.uint64, np.float64, np.str_]
)
def test_group_auc_group_id_dtypes(id_dtype: type) -> None:
    rng = np.random.default_rng(3)
    scores, labels, groups = _random_data(rng, 600, 100, 1)
    expected = group_auc(scores, labels, groups, "impressions")
    if id_dtype is np.int8:
        ids = (groups - 50).astype(np.int8)  # negative ids, range spans int8
    elif id_dtype is np.uint64:
        ids = groups.astype(np.uint64) + np.uint64(2**64 - 1000)  # above int64 range
    elif id_dtype is np.str_:
        ids = np.array([f"user-{g}" for g in groups])
    else:
        ids = groups.astype(id_dtype)
    assert group_auc(scores, labels, ids, "impressions") == pytest.approx(expected)


@pytest.mark.parametrize("weighting", ["impressions", "uniform"])
def test_group_auc_handcrafted(weighting: str) -> None:
    # Non-contiguous, huge and negative ids, interleaved rows.
    big = np.int64(2**62)
    groups = np.array([big, 7, -3, big, 7, 99, -3, big, 7, 5, 5])
    labels = np.array([1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.2, 0.5, 0.3, 0.2, 0.7, 0.1, 0.3, 0.8, 0.4, 0.4])
    # big: pos {0.9, 0.3}, neg {0.3} -> (1 + 0.5) / 2 = 0.75, 3 impressions
    # 7: pos {0.2}, neg {0.2, 0.8} -> (0.5 + 0) / 2 = 0.25, 3 impressions
    # -3: all positive, 99: singleton, 5: all negative -> skipped
    value, used = group_auc(scores, labels, groups, weighting)
    assert used == 2
    assert value == pytest.approx(0.5)
    ref = _reference_group_auc(scores, labels, groups)[weighting]
    assert (value, used) == pytest.approx(ref)


def test_group_auc_impression_weighting_differs_from_uniform() -> None:
    groups = np.array([1, 1, 2, 2, 2, 2])
    labels = np.array([0, 1, 0, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.9, 0.1, 0.8, 0.2])  # group 1: 1.0, group 2: 0.0
    assert group_auc(scores, labels, groups, "uniform") == (pytest.approx(0.5), 2)
    assert group_auc(scores, labels, groups, "impressions") == (pytest.approx(2 / 6), 2)


def test_group_auc_no_usable_group_returns_nan() -> None:
    value, used = group_auc(np.array([0.1, 0.2, 0.3]), np.array([1, 0, 1]),
                            np.array([1, 2, 3]), "uniform")
    assert math.isnan(value) and used == 0
    value, used = group_auc(np.array([]), np.array([]), np.array([]), "impressions")
    assert math.isnan(value) and used == 0


def test_group_auc_errors() -> None:
    s, y, g = np.array([0.1, 0.2]), np.array([0, 1]), np.array([1, 1])
    with pytest.raises(ValueError, match="weighting"):
        group_auc(s, y, g, "users")
    with pytest.raises(ValueError, match=r"lengths differ.*groups=3"):
        group_auc(s, y, np.array([1, 1, 1]), "uniform")
    with pytest.raises(ValueError, match="1 NaN"):
        group_auc(np.array([0.1, np.nan]), y, g, "uniform")
    with pytest.raises(ValueError, match="outside"):
        group_auc(s, np.array([0, -1]), g, "uniform")


def test_group_auc_vectorised_on_large_input() -> None:
    # Guards against an accidental per-group Python loop: 200k groups must be fast.
    rng = np.random.default_rng(0)
    scores, labels, groups = _random_data(rng, 1_000_000, 200_000, 2)
    groups = groups * 7919 + 10**12
    value, used = group_auc(scores, labels, groups, "impressions")
    assert 0.45 < value < 0.55 and used > 100_000


# --------------------------------------------------------------------------- CTR metrics


def _ctr_data(seed: int, n: int = 2000) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.25).astype(np.int64)
    scores = np.clip(0.2 + 0.3 * labels + 0.25 * rng.standard_normal(n), 0.0, 1.0)
    users = rng.integers(0, 150, n) * 13
    requests = rng.integers(0, 500, n) + 10**9
    return scores, labels, users, requests


def test_compute_ctr_metrics_matches_references() -> None:
    scores, labels, users, requests = _ctr_data(0)
    m = compute_ctr_metrics(scores, labels, users, requests)
    assert m.auc == pytest.approx(roc_auc_score(labels, scores))
    ref_users = _reference_group_auc(scores, labels, users)
    ref_requests = _reference_group_auc(scores, labels, requests)
    assert (m.uauc, m.num_users_used) == pytest.approx(ref_users["uniform"])
    assert m.uauc_weighted == pytest.approx(ref_users["impressions"][0])
    assert (m.gauc, m.num_requests_used) == pytest.approx(ref_requests["impressions"])
    assert m.gauc_uniform == pytest.approx(ref_requests["uniform"][0])
    clipped = np.clip(scores, 1e-7, 1 - 1e-7)
    assert m.logloss == pytest.approx(log_loss(labels, clipped), rel=1e-9)
    assert m.ctr == pytest.approx(labels.mean())
    assert m.mean_prediction == pytest.approx(scores.mean())
    assert m.num_samples == len(scores)
    # The samples the averaged groups hold: those of the groups with both labels.
    for key, col in (("num_samples_users_used", users), ("num_samples_requests_used", requests)):
        both = {g for g in np.unique(col) if 0 < labels[col == g].sum() < (col == g).sum()}
        assert getattr(m, key) == sum(int((col == g).sum()) for g in both), key
    d = m.to_dict()
    assert set(d) == {f.name for f in CTRMetrics.__dataclass_fields__.values()}
    assert d["gauc"] == m.gauc


def test_compute_ctr_metrics_edge_cases() -> None:
    m = compute_ctr_metrics(np.array([0.0, 1.0]), np.array([1, 1]),
                            np.array([1, 2]), np.array([1, 2]))
    assert math.isnan(m.auc) and math.isnan(m.uauc) and math.isnan(m.gauc)
    assert m.num_users_used == 0 and m.num_requests_used == 0
    assert m.num_samples_users_used == 0 and m.num_samples_requests_used == 0
    assert np.isfinite(m.logloss)  # p=0 for a positive is clipped, not inf
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        compute_ctr_metrics(np.array([-2.0, 3.0]), np.array([0, 1]),
                            np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(ValueError, match="empty"):
        compute_ctr_metrics(np.array([]), np.array([]), np.array([]), np.array([]))


# --------------------------------------------------------------------------- accumulator


def test_accumulator_chunks_equal_single_compute() -> None:
    scores, labels, users, requests = _ctr_data(1)
    expected = compute_ctr_metrics(scores, labels, users, requests)
    acc = MetricAccumulator()
    bounds = [0, 1, 500, 1277, 1500, len(scores)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc.update(scores[lo:hi], labels[lo:hi], users[lo:hi], requests[lo:hi])
    assert len(acc) == len(scores)
    assert acc.compute() == expected
    assert acc.compute() == expected  # idempotent
    state = acc.state()
    assert state["scores"].dtype == np.float64 and state["labels"].dtype == np.int64
    np.testing.assert_array_equal(state["request_ids"], requests)
    acc.reset()
    assert len(acc) == 0 and acc.state()["scores"].shape == (0,)


def test_accumulator_accepts_torch_tensors() -> None:
    scores, labels, users, requests = _ctr_data(2, n=1000)
    expected = compute_ctr_metrics(scores, labels, users, requests)
    acc = MetricAccumulator()
    for lo in range(0, 1000, 256):
        sl = slice(lo, lo + 256)
        acc.update(
            torch.tensor(scores[sl], requires_grad=True).unsqueeze(1),  # [B, 1]
            torch.tensor(labels[sl], dtype=torch.float32),
            torch.tensor(users[sl]),
            torch.tensor(requests[sl], dtype=torch.int32),
        )
    got = acc.compute()
    assert got == expected


def test_accumulator_bf16_and_bad_labels() -> None:
    acc = MetricAccumulator()
    acc.update(torch.tensor([0.25, 0.75], dtype=torch.bfloat16), torch.tensor([0, 1]),
               torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert acc.compute().auc == 1.0
    with pytest.raises(ValueError, match="outside"):
        acc.update(np.array([0.5]), np.array([0.5]), np.array([1]), np.array([1]))
    with pytest.raises(ValueError, match="lengths differ"):
        acc.update(np.array([0.5, 0.1]), np.array([1]), np.array([1]), np.array([1]))
