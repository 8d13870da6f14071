"""The class backward kernel: grad W of the class logsumexp (grad x needs no kernel).

Grid (class tiles, D groups). Each program holds its BLOCK_C-class tile of W and walks
all row blocks, BLOCK_M rows at a time: recompute the logits, G = exp(z - lse) * g'(c) *
grad_lse (target column masked; no mask at the clamp), accumulate x^T G in registers
(D_GROUP x BLOCK_C float32) and the radial term r_j = sum_i G_ij raw_ij
(= <grad_w_hat_j, w_hat_j>, so it needs no full-D accumulator), then write
grad_w_j = (grad_w_hat_j - w_hat_j r_j) / ||w_j|| once: no atomics, no second pass.

``RESIDENT`` (all of D in one group, the production case): the W tile is loaded once per
program and each x block once for both dots; at the default 64 x 32 steps both dots run
on wgmma (bf16, D = 512: 255 registers, no spills, x double-buffered by cp.async).
Otherwise the logits are a K-loop over D (each D slice program recomputing them).
``RESCALE`` (float16 operands): each column of G is scaled into [-1, 1] before rounding
and the scale applied to the float32 product.
Imports only the tile helpers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .class_lse_triton_tiles import logits_k_loop, transform


@triton.jit
def bwd_w_kernel(
    X,
    W,
    INV,
    RX,
    TGT,
    RP,
    P1,
    LSE,
    GLSE,
    GW,
    B,
    D,
    C,
    stride_xb,
    stride_xd,
    stride_wd,
    stride_wc,
    stride_gd,
    stride_gc,
    p0,
    p1_value,
    KIND: tl.constexpr,
    P1_PTR: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    RESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_GROUP: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    inv = tl.load(INV + cols, mask=col_ok, other=0.0)
    if P1_PTR:
        p1 = tl.load(P1)
    else:
        p1 = p1_value
    dg = pid_g * D_GROUP + tl.arange(0, D_GROUP)
    dg_ok = dg < D
    w_cols = W + cols.to(tl.int64)[None, :] * stride_wc
    w_ptrs = w_cols + dg.to(tl.int64)[:, None] * stride_wd
    w_mask = dg_ok[:, None] & col_ok[None, :]
    if RESIDENT:
        w_dot = tl.load(w_ptrs, mask=w_mask, other=0.0).to(OP_DTYPE).to(DOT_DTYPE)
    acc = tl.zeros([D_GROUP, BLOCK_C], dtype=tl.float32)
    radial = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, B, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
        rp = tl.load(RP + rows, mask=row_ok, other=0.0)
        # Rows whose columns are all masked have lse = -inf; ``valid`` is False on all of
        # them, so the tl.where below never lets exp(z + inf) through.
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        glse = tl.load(GLSE + rows, mask=row_ok, other=0.0)
        rx = tl.load(RX + rows, mask=row_ok, other=0.0)
        x_group = tl.load(
            X + rows.to(tl.int64)[:, None] * stride_xb + dg[None, :] * stride_xd,
            mask=row_ok[:, None] & dg_ok[None, :],
            other=0.0,
        )
        x_group = x_group.to(OP_DTYPE).to(DOT_DTYPE)
        if RESIDENT:
            # All of D in one group: the W tile loaded once above serves every row block,
            # and the x block is loaded once for both dots (cost_model design "v2": x
            # through L2 once per class tile instead of twice, W once per program).
            s = tl.dot(x_group, w_dot, input_precision=PRECISION)
        else:
            s = logits_k_loop(
                X,
                w_cols,
                rows,
                row_ok,
                col_ok,
                D,
                stride_xb,
                stride_xd,
                stride_wd,
                OP_DTYPE,
                DOT_DTYPE,
                PRECISION,
                BLOCK_M,
                BLOCK_C,
                BLOCK_D,
            )
        # The elementwise work sits in a branch of its own for Triton 3.9's sake: a dot
        # whose result feeds another dot in the same region gets all its warps along M
        # ([8, 1]), so a 64-row logits tile would be computed whole by both warpgroups
        # (twice the tensor work; 464 spill bytes at 64 x 32). Behind the branch the
        # logits dot splits its columns over the warpgroups and nothing spills. The
        # branch is exact: with p0 = 0 every transform's dz is 0, so G and the radial
        # term are 0 (the else branch, run by the tests).
        if p0 != 0.0:
            raw = s * rx[:, None] * inv[None, :]
            c = tl.minimum(tl.maximum(raw, -1.0), 1.0)
            z, dz = transform(c, rp, p0, p1, KIND)
            valid = col_ok[None, :] & (cols[None, :] != tgt[:, None])
            g = tl.where(valid, tl.exp(z - lse[:, None]) * dz * glse[:, None], 0.0)
            # <grad_w_hat_j, w_hat_j> = sum_i G_ij <x_hat_i, w_hat_j> = sum_i G_ij raw_ij.
            radial_part = tl.sum(g * raw, axis=0)
            # grad_w_hat_j = sum_i G_ij x_hat_i = sum_i (G_ij / ||x_i||) x_i: the raw x tile.
            g = g * rx[:, None]
        else:
            g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            radial_part = tl.zeros([BLOCK_C], dtype=tl.float32)
        radial += radial_part
        if RESCALE:
            # fp16 operands: each column scaled into [-1, 1] before rounding, the scale
            # applied to the float32 product. Without it, G ~ 1e-9 (C = 1M, mean
            # reduction) flushes to zero and a large 1/||x|| overflows.
            g_max = tl.maximum(tl.max(tl.abs(g), axis=0), 1.0e-38)
            g = (g / g_max[None, :]).to(OP_DTYPE).to(DOT_DTYPE)
            part = tl.dot(tl.trans(x_group), g, input_precision=PRECISION)
            acc += part * g_max[None, :]
        else:
            g = g.to(OP_DTYPE).to(DOT_DTYPE)
            acc = tl.dot(tl.trans(x_group), g, acc, input_precision=PRECISION)
    # Normalisation Jacobian: (I - w_hat w_hat^T) / ||w||.
    # W loaded again for the Jacobian rather than kept live in registers through the loop.
    w_group = tl.load(w_ptrs, mask=w_mask, other=0.0)
    w_hat = w_group.to(OP_DTYPE).to(tl.float32) * inv[None, :]
    grad = (acc - w_hat * radial[None, :]) * inv[None, :]
    tl.store(
        GW + dg.to(tl.int64)[:, None] * stride_gd + cols.to(tl.int64)[None, :] * stride_gc,
        grad.to(GW.dtype.element_ty),
        mask=dg_ok[:, None] & col_ok[None, :],
    )


__all__ = ["bwd_w_kernel"]
