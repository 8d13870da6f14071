"""The gather/scatter path of the mined pair-level Circle loss (``path="gather"``):
each mined pair's similarity by a row-wise dot product over chunks of pairs
(:func:`pair_similarity`, its own autograd Function), then a per-anchor scatter
logsumexp (:func:`scatter_logsumexp`).

Memory O(P) per-pair scalars and indices (the miner already hands over P indices) plus
O(chunk * D), never O(P * D); time O(P * D) in gathers and scatters. PyTorch only.
:func:`~pml_extras.ops.pair_circle.mined_pairs_circle_loss` picks between this and the
dense mask path (``DENSE_PAIR_FRACTION``).

Example:
    >>> x = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    >>> a1, p = torch.tensor([0, 1]), torch.tensor([1, 0])
    >>> a2, n = torch.tensor([0, 1]), torch.tensor([2, 3])
    >>> gather_pairs_circle_loss(x, x, a1, p, a2, n, m=0.25, gamma=64.0).shape
    torch.Size([6])
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fixed_order import add_rows_, scatter_add_rows
from .pair_circle_autograd import _BLOCK_ELEMS, _exp_above, exp_floor, pair_logits
from .precision import accumulate_dtype


def _pair_keys(rows: Tensor, cols: Tensor, num_cols: int) -> Tensor:
    """Sorted unique keys ``row * num_cols + col`` of the pairs."""
    key = rows.long() * max(num_cols, 1)
    return torch.unique(key.add_(cols))


def _split_keys(key: Tensor, num_cols: int) -> Tuple[Tensor, Tensor]:
    """Inverse of ``_pair_keys``; consumes ``key`` (its storage becomes the rows)."""
    cols = torch.remainder(key, max(num_cols, 1))
    # exact division once the remainder is gone; in place, so one P-sized temporary less
    rows = key.sub_(cols).div_(max(num_cols, 1), rounding_mode="floor")
    return rows, cols


def unique_pairs(rows: Tensor, cols: Tensor, num_cols: int) -> Tuple[Tensor, Tensor]:
    """Deduplicate (row, col) index pairs, sorted by row then col; set semantics like the
    boolean masks PML builds from the indices."""
    return _split_keys(_pair_keys(rows, cols, num_cols), num_cols)


def _sorted_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two sorted, duplicate-free key tensors share an element (one device sync).

    Binary search of the shorter in the longer: O(min(Pa, Pb)) memory, where ``isin`` would
    concatenate and sort both.
    """
    if a.numel() == 0 or b.numel() == 0:
        return False
    small, large = (a, b) if a.numel() <= b.numel() else (b, a)
    pos = torch.searchsorted(large, small).clamp_(max=large.numel() - 1)
    return bool((large[pos] == small).any())


def _check_index_range(indices: Sequence[Tensor], size: int, what: str) -> None:
    """Raise ValueError unless every index lies in [0, size); one device sync, O(1) memory."""
    bounds = [torch.stack(torch.aminmax(t)) for t in indices if t.numel()]
    if not bounds:
        return
    bounds = torch.stack(bounds)
    lo, hi = torch.stack([bounds[:, 0].min(), bounds[:, 1].max()]).tolist()
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} index {bad} is out of range [0, {size})")


def scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tuple[Tensor, Tensor]:
    """Per-bin logsumexp of ``values`` grouped by ``index``; returns ``(lse, has_any)``.

    Empty bins get lse = 0.  The per-bin max is detached: logsumexp is shift invariant, so
    its gradient is exactly softmax(values) within each bin either way.
    """
    has = torch.zeros(size, dtype=torch.bool, device=values.device).index_fill_(0, index, True)
    with torch.no_grad():
        vmax = values.new_full((size,), float("-inf"))
        vmax = vmax.scatter_reduce(0, index, values, reduce="amax", include_self=True)
        shift = torch.where(has, vmax, 0.0)
    terms = _exp_above(values - shift[index], exp_floor(values.dtype))
    # A fixed order on CUDA for the bins' many terms (index_add's atomics would not).
    sums = scatter_add_rows(size, index, terms)
    lse = torch.where(has, shift + torch.log(torch.where(has, sums, 1.0)), 0.0)
    return lse, has


def resolve_pair_chunk(chunk_size: Optional[int], num_pairs: int, dim: int) -> int:
    """Pairs per chunk of ``pair_similarity``; None keeps one chunk x D gather near 2M elements."""
    if chunk_size is None:
        return max(1, min(num_pairs, _BLOCK_ELEMS // max(dim, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


class _PairSimilarity(torch.autograd.Function):
    """s_k = <x[rows[k]], y[cols[k]]> over chunks of pairs.

    Only x, y and the indices are saved; backward regathers each chunk and scatters
    g_k * y[cols[k]] into grad_x[rows[k]] (and symmetrically), so neither pass holds more than
    a chunk of gathered rows.  ``same`` says y is x: one gradient buffer then takes both sides.
    """

    @staticmethod
    def forward(ctx, x, y, rows, cols, chunk, same):
        acc = accumulate_dtype(x, y)
        num_pairs = rows.shape[0]
        out = torch.empty(num_pairs, dtype=acc, device=x.device)
        for c0 in range(0, num_pairs, chunk):
            xr = x.index_select(0, rows[c0 : c0 + chunk]).to(acc)
            yc = y.index_select(0, cols[c0 : c0 + chunk]).to(acc)
            # xr is a fresh gather (or a fresh upcast), so multiplying in place is safe
            out[c0 : c0 + chunk] = xr.mul_(yc).sum(dim=1)
        ctx.save_for_backward(x, y, rows, cols)
        ctx.chunk, ctx.same = chunk, same
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):
        x, y, rows, cols = ctx.saved_tensors
        chunk, same = ctx.chunk, ctx.same
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Half-precision inputs: a row of x can collect thousands of pair terms, so the
        # scatter-add runs into a float32 (or float64) buffer cast back once at the end.
        acc = accumulate_dtype(x, y)
        grad_s = grad_s.to(acc)
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        if same:
            grad_y = grad_x
        else:
            grad_y = torch.zeros(y.shape, dtype=acc, device=y.device) if need_y else None
        # A row of x collects every pair it appears in: add_rows_ sums them in a fixed order
        # on CUDA (index_add_'s atomics would let the float32 sums vary between runs) and
        # is index_add_ itself on CPU.
        for c0 in range(0, rows.shape[0], chunk):
            r, c = rows[c0 : c0 + chunk], cols[c0 : c0 + chunk]
            g = grad_s[c0 : c0 + chunk, None]
            if grad_x is not None:
                add_rows_(grad_x, r, y.index_select(0, c).to(acc).mul_(g))
            if grad_y is not None:
                add_rows_(grad_y, c, x.index_select(0, r).to(acc).mul_(g))
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if same:
            # x and y are one tensor: autograd adds the two returned gradients, so the
            # combined buffer goes out once.
            grad_y = None
        elif grad_y is not None:
            grad_y = grad_y.to(y.dtype)
        return grad_x, grad_y, None, None, None, None


def pair_similarity(
    x: Tensor,
    y: Tensor,
    rows: Tensor,
    cols: Tensor,
    *,
    chunk_size: Optional[int] = None,
    check: bool = True,
) -> Tensor:
    """Dot products s_k = <x[rows[k]], y[cols[k]]> of P index pairs, chunk by chunk.

    Equal to ``(x[rows] * y[cols]).sum(1)`` (up to rounding), but neither the forward nor
    the backward ever holds the two (P, D) gathers: extra memory is the (P,) result plus
    O(chunk_size * D).  Repeated pairs and self-pairs are fine; their gradients add up.

    Args:
        x: (B, D) embeddings; y: (N, D) embeddings (may be ``x`` itself).
        rows: (P,) indices into x; cols: (P,) indices into y (any integer dtype).
        chunk_size: pairs per chunk; None picks ~2M / D (e.g. 16384 pairs at D = 128).
            Affects speed and peak memory only.
        check: raise ValueError for out-of-range indices (one device sync) instead of an
            indexing error or, on GPU, a device-side assert.

    Returns:
        (P,) similarities in float32 (float64 if an input is float64); gradients w.r.t. x
        and y are accumulated in that dtype and returned in the inputs' dtypes.

    Example::

        >>> x = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
        >>> rows, cols = torch.tensor([0, 0, 3]), torch.tensor([1, 5, 3])
        >>> s = pair_similarity(x, x, rows, cols, chunk_size=2)
        >>> s.sum().backward()
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (B, D) and (N, D), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    rows = rows.to(device=x.device, dtype=torch.long).reshape(-1)
    cols = cols.to(device=x.device, dtype=torch.long).reshape(-1)
    if rows.shape != cols.shape:
        raise ValueError(
            f"rows and cols must have equal lengths, got {rows.numel()} and {cols.numel()}"
        )
    if check:
        _check_index_range([rows], x.shape[0], "row")
        _check_index_range([cols], y.shape[0], "col")
    chunk = resolve_pair_chunk(chunk_size, rows.numel(), x.shape[1])
    return _PairSimilarity.apply(x, y, rows, cols, chunk, y is x)


# Dense mined path when the miner hands over at least this fraction of all B * N pairs
# (counted before deduplication, so no device sync).  Measured on CPU (D = 128, B = N = 1024
# and 2048, fwd+bwd, random subsets of all pairs, 1 and 2 threads): the dense pass costs
# about what the all-pairs loss costs whatever P is, the sparse path grows linearly with P


def gather_pairs_circle_loss(
    x: Tensor,
    y: Tensor,
    a1: Tensor,
    p: Tensor,
    a2: Tensor,
    n: Tensor,
    *,
    m: float,
    gamma: float,
    detach_weights: bool = True,
    check: bool = True,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """(B,) per-anchor Circle losses over the explicit pairs (a1[k], p[k]) (positive) and
    (a2[k], n[k]) (negative), long index tensors on x's device (validated by the caller):
    repeated pairs count once; with ``check`` a pair both positive and negative raises
    ValueError (one device sync)."""
    num_rows, num_cols = x.shape[0], y.shape[0]
    key_p = _pair_keys(a1, p, num_cols)
    key_n = _pair_keys(a2, n, num_cols)
    if check and _sorted_overlap(key_p, key_n):
        raise ValueError("Each pair should be either be positive or negative")
    pa, pj = _split_keys(key_p, num_cols)
    na, nj = _split_keys(key_n, num_cols)
    del key_p, key_n  # consumed: their storage now holds pa and na
    sim = dict(chunk_size=chunk_size, check=False)
    z_pos = pair_logits(pair_similarity(x, y, pa, pj, **sim), True, m, gamma, detach_weights)
    z_neg = pair_logits(pair_similarity(x, y, na, nj, **sim), False, m, gamma, detach_weights)
    lse_p, has_p = scatter_logsumexp(z_pos, pa, num_rows)
    lse_n, has_n = scatter_logsumexp(z_neg, na, num_rows)
    return torch.where(has_p & has_n, F.softplus(lse_p + lse_n), 0.0)


__all__ = [
    "gather_pairs_circle_loss",
    "pair_similarity",
    "resolve_pair_chunk",
    "scatter_logsumexp",
    "unique_pairs",
]
