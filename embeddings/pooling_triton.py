"""GPU category-filtered pooling: one Triton pass, as a ``torch.library`` custom op.

``cdp_rec::category_filtered_pool(weight, ids, cats, offsets, target, per_sample_weights,
recency_window) -> (pooled [B, D], counts [B] int64, denominators [B] float32)``

* CUDA + Triton: :func:`_category_filtered_pool_fwd` -- one program per (sample,
  block of D). It walks the sample's behaviours in blocks of ``BLOCK_L``, loads their
  categories, compares them with the target category and issues the row loads *masked
  by the match*, so only matching rows are read from the table; the sum, the count
  and the weight sum stay in registers. Nothing of size ``[B, L]`` or ``[M, D]`` is
  written. The row loads are gathers of whole ``D`` rows (coalesced along ``D``).
* everywhere else (CPU, or CUDA without Triton): the PyTorch compact-then-pool path of
  :mod:`embeddings.pooling`, so the op, its fake and its autograd are testable on CPU.

Backward: ``cdp_rec::category_filtered_pool_backward``, a second custom op (so the pair
traces under ``torch.compile``). Its PyTorch implementation (any device) recomputes the
matches' positions (compaction, O(N) compare + O(M) rest), then ``index_add_``s
``w_j / sum(w) * grad[b]`` into a dense ``[V, D]`` gradient -- only matching rows are
non-zero. On CUDA the table gradient is one Triton pass instead
(:func:`_category_filtered_pool_bwd_table`: the forward's masked walk, scattering with
atomic adds), because the compaction made fwd+bwd slower than the unfused PyTorch path
(measured on an H200, docs/performance.md). Per-behaviour weights that require grad get ``<grad[b], e_j - pooled[b]> /
sum(w)`` at the matches (plus the gradient of the returned denominator).

Tested without a GPU: the op, its fake, autograd and ``opcheck`` run on CPU (where the
op's implementation is the compact-then-pool path), and the Triton kernel itself is
checked against the reference under Triton's interpreter (``TRITON_INTERPRET=1``) when
Triton is installed; the CUDA parity tests skip without CUDA.

This module imports without Triton and without CUDA; :data:`HAS_TRITON` says whether
the kernel exists. Use :func:`embeddings.pooling.category_filtered_mean`, which
dispatches here for CUDA tables.
"""

from __future__ import annotations

from typing import Optional

import torch

try:  # Triton is an optional, GPU-only dependency.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _bag_range(OFFSETS, TARGET, b, window, HAS_WINDOW: tl.constexpr):
        """Sample ``b``'s behaviours ``[start, end)`` (the last ``window`` with HAS_WINDOW) and its target."""
        start = tl.load(OFFSETS + b)
        end = tl.load(OFFSETS + b + 1)
        if HAS_WINDOW:
            start = tl.maximum(start, end - window)
        return start, end, tl.load(TARGET + b)

    @triton.jit
    def _block_matches(IDS, CATS, PSW, lo, end, tgt, HAS_WEIGHTS: tl.constexpr, BLOCK_L: tl.constexpr):
        """One block of ``BLOCK_L`` behaviours from ``lo``: (match mask, item ids, weights).

        Ids and weights are loaded *masked by the match*, so only matching rows cost reads;
        without per-behaviour weights the weight is the match itself (0 or 1).
        """
        offs_l = lo + tl.arange(0, BLOCK_L)
        in_bag = offs_l < end
        cat = tl.load(CATS + offs_l, mask=in_bag, other=0)
        match = in_bag & (cat == tgt)
        ids = tl.load(IDS + offs_l, mask=match, other=0).to(tl.int64)
        if HAS_WEIGHTS:
            w = tl.load(PSW + offs_l, mask=match, other=0.0).to(tl.float32)
        else:
            w = match.to(tl.float32)
        return match, ids, w

    @triton.jit
    def _category_filtered_pool_fwd(
        W,  # [V, D] table
        IDS,  # [N] item ids
        CATS,  # [N] categories
        PSW,  # [N] per-behaviour weights (unused unless HAS_WEIGHTS)
        OFFSETS,  # [B + 1] int64
        TARGET,  # [B] target category, same dtype as CATS
        OUT,  # [B, D]
        COUNTS,  # [B] int64
        DEN,  # [B] float32
        D,
        stride_w,
        stride_out,
        window,
        HAS_WEIGHTS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        start, end, tgt = _bag_range(OFFSETS, TARGET, b, window, HAS_WINDOW)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_L], dtype=tl.int32)
        wsum = tl.zeros([BLOCK_L], dtype=tl.float32)
        for lo in range(start, end, BLOCK_L):
            match, ids, w = _block_matches(IDS, CATS, PSW, lo, end, tgt, HAS_WEIGHTS, BLOCK_L)
            rows = tl.load(
                W + ids[:, None] * stride_w + offs_d[None, :],
                mask=match[:, None] & mask_d[None, :],
                other=0.0,
            )
            acc += tl.sum(rows.to(tl.float32) * w[:, None], axis=0)
            cnt += match.to(tl.int32)
            wsum += w
        count = tl.sum(cnt, axis=0)
        den = tl.sum(wsum, axis=0)
        nz = den != 0.0
        scale = tl.where(nz, 1.0 / tl.where(nz, den, 1.0), 0.0)
        tl.store(OUT + b * stride_out + offs_d, (acc * scale).to(OUT.dtype.element_ty), mask=mask_d)
        if pid_d == 0:
            tl.store(COUNTS + b, count.to(tl.int64))
            tl.store(DEN + b, den)

    @triton.jit
    def _category_filtered_pool_bwd_table(
        GRAD,  # [B, D] upstream gradient of the pooled output
        IDS,  # [N]
        CATS,  # [N]
        PSW,  # [N] (unused unless HAS_WEIGHTS)
        OFFSETS,  # [B + 1] int64
        TARGET,  # [B]
        DEN,  # [B] float32 denominators saved by the forward
        GW,  # [V, D] float32 table gradient, zero-initialised
        D,
        stride_g,
        stride_gw,
        window,
        HAS_WEIGHTS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # The forward's walk again, scattering instead of gathering: row ids_j of the table
        # gets w_j / den_b * grad[b] for every match j of sample b. Matches are found by the
        # same masked compare, so no compaction ([M] positions) is materialised; duplicate
        # rows across samples meet in atomic adds (fp32 order is not fixed, as in index_add_).
        b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        den = tl.load(DEN + b)
        if den != 0.0:
            start, end, tgt = _bag_range(OFFSETS, TARGET, b, window, HAS_WINDOW)
            offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            g = tl.load(GRAD + b * stride_g + offs_d, mask=mask_d, other=0.0).to(tl.float32) / den
            for lo in range(start, end, BLOCK_L):
                match, ids, w = _block_matches(IDS, CATS, PSW, lo, end, tgt, HAS_WEIGHTS, BLOCK_L)
                tl.atomic_add(
                    GW + ids[:, None] * stride_gw + offs_d[None, :],
                    w[:, None] * g[None, :],
                    mask=match[:, None] & mask_d[None, :],
                )

else:
    _category_filtered_pool_fwd = None
    _category_filtered_pool_bwd_table = None


def _triton_forward(
    weight: torch.Tensor,
    ids: torch.Tensor,
    cats: torch.Tensor,
    offsets: torch.Tensor,
    target: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    recency_window: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    assert HAS_TRITON and _category_filtered_pool_fwd is not None
    batch = target.numel()
    dim = weight.shape[1]
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    ids, cats, offsets = ids.contiguous(), cats.contiguous(), offsets.to(torch.int64).contiguous()
    target = target.to(cats.dtype).contiguous()
    out = torch.empty(batch, dim, dtype=weight.dtype, device=weight.device)
    counts = torch.empty(batch, dtype=torch.int64, device=weight.device)
    den = torch.empty(batch, dtype=torch.float32, device=weight.device)
    if batch == 0 or dim == 0:
        return out, counts.zero_(), den.zero_()
    block_d = min(triton.next_power_of_2(dim), 128)
    block_l = 64 if block_d <= 64 else 32
    psw = per_sample_weights.contiguous() if per_sample_weights is not None else weight
    grid = (batch, triton.cdiv(dim, block_d))
    _category_filtered_pool_fwd[grid](
        weight, ids, cats, psw, offsets, target, out, counts, den,
        dim, weight.stride(0), out.stride(0), 0 if recency_window is None else recency_window,
        HAS_WEIGHTS=per_sample_weights is not None,
        HAS_WINDOW=recency_window is not None,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out, counts, den


def _triton_backward_table(
    grad_pooled: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    cats: torch.Tensor,
    offsets: torch.Tensor,
    target: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    den: torch.Tensor,
    recency_window: Optional[int],
) -> torch.Tensor:
    """Dense ``[V, D]`` table gradient by :func:`_category_filtered_pool_bwd_table` (same dtype as ``weight``)."""
    assert HAS_TRITON and _category_filtered_pool_bwd_table is not None
    batch, dim = target.numel(), weight.shape[1]
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    if batch and dim:
        grad = grad_pooled.contiguous()
        ids, cats, offsets = ids.contiguous(), cats.contiguous(), offsets.to(torch.int64).contiguous()
        target = target.to(cats.dtype).contiguous()
        block_d = min(triton.next_power_of_2(dim), 128)
        block_l = 64 if block_d <= 64 else 32
        psw = per_sample_weights.contiguous() if per_sample_weights is not None else grad
        _category_filtered_pool_bwd_table[(batch, triton.cdiv(dim, block_d))](
            grad, ids, cats, psw, offsets, target, den.to(torch.float32).contiguous(), grad_weight,
            dim, grad.stride(0), grad_weight.stride(0), 0 if recency_window is None else recency_window,
            HAS_WEIGHTS=per_sample_weights is not None,
            HAS_WINDOW=recency_window is not None,
            BLOCK_L=block_l,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return grad_weight if weight.dtype == torch.float32 else grad_weight.to(weight.dtype)


@torch.library.custom_op("cdp_rec::category_filtered_pool", mutates_args=())
def category_filtered_pool(
    weight: torch.Tensor,
    ids: torch.Tensor,
    cats: torch.Tensor,
    offsets: torch.Tensor,
    target: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    recency_window: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Category-filtered (weighted) mean pooling; see the module docstring.

    Args:
        weight: ``[V, D]`` table.
        ids, cats: ``[N]`` jagged behaviour item ids and categories.
        offsets: ``[B + 1]`` int64 jagged offsets.
        target: ``[B]`` target category (same dtype as ``cats``).
        per_sample_weights: optional ``[N]`` weights; the mean is ``sum(w e) / sum(w)``.
        recency_window: only the last ``recency_window`` behaviours of each bag count.

    Returns:
        ``(pooled [B, D], counts [B] int64, denominators [B] float32)``.
    """
    from embeddings.pooling import _pool_compacted

    pooled, counts, den = _pool_compacted(weight, ids, cats, offsets, target, recency_window, per_sample_weights)
    return pooled.contiguous(), counts, den.to(torch.float32)


if HAS_TRITON:

    @category_filtered_pool.register_kernel("cuda")
    def _(weight, ids, cats, offsets, target, per_sample_weights=None, recency_window=None):
        return _triton_forward(weight, ids, cats, offsets, target, per_sample_weights, recency_window)


@category_filtered_pool.register_fake
def _(weight, ids, cats, offsets, target, per_sample_weights=None, recency_window=None):
    batch = target.shape[0]
    return (
        weight.new_empty(batch, weight.shape[1]),
        weight.new_empty(batch, dtype=torch.int64),
        weight.new_empty(batch, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    weight, ids, cats, offsets, target, psw, window = inputs
    pooled, _, den = output
    ctx.window = window
    ctx.save_for_backward(weight, ids, cats, offsets, target, psw, pooled, den)


def _backward(ctx, grad_pooled, grad_counts, grad_den):
    weight, ids, cats, offsets, target, psw, pooled, den = ctx.saved_tensors
    need_weight = bool(ctx.needs_input_grad[0])
    need_psw = psw is not None and bool(ctx.needs_input_grad[5])
    if grad_pooled is None:
        grad_pooled = torch.zeros_like(pooled)
    if grad_den is None:
        grad_den = torch.zeros_like(den)
    grad_weight, grad_psw = category_filtered_pool_backward(
        grad_pooled, grad_den, weight, ids, cats, offsets, target, psw, pooled, den, ctx.window, need_weight, need_psw
    )
    return (grad_weight if need_weight else None), None, None, None, None, (grad_psw if need_psw else None), None


@torch.library.custom_op("cdp_rec::category_filtered_pool_backward", mutates_args=())
def category_filtered_pool_backward(
    grad_pooled: torch.Tensor,
    grad_den: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    cats: torch.Tensor,
    offsets: torch.Tensor,
    target: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    pooled: torch.Tensor,
    den: torch.Tensor,
    recency_window: Optional[int],
    need_weight_grad: bool,
    need_weights_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`category_filtered_pool` (an op of its own so it traces under torch.compile).

    Returns:
        ``(grad_weight [V, D] dense, non-zero on matching rows only; grad_per_sample_weights [N])``;
        each is an empty tensor when its flag is false.
    """
    return _backward_torch(grad_pooled, grad_den, weight, ids, cats, offsets, target, per_sample_weights, pooled, den,
                           recency_window, need_weight_grad, need_weights_grad)


def _backward_torch(grad_pooled, grad_den, weight, ids, cats, offsets, target, per_sample_weights, pooled, den,
                    recency_window, need_weight_grad, need_weights_grad):
    """The backward in PyTorch ops (any device): compaction of the matches, then ``index_add_``."""
    from embeddings.pooling import _match_positions

    psw = per_sample_weights
    pos, seg = _match_positions(cats, offsets, target, recency_window)
    den_m = den.index_select(0, seg)
    nz = den_m != 0
    scale = torch.where(nz, 1.0 / torch.where(nz, den_m, torch.ones_like(den_m)), torch.zeros_like(den_m))
    rows = ids.index_select(0, pos).to(torch.int64)
    g_rows = grad_pooled.index_select(0, seg)
    grad_weight = weight.new_empty(0)
    grad_psw = weight.new_empty(0) if psw is None else psw.new_empty(0)
    if need_weight_grad:
        w = psw.index_select(0, pos).to(torch.float32) if psw is not None else torch.ones_like(scale)
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        grad_weight.index_add_(0, rows, g_rows * (w * scale).to(g_rows.dtype)[:, None])
    if need_weights_grad and psw is not None:
        diff = weight.index_select(0, rows).to(torch.float32) - pooled.index_select(0, seg).to(torch.float32)
        g = (diff * g_rows.to(torch.float32)).sum(1) * scale + grad_den.to(torch.float32).index_select(0, seg)
        grad_psw = torch.zeros_like(psw).index_put_((pos,), g.to(psw.dtype))
    return grad_weight, grad_psw


if HAS_TRITON:

    @category_filtered_pool_backward.register_kernel("cuda")
    def _(grad_pooled, grad_den, weight, ids, cats, offsets, target, per_sample_weights, pooled, den, recency_window,
          need_weight_grad, need_weights_grad):
        # Table gradient in one Triton pass; the per-behaviour weight gradient (rarely needed:
        # only when the weights themselves are learned) stays on the PyTorch path.
        grad_weight = weight.new_empty(0)
        if need_weight_grad:
            grad_weight = _triton_backward_table(
                grad_pooled, weight, ids, cats, offsets, target, per_sample_weights, den, recency_window
            )
        grad_psw = weight.new_empty(0) if per_sample_weights is None else per_sample_weights.new_empty(0)
        if need_weights_grad and per_sample_weights is not None:
            _, grad_psw = _backward_torch(
                grad_pooled, grad_den, weight, ids, cats, offsets, target, per_sample_weights, pooled, den,
                recency_window, False, True,
            )
        return grad_weight, grad_psw


@category_filtered_pool_backward.register_fake
def _(grad_pooled, grad_den, weight, ids, cats, offsets, target, per_sample_weights, pooled, den, recency_window,
      need_weight_grad, need_weights_grad):
    if need_weight_grad:
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    else:
        grad_weight = weight.new_empty(0)
    if per_sample_weights is None:
        return grad_weight, weight.new_empty(0)
    return grad_weight, (torch.empty_like(per_sample_weights) if need_weights_grad else per_sample_weights.new_empty(0))


category_filtered_pool.register_autograd(_backward, setup_context=_setup_context)
