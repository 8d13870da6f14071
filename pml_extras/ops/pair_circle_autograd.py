"""The pair-level Circle loss's blockwise pass as an autograd Function: the PyTorch loops
(the Triton kernels' oracle) and the switch to the fused kernels, with the implementation
fixed.

:func:`blockwise_circle` applies :class:`BlockwiseCircle` with the operand dtype already
decided (None: PyTorch); :mod:`~pml_extras.ops.pair_circle` decides it (validation, the
operand policy, :func:`~pml_extras.ops.dispatch.resolve_impl`) and the self-check
(:mod:`~pml_extras.ops.kernel_check`) calls this module directly. The formula is in
:mod:`~pml_extras.ops.pair_circle`'s docstring. Also here: the logit and streaming
logsumexp helpers that the gather path (:mod:`~pml_extras.ops.pair_gather`) shares.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._launch import apply_eagerly
from .precision import accumulate_dtype

BlockSize = Union[int, Sequence[int], None]


# Each block holds a handful of rows x cols temporaries; 2**21 float32 elements (8 MB each)
# keeps them cache/allocator friendly while the matmuls stay large enough to be efficient.
_BLOCK_ELEMS = 1 << 21
_MAX_ROW_BLOCK = 1024
# F.softplus's default threshold (beta = 1), above which it returns its input.
_SOFTPLUS_THRESHOLD = 20.0


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


class LabelMasks:
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


class PairMasks:
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


class BlockwiseCircle(torch.autograd.Function):
    """Blockwise circle loss of (B, D) x against (N, D) y; ``masks`` says which pairs are
    positive / negative (:class:`LabelMasks` or :class:`PairMasks`).

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
        grad_x, grad_y = BlockwiseCircle._gradients(ctx, x, y, lse_p, lse_n, valid, grad_losses)
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


def blockwise_circle(x, y, masks, m, gamma, block_size, detach_weights, operand):
    """(B,) losses of ``x`` against ``y`` (pairs from ``masks``) through
    :class:`BlockwiseCircle`: the fused kernels with ``operand`` matmul operands, or the
    PyTorch loops for ``operand`` None. No dispatch, no check."""
    acc = accumulate_dtype(x, y)
    rb, cb = resolve_block_size(block_size, x.shape[0], y.shape[0])
    # The PyTorch path runs its matmuls in the accumulation dtype too: with gamma=256 a
    # bf16 rounding error of ~4e-3 in s would move a logit by ~1. (The Triton kernels keep
    # s in float32 whatever the operand dtype.)
    xa = x.to(acc)
    ya = xa if y is x else y.to(acc)
    # y None: the reference set is x itself (see BlockwiseCircle.forward).
    y_arg = None if ya is xa else ya
    args = (xa, y_arg, masks, float(m), float(gamma), rb, cb, bool(detach_weights), operand)
    if operand is not None:
        return apply_eagerly(BlockwiseCircle, *args)
    return BlockwiseCircle.apply(*args)


__all__ = [
    "BlockSize",
    "BlockwiseCircle",
    "LabelMasks",
    "PairMasks",
    "blockwise_circle",
    "circle_logits",
    "exp_floor",
    "pair_logits",
    "resolve_block_size",
]
