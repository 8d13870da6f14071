"""Stateless core of the pair-level Circle loss, computed without a B x N similarity matrix.

For an anchor row i with positive similarities s_p and negative similarities s_n,

    P_i = logsumexp_k  -gamma * [1 + m - s_p_k]_+ * (s_p_k - (1 - m))
    N_i = logsumexp_j   gamma * [s_n_j + m]_+    * (s_n_j - m)
    L_i = softplus(P_i + N_i)           (0 when the row has no positive or no negative)

with the [.]_+ weights treated as constants in the gradient (as in the paper and PML).

Two entry points, both returning per-anchor losses of shape (B,):

* ``all_pairs_circle_loss``: every (i, j) pair is positive when the labels match and negative
  otherwise.  A custom autograd Function (``_BlockwiseCircle``) runs an online logsumexp
  over column blocks of the reference set and recomputes each block in backward, so memory
  is O((B + N) * D) plus one block of temporaries.
* ``mined_pairs_circle_loss``: explicit (anchor, positive) and (anchor, negative) index pairs
  from a miner.  Sparse mining: each pair's similarity is a row-wise dot product computed
  over chunks of pairs by a second custom autograd Function (``pair_similarity``), followed
  by a per-anchor scatter logsumexp; memory O(P) per-pair scalars and indices (the miner
  already hands over P indices) plus O(chunk * D), never O(P * D).  Dense mining (at least
  ``DENSE_PAIR_FRACTION`` of all pairs): the pairs are scattered into (B, N) boolean masks
  and the all-pairs Function runs with those masks instead of label comparisons.

Inputs are the already-normalised embeddings: s_ij = <x_i, y_j>.  All logsumexp / softplus
arithmetic is done in float32, or float64 when an input is float64.

``impl`` picks who runs the blockwise pass (all pairs and dense mining): "torch" is the
loop in ``_BlockwiseCircle`` below, which works everywhere and is the oracle for
"triton", the fused kernels of ``pair_circle_triton`` (similarity tiles in registers,
bf16/fp16 tensor-core matmuls with float32 accumulation); "auto" takes Triton on CUDA.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# One notion of "Triton is usable" and of running it under torch.compile, for all ops.
from .class_lse import apply_eagerly, resolve_impl

BlockSize = Union[int, Sequence[int], None]

# Each block holds a handful of rows x cols temporaries; 2**21 float32 elements (8 MB each)
# keeps them cache/allocator friendly while the matmuls stay large enough to be efficient.
_BLOCK_ELEMS = 1 << 21
_MAX_ROW_BLOCK = 1024
# F.softplus's default threshold (beta = 1), above which it returns its input.
_SOFTPLUS_THRESHOLD = 20.0


def accumulate_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: never narrower than float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def resolve_block_size(block_size: BlockSize, num_rows: int, num_cols: int) -> Tuple[int, int]:
    """Return ``(row_block, col_block)``; an int sets both, None picks a default."""
    if block_size is None:
        rb = max(1, min(num_rows, _MAX_ROW_BLOCK))
        cb = max(1, min(num_cols, _BLOCK_ELEMS // rb))
        return rb, cb
    if isinstance(block_size, int):
        rb = cb = block_size
    else:
        rb, cb = (int(b) for b in block_size)
    if rb < 1 or cb < 1:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    return rb, cb


def exp_floor(dtype: torch.dtype) -> float:
    """Offsets below which exp() terms are dropped: eps**3 relative to the largest term.

    Dropping them changes a logsumexp by less than N * eps**3 (relative), far below
    rounding, and keeps exp() off the underflow path, which on CPU is ~50x slower and
    then feeds subnormals into the matmuls.
    """
    return 3.0 * math.log(torch.finfo(dtype).eps)


def circle_logits(
    s: Tensor, is_pos: Tensor, m: float, gamma: float, detach_weights: bool = True
) -> Tuple[Tensor, Tensor]:
    """Return ``(z, dz/ds)`` for similarities ``s``: the positive logit where ``is_pos``,
    the negative logit elsewhere.

    With ``detach_weights`` the [.]_+ factor counts as a constant in dz/ds; otherwise
    dz/ds is the full derivative (used to gradcheck the blockwise machinery).
    """
    # With u = 1 - s for positives and u = s for negatives both logits have one form:
    #   -gamma [1+m-s]_+ (s-(1-m)) = gamma [u+m]_+ (u-m) = gamma [s+m]_+ (s-m),
    # so a single elementwise chain serves the whole block.
    u = torch.where(is_pos, 1.0 - s, s)
    gw = (u + m).clamp_min(0.0) * gamma
    centred = u - m
    z = gw * centred
    dz_du = gw
    if not detach_weights:
        dz_du = gw + gamma * (u + m > 0).to(s.dtype) * centred
    # du/ds = -1 for positives
    return z, torch.where(is_pos, -dz_du, dz_du)


def pair_logits(
    s: Tensor, positive: bool, m: float, gamma: float, detach_weights: bool = True
) -> Tensor:
    """Autograd-friendly Circle logits of positive (or negative) pair similarities ``s``."""
    sw = s.detach() if detach_weights else s
    if positive:
        return -gamma * torch.clamp_min(1.0 + m - sw, 0.0) * (s - (1.0 - m))
    return gamma * torch.clamp_min(sw + m, 0.0) * (s - m)


def _exp_above(arg: Tensor, floor: float) -> Tensor:
    return torch.exp(torch.where(arg >= floor, arg, float("-inf")))


def _lse_update(run_max: Tensor, run_sum: Tensor, z: Tensor) -> Tuple[Tensor, Tensor]:
    """One step of a streaming logsumexp over dim 1; masked entries of ``z`` are -inf."""
    new_max = torch.maximum(run_max, z.amax(dim=1))
    # Rows that have seen no entry yet keep max = -inf; shifting them by 0 instead avoids
    # (-inf) - (-inf) = nan while still giving exp(-inf) = 0.
    shift = torch.where(torch.isfinite(new_max), new_max, 0.0)
    floor = exp_floor(z.dtype)
    block_sum = _exp_above(z - shift[:, None], floor).sum(dim=1)
    run_sum = run_sum * torch.exp(run_max - shift) + block_sum
    return new_max, run_sum


def _lse_finish(run_max: Tensor, run_sum: Tensor) -> Tuple[Tensor, Tensor]:
    has = torch.isfinite(run_max)
    # log(1) on empty rows keeps the unused branch finite (no inf/nan in where's backward).
    lse = torch.where(has, run_max + torch.log(torch.where(has, run_sum, 1.0)), 0.0)
    return lse, has


class _LabelMasks:
    """Mask source of the all-pairs loss: a pair is positive when the labels match.

    ``block(r0, n_r, c0, n_c)`` returns the (n_r, n_c) boolean ``(pos, neg)`` masks of the
    block of rows r0.. and columns c0..; built on the fly, nothing of size B x N is held.
    """

    def __init__(self, labels: Tensor, ref_labels: Tensor, self_compare: bool):
        self.labels, self.ref_labels, self.self_compare = labels, ref_labels, self_compare

    def block(self, r0: int, n_r: int, c0: int, n_c: int) -> Tuple[Tensor, Tensor]:
        same = self.labels[r0 : r0 + n_r, None] == self.ref_labels[None, c0 : c0 + n_c]
        neg = ~same
        pos = same
        # Self-comparisons are neither positive nor negative; skip the work for blocks that
        # cannot touch the diagonal (decided from Python ints, so no device sync).
        if self.self_compare and r0 < c0 + n_c and c0 < r0 + n_r:
            rows = torch.arange(r0, r0 + n_r, device=same.device)
            cols = torch.arange(c0, c0 + n_c, device=same.device)
            pos = same & (rows[:, None] != cols[None, :])
        return pos, neg

    def triton_source(self):
        from .pair_circle_triton import PairSource

        return PairSource(self.labels, self.ref_labels, self.self_compare)


class _PairMasks:
    """Mask source of the dense mined path: (B, N) boolean masks scattered from index pairs.

    Each mask costs B * N bytes; the automatic choice only builds them when the miner handed
    over P >= ``DENSE_PAIR_FRACTION`` * B * N pairs, so they stay O(P).
    Repeated pairs set the same entry, which gives PML's set semantics without a sort.
    """

    def __init__(self, pos: Tensor, neg: Tensor):
        self.pos, self.neg = pos, neg

    def block(self, r0: int, n_r: int, c0: int, n_c: int) -> Tuple[Tensor, Tensor]:
        rows, cols = slice(r0, r0 + n_r), slice(c0, c0 + n_c)
        return self.pos[rows, cols], self.neg[rows, cols]

    def triton_source(self):
        from .pair_circle_triton import PairSource

        return PairSource(pos=self.pos, neg=self.neg)


class _BlockwiseCircle(torch.autograd.Function):
    """Blockwise circle loss of (B, D) x against (N, D) y; ``masks`` says which pairs are
    positive / negative (``_LabelMasks`` or ``_PairMasks``).

    ``operand_dtype`` None: the PyTorch loops below (x and y in the accumulation dtype).
    Otherwise the fused Triton kernels of ``pair_circle_triton`` with matmul operands of
    that dtype; same (lse_p, lse_n) contract, float32 results."""

    @staticmethod
    def forward(ctx, x, y, masks, m, gamma, rb, cb, detach_weights, operand_dtype=None):
        # y None means "x itself" (self-comparison): one tensor passed twice would make
        # torch.compile break the graph here ("duplicate tensor input").
        ctx.same = y is None
        if ctx.same:
            y = x
        # The mask source holds only index/label tensors (never differentiated, never
        # modified in place here), so it rides on ctx instead of save_for_backward.
        ctx.masks = masks
        ctx.args = (m, gamma, rb, cb, detach_weights, operand_dtype)
        if operand_dtype is not None:
            from . import pair_circle_triton

            lse_p, lse_n = pair_circle_triton.forward(
                x, y, masks.triton_source(), m, gamma, operand_dtype
            )
            valid = torch.isfinite(lse_p) & torch.isfinite(lse_n)
            ctx.save_for_backward(x, y, lse_p, lse_n, valid)
            return torch.where(valid, F.softplus(lse_p + lse_n), 0.0)
        num_rows, num_cols = x.shape[0], y.shape[0]
        neg_inf = float("-inf")
        lse_p = x.new_zeros(num_rows)
        lse_n = x.new_zeros(num_rows)
        valid = torch.zeros(num_rows, dtype=torch.bool, device=x.device)
        for r0 in range(0, num_rows, rb):
            xr = x[r0 : r0 + rb]
            n_r = xr.shape[0]
            max_p = xr.new_full((n_r,), neg_inf)
            max_n = xr.new_full((n_r,), neg_inf)
            sum_p = xr.new_zeros(n_r)
            sum_n = xr.new_zeros(n_r)
            for c0 in range(0, num_cols, cb):
                yc = y[c0 : c0 + cb]
                s = xr @ yc.t()
                pos, neg = masks.block(r0, n_r, c0, yc.shape[0])
                z, _ = circle_logits(s, pos, m, gamma)
                max_p, sum_p = _lse_update(max_p, sum_p, z.masked_fill(~pos, neg_inf))
                max_n, sum_n = _lse_update(max_n, sum_n, z.masked_fill(~neg, neg_inf))
            lp, has_p = _lse_finish(max_p, sum_p)
            ln, has_n = _lse_finish(max_n, sum_n)
            lse_p[r0 : r0 + n_r] = lp
            lse_n[r0 : r0 + n_r] = ln
            valid[r0 : r0 + n_r] = has_p & has_n
        logit = lse_p + lse_n
        losses = torch.where(valid, F.softplus(logit), 0.0)
        ctx.save_for_backward(x, y, lse_p, lse_n, valid)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        x, y, lse_p, lse_n, valid = ctx.saved_tensors
        if ctx.same:
            y = x
        grad_x, grad_y = _BlockwiseCircle._gradients(ctx, x, y, lse_p, lse_n, valid, grad_losses)
        if ctx.same and grad_y is not None:
            # Both roles of the one tensor: its gradient is the sum (grad_x is our own
            # fresh buffer, so adding in place is safe).
            grad_x = grad_y if grad_x is None else grad_x.add_(grad_y)
            grad_y = None
        return grad_x, grad_y, *([None] * 7)

    @staticmethod
    def _gradients(ctx, x, y, lse_p, lse_n, valid, grad_losses):
        """(grad_x, grad_y) of the losses' weighted sum; None where not needed."""
        masks = ctx.masks
        m, gamma, rb, cb, detach_weights, operand_dtype = ctx.args
        need_x = ctx.needs_input_grad[0]
        need_y = need_x if ctx.same else ctx.needs_input_grad[1]
        num_rows, num_cols = x.shape[0], y.shape[0]
        # dL_i/d(P_i + N_i) = sigmoid(P_i + N_i), except above F.softplus's threshold (20),
        # where the forward (like PML's) is linear and autograd's derivative is exactly 1;
        # rows without a loss pass no gradient.
        logit = lse_p + lse_n
        d_softplus = torch.where(logit > _SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(logit))
        g_row = torch.where(valid, grad_losses.to(lse_p.dtype) * d_softplus, 0.0)
        if operand_dtype is not None:
            from . import pair_circle_triton

            grad_x, grad_y = pair_circle_triton.backward(
                x,
                y,
                masks.triton_source(),
                m,
                gamma,
                operand_dtype,
                lse_p,
                lse_n,
                g_row,
                need_x=need_x,
                need_y=need_y,
            )
            grad_x = grad_x.to(x.dtype) if grad_x is not None else None
            grad_y = grad_y.to(y.dtype) if grad_y is not None else None
            return grad_x, grad_y
        # Rows whose whole gradient is below the smallest normal/eps cannot move any
        # embedding by a representable amount; zeroing them keeps the matmuls subnormal-free.
        g_row = g_row.masked_fill(
            g_row.abs() < torch.finfo(x.dtype).tiny / torch.finfo(x.dtype).eps, 0.0
        )
        floor = exp_floor(x.dtype)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_y = torch.zeros_like(y) if need_y else None
        for r0 in range(0, num_rows, rb):
            xr = x[r0 : r0 + rb]
            n_r = xr.shape[0]
            g_r = g_row[r0 : r0 + n_r, None]
            lp = lse_p[r0 : r0 + n_r, None]
            ln = lse_n[r0 : r0 + n_r, None]
            for c0 in range(0, num_cols, cb):
                yc = y[c0 : c0 + cb]
                s = xr @ yc.t()
                pos, neg = masks.block(r0, n_r, c0, yc.shape[0])
                z, dz = circle_logits(s, pos, m, gamma, detach_weights)
                # Softmax weight of each pair within its own (positive or negative) set.
                # Every kept entry belongs to a non-empty set whose lse is real, so arg <= 0
                # even in rows without a loss (their g is 0).
                arg = z - torch.where(pos, lp, ln)
                arg = arg.masked_fill(~(pos | neg), float("-inf"))
                ds = _exp_above(arg, floor) * dz
                # The per-row factor g is applied outside the matmuls: tiny g times tiny
                # softmax weights would otherwise fill ds with subnormals.
                if need_x:
                    grad_x[r0 : r0 + n_r] += (ds @ yc) * g_r
                if need_y:
                    grad_y[c0 : c0 + yc.shape[0]] += ds.t() @ (xr * g_r)
        return grad_x, grad_y


IMPLS = ("auto", "torch", "triton")


def resolve_operand_dtype(
    impl: str, x: Tensor, y: Tensor, operand_dtype: Optional[torch.dtype], detach_weights: bool
) -> Optional[torch.dtype]:
    """The Triton kernels' matmul operand dtype, or None for the PyTorch path.

    ``operand_dtype`` defaults to the inputs' promoted dtype; callers that normalised
    half-precision embeddings in float32 pass the embeddings' dtype so that the matmuls
    run on bf16/fp16 tensor cores. "auto" picks Triton on CUDA when it is installed, for
    float32/bf16/fp16 operands and the paper's detached weights.
    """

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if operand_dtype is None:
        operand_dtype = torch.promote_types(x.dtype, y.dtype)
    supported = operand_dtype in (torch.float32, torch.bfloat16, torch.float16)
    if impl == "auto":
        if not (supported and detach_weights):
            return None
        impl = resolve_impl("auto", x.device, operand_dtype, family="pair_circle")
    elif impl == "triton":
        resolve_impl("triton", x.device)  # raises when Triton cannot run here
        if not supported:
            raise TypeError(
                "impl='triton' supports float32/bfloat16/float16 operands, got "
                f"{operand_dtype}; use impl='torch' or 'auto'"
            )
        if not detach_weights:
            raise ValueError("impl='triton' supports only detach_weights=True")
        # Self-checked once per (device, dtype); raises KernelCheckError on a failure.
        resolve_impl("triton", x.device, operand_dtype, family="pair_circle")
    return operand_dtype if impl == "triton" else None


def all_pairs_circle_loss(
    x: Tensor,
    y: Tensor,
    labels: Tensor,
    ref_labels: Tensor,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    self_compare: bool = False,
    block_size: BlockSize = None,
    detach_weights: bool = True,
    impl: str = "auto",
    operand_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Per-anchor pair-level Circle loss over all pairs, computed blockwise.

    Args:
        x: (B, D) normalised query embeddings.
        y: (N, D) normalised reference embeddings (may be ``x`` itself).
        labels: (B,) query labels; ref_labels: (N,) reference labels.
        self_compare: drop the pairs (i, i) (the reference set is the batch itself).
        block_size: int for square blocks, ``(rows, cols)``, or None for a default.
        detach_weights: treat the [.]_+ weights as constants in the gradient (paper / PML).
        impl: "auto" (fused Triton kernels on CUDA, else PyTorch), "torch" or "triton".
        operand_dtype: matmul operand dtype of the Triton kernels (default: the inputs'
            promoted dtype); accumulation is float32 either way.

    Returns:
        (B,) losses in float32 (float64 if an input is float64); 0 for rows with no positive
        or no negative.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (B, D) and (N, D), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if labels.shape != (x.shape[0],) or ref_labels.shape != (y.shape[0],):
        raise ValueError("labels must be (B,) and ref_labels (N,)")
    masks = _LabelMasks(labels, ref_labels, bool(self_compare))
    return _run_blockwise(x, y, masks, m, gamma, block_size, detach_weights, impl, operand_dtype)


def _run_blockwise(x, y, masks, m, gamma, block_size, detach_weights, impl, operand_dtype):
    operand = resolve_operand_dtype(impl, x, y, operand_dtype, bool(detach_weights))
    acc = accumulate_dtype(x, y)
    rb, cb = resolve_block_size(block_size, x.shape[0], y.shape[0])
    # The PyTorch path runs its matmuls in the accumulation dtype too: with gamma=256 a
    # bf16 rounding error of ~4e-3 in s would move a logit by ~1. (The Triton kernels keep
    # s in float32 whatever the operand dtype.)
    xa = x.to(acc)
    ya = xa if y is x else y.to(acc)
    # y None: the reference set is x itself (see _BlockwiseCircle.forward).
    y_arg = None if ya is xa else ya
    args = (xa, y_arg, masks, float(m), float(gamma), rb, cb, bool(detach_weights), operand)
    if operand is not None:
        return apply_eagerly(_BlockwiseCircle, *args)  # see class_lse.apply_eagerly
    return _BlockwiseCircle.apply(*args)


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
    sums = values.new_zeros(size).index_add(0, index, terms)
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
        for c0 in range(0, rows.shape[0], chunk):
            r, c = rows[c0 : c0 + chunk], cols[c0 : c0 + chunk]
            g = grad_s[c0 : c0 + chunk, None]
            if grad_x is not None:
                grad_x.index_add_(0, r, y.index_select(0, c).to(acc).mul_(g))
            if grad_y is not None:
                grad_y.index_add_(0, c, x.index_select(0, r).to(acc).mul_(g))
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
# (~0.5-0.7 us per pair), and they cross between 7 % and 15 %; at 10 % the dense pass was
# never the slower one.  The two (B, N) boolean masks then take 2 * B * N <= 20 * P bytes,
# next to the 16 * P bytes of the miner's own int64 indices, so memory stays O(P).
DENSE_PAIR_FRACTION = 0.1


def choose_mined_path(num_pairs: int, num_rows: int, num_cols: int) -> str:
    """``"dense"`` when ``num_pairs >= DENSE_PAIR_FRACTION * num_rows * num_cols``."""
    return "dense" if num_pairs >= DENSE_PAIR_FRACTION * num_rows * num_cols else "sparse"


def mined_pairs_circle_loss(
    x: Tensor,
    y: Tensor,
    a1: Tensor,
    p: Tensor,
    a2: Tensor,
    n: Tensor,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    detach_weights: bool = True,
    check: bool = True,
    chunk_size: Optional[int] = None,
    block_size: BlockSize = None,
    path: str = "auto",
    impl: str = "auto",
    operand_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Per-anchor pair-level Circle loss over explicit pairs (a1[k], p[k]) and (a2[k], n[k]).

    Repeated pairs count once (PML builds boolean masks from the indices); self-pairs (i, i)
    count like any other pair.  With ``check`` (default), out-of-range indices and pairs
    that are both positive and negative raise ValueError; these checks synchronise with the
    device once per call.

    Two evaluations with the same result (up to rounding), picked by ``path``:

    * ``"sparse"``: deduplicate the pairs, compute each pair's similarity chunk by chunk
      (``pair_similarity``) and take a per-anchor scatter logsumexp.  Memory O(P) plus one
      chunk of ``chunk_size`` gathered rows; time O(P * D) but with gathers and scatters.
    * ``"dense"``: scatter the pairs into (B, N) boolean masks (B * N bytes each) and run
      the blockwise all-pairs machinery with those masks; time O(B * N * D) in matmuls,
      memory O(B * N) bytes plus one block, the same as the all-pairs loss.
    * ``"auto"`` (default): dense when the miner returned at least
      ``DENSE_PAIR_FRACTION`` (10 %) of the B * N pairs (repeats included), where the dense
      pass is the faster one (measured crossover 7-15 % on CPU) and its masks cost at most
      20 bytes per mined pair, next to the 16 of the miner's own indices.

    ``block_size``, ``impl`` and ``operand_dtype`` are as in ``all_pairs_circle_loss``
    (dense path; the sparse path is PyTorch only); ``chunk_size`` as in
    ``pair_similarity`` (sparse path).

    Returns (B,) losses, B = x.shape[0], in float32 (float64 if an input is float64).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (B, D) and (N, D), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if path not in ("auto", "dense", "sparse"):
        raise ValueError(f"path must be 'auto', 'dense' or 'sparse', got {path!r}")
    num_rows, num_cols = x.shape[0], y.shape[0]
    device = x.device
    a1, p, a2, n = (t.to(device=device, dtype=torch.long).reshape(-1) for t in (a1, p, a2, n))
    if a1.shape != p.shape or a2.shape != n.shape:
        raise ValueError("a1/p and a2/n must have equal lengths")
    if check:
        _check_index_range([a1, a2], num_rows, "anchor")
        _check_index_range([p, n], num_cols, "positive/negative")
    if path == "auto":
        path = choose_mined_path(a1.numel() + a2.numel(), num_rows, num_cols)
    if path == "dense":
        masks = _dense_pair_masks(x, y, (a1, p, a2, n), check)
        return _run_blockwise(
            x, y, masks, m, gamma, block_size, detach_weights, impl, operand_dtype
        )
    resolve_operand_dtype(impl, x, y, operand_dtype, bool(detach_weights))  # validate impl
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


def _pair_mask(rows: Tensor, cols: Tensor, num_rows: int, num_cols: int) -> Tensor:
    mask = torch.zeros(num_rows * num_cols, dtype=torch.bool, device=rows.device)
    # Flat keys built in place on one P-sized temporary; repeats just set True again.
    key = rows * num_cols
    mask.index_fill_(0, key.add_(cols), True)
    return mask.view(num_rows, num_cols)


def _dense_pair_masks(x, y, pairs, check) -> _PairMasks:
    a1, p, a2, n = pairs
    num_rows, num_cols = x.shape[0], y.shape[0]
    pos = _pair_mask(a1, p, num_rows, num_cols)
    neg = _pair_mask(a2, n, num_rows, num_cols)
    if check and bool((pos & neg).any()):
        raise ValueError("Each pair should be either be positive or negative")
    return _PairMasks(pos, neg)


__all__ = [
    "DENSE_PAIR_FRACTION",
    "IMPLS",
    "accumulate_dtype",
    "all_pairs_circle_loss",
    "choose_mined_path",
    "circle_logits",
    "mined_pairs_circle_loss",
    "pair_logits",
    "pair_similarity",
    "resolve_block_size",
    "resolve_operand_dtype",
    "resolve_pair_chunk",
    "scatter_logsumexp",
    "unique_pairs",
]
