"""RowLazyAdam: exact Adam on touched rows, untouched rows frozen; sparse gradients on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cdp_rec.config import JobConfig
from cdp_rec.models import MODELS, build_model
from cdp_rec.training.optim import RowLazyAdam, build_optimizers, split_parameters, use_sparse_gradients
from tests.test_models import random_batch


def _steps(opt_cls, grads, sparse: bool) -> torch.Tensor:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 3))
    opt = opt_cls([w], lr=0.1)
    for g in grads:
        w.grad = g.to_sparse(1) if sparse else g.clone()
        opt.step()
        opt.zero_grad()
    return w.detach()


def test_equals_torch_adam_when_every_row_is_touched() -> None:
    torch.manual_seed(1)
    grads = [torch.randn(6, 3) for _ in range(5)]
    ref = _steps(torch.optim.Adam, grads, sparse=False)
    torch.testing.assert_close(_steps(RowLazyAdam, grads, sparse=False), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_steps(RowLazyAdam, grads, sparse=True), ref, rtol=1e-6, atol=1e-7)


def test_untouched_rows_do_not_move_and_touched_rows_match_adam() -> None:
    torch.manual_seed(2)
    grads = [torch.randn(6, 3) for _ in range(4)]
    for g in grads[1:]:
        g[4:] = 0  # rows 4, 5 only get a gradient in the first step
    lazy = _steps(RowLazyAdam, grads, sparse=True)
    after_first = _steps(RowLazyAdam, grads[:1], sparse=True)
    torch.testing.assert_close(lazy[4:], after_first[4:], rtol=0, atol=0)
    # Rows touched every step follow torch Adam exactly.
    torch.testing.assert_close(lazy[:4], _steps(torch.optim.Adam, grads, sparse=False)[:4], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_steps_with_sparse_table_gradients(name: str) -> None:
    cfg = JobConfig()
    cfg.model.name = name
    torch.manual_seed(0)
    model = build_model(cfg)
    assert use_sparse_gradients(model)
    optimizer = build_optimizers(model, cfg.train)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = model.prepare_batch(random_batch(cfg))
    loss, _ = model(batch)
    loss.backward()
    sparse, _ = split_parameters(model)
    assert any(p.grad is not None and p.grad.is_sparse for p in sparse.values())
    optimizer.step()
    after = model.state_dict()
    # One lookup per sample: the user table, or (lr_counts has no id tables) a context table.
    table, feature = ("user", "user_id") if any(k.endswith(".user.weight") for k in after) else ("ctx_page", "page")
    key = next(k for k in after if k.endswith(f".{table}.weight"))
    touched = set(batch.sparse[feature].values().tolist())
    moved = (after[key] != before[key]).any(1).nonzero().squeeze(1).tolist()
    assert set(moved) <= touched and moved, f"only the batch's {table} rows may move"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_tables_a_batch_can_cover_keep_dense_gradients() -> None:
    cfg = JobConfig()
    model = build_model(cfg)
    f = cfg.features
    # Every item row can be hit by one batch of full histories: a sparse gradient would be
    # larger than the table. The user table (one lookup per sample) stays sparse.
    chosen = use_sparse_gradients(model, lambda name: (2 * f.num_items + 1) if name.startswith("hist_") else 1)
    assert "item" not in chosen and "user" in chosen
    bags = next(m for m in model.modules() if hasattr(m, "embedding_bags")).embedding_bags
    assert bags["user"].sparse and not bags["item"].sparse
