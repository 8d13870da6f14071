"""The class backward kernel: grad W of the class logsumexp (grad x needs no kernel).

Grid (class tiles, D groups). Each program holds its BLOCK_C-class tile of W and walks
all row blocks, BLOCK_M rows at a time: recompute the logits, G = exp(z - lse) * g'(c) *
grad_lse (target column masked; no mask at the clamp), accumulate x^T G in registers
(float32, all of the D group for every class of the tile) and the radial term
r_j = sum_i G_ij raw_ij (= <grad_w_hat_j, w_hat_j>, so it needs no full-D accumulator),
then write grad_w_j = (grad_w_hat_j - w_hat_j r_j) / ||w_j|| once: no atomics, no
second pass.

``RESIDENT`` (all of D in one group, the production case): the W tile is loaded once per
program and each x block once for both dots. Otherwise the logits are a K-loop over D
(each D slice program recomputing them). ``RESCALE`` (float16 operands): each column of
G is scaled into [-1, 1] before rounding and the scale applied to the float32 product.

bfloat16 operands (``CLASS_MAJOR``, the production case: 64 x 64 steps by default)
accumulate the transpose, (x^T G)^T = G^T x, a (BLOCK_C x D) tile: G^T is wgmma's A
operand straight from registers and the x block its B operand in shared memory, and the
Jacobian runs on the tensor cores (see ``_jacobian_on_tensor_cores``), with the W tile the
logits already hold in shared memory as its B operand. At 64 x 64 x 512 this compiles
with no spills for bf16 and fp32 W (tests/gpu/test_sm90_spills.py); the (D x BLOCK_C)
accumulator with the Jacobian in registers spilled 1992 B (bf16 W): the float32 W tile
it loads sits next to the 128-register accumulator, and the store's indices, shared with
the W load, are held across the loop. float32 and float16 operands
keep that layout (64 x 32 steps): it is what compiles best for them (float16 needs a
second accumulator for its per-step scale; IEEE float32 dots run on FMA units).
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
    # bfloat16: the transposed accumulator and the Jacobian on the tensor cores (above).
    CLASS_MAJOR: tl.constexpr = OP_DTYPE == tl.bfloat16
    if CLASS_MAJOR:
        acc = tl.zeros([BLOCK_C, D_GROUP], dtype=tl.float32)
    else:
        acc = tl.zeros([D_GROUP, BLOCK_C], dtype=tl.float32)
    radial = tl.zeros([BLOCK_C], dtype=tl.float32)
    steps = 0  # row blocks walked (the epilogue's ``zero``, below)
    for r0 in range(0, B, BLOCK_M):
        steps += 1
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
            if CLASS_MAJOR:
                # Rounded here, so the tile crosses to G^T's layout (through shared memory:
                # each warpgroup needs all of it) as bf16, not float32: stmatrix once,
                # ldmatrix twice, 24 KB a 64 x 64 step instead of 48 KB, and 8 KB less
                # shared memory.
                g = g.to(OP_DTYPE).to(DOT_DTYPE)
        else:
            if CLASS_MAJOR:
                g = tl.zeros([BLOCK_M, BLOCK_C], dtype=DOT_DTYPE)
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
        elif CLASS_MAJOR:
            acc = tl.dot(tl.trans(g), x_group, acc, input_precision=PRECISION)
        else:
            g = g.to(OP_DTYPE).to(DOT_DTYPE)
            acc = tl.dot(tl.trans(x_group), g, acc, input_precision=PRECISION)
    if CLASS_MAJOR:
        # The store's indices are computed after the loop from ``zero`` (0, but not to the
        # compiler), before the Jacobian. With the W load's indices they are computed
        # before the loop and held in registers across it: 116 B of spills (bf16 W) /
        # 260 B (fp32 W) at 64 x 64 x 512 on sm_90a; with ``cols + zero`` 0 / 20 B; with
        # these indices after the Jacobian 220 / 224 B. 1 / ||w|| is the loop's ``inv``
        # (reloading it after the loop in the accumulator's layout: 48 / 48 B).
        zero = steps - tl.cdiv(B, BLOCK_M)
        if RESIDENT:
            w_epi = w_dot
        else:
            w_epi = tl.load(w_ptrs, mask=w_mask, other=0.0).to(OP_DTYPE).to(DOT_DTYPE)
        cols_out = (pid_c * BLOCK_C + zero) + tl.arange(0, BLOCK_C)
        dg_out = (pid_g * D_GROUP + zero) + tl.arange(0, D_GROUP)
        acc = _jacobian_on_tensor_cores(acc, w_epi, inv, radial, OP_DTYPE, DOT_DTYPE,
                                        PRECISION, BLOCK_C)  # fmt: skip
        tl.store(
            GW
            + dg_out.to(tl.int64)[None, :] * stride_gd
            + cols_out.to(tl.int64)[:, None] * stride_gc,
            acc.to(GW.dtype.element_ty),
            mask=(dg_out < D)[None, :] & (cols_out < C)[:, None],
        )
    else:
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


# Smallest normal float32: 1 / d stays finite for |d| at or above it.
_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _jacobian_on_tensor_cores(acc, w_tile, inv, r, OP_DTYPE, DOT_DTYPE, PRECISION, BLOCK_C):
    """grad_j = (acc_j - w_hat_j r_j) / ||w_j|| = inv_j acc_j - d_j w_j, d = r inv^2, for
    the (BLOCK_C x D) accumulator ``acc`` (x^T G, transposed), the inverse norms ``inv``,
    the radial terms ``r`` and the W tile ``w_tile`` (D x BLOCK_C, the operand dtype) the
    logits already hold in shared memory.

    Computed as (acc_j inv_j / d_j - w_j) d_j: the subtraction is a dot, diag(-1) @ W^T,
    chained into the accumulator (-1 and the operand-dtype W are exact in any dot dtype,
    the products exact, the sum float32), and the two scalings are per-row multiplies in
    place (2 rows per thread in this layout). Neither needs W as a float32 register tile
    next to the accumulator (most of the 1992 B the 64-class tiles spilled). A dot with
    diag(d) instead would round d to the operand dtype (bf16: 8 bits), or need three
    chained dots (d split in three bf16 parts), which Triton 3.9 compiles with the
    accumulator in two layouts and converts between them (31 KB of spills).

    A row with d_j = 0, or with |d_j| under the smallest normal float32 or so small that
    acc_j inv_j / d_j could overflow, takes d_j = 0 (grad_j = inv_j acc_j): its
    correction |d_j w_j| is then under 2^-126 ||w_j|| (absolute), or under 2^-126 ||w_j||
    times the row's largest entry of inv_j acc_j."""
    d = r * inv * inv
    amax = tl.max(tl.abs(acc), axis=1) * inv
    ad = tl.abs(d)
    use = (ad >= _TINY) & (amax * _TINY < ad)
    d_safe = tl.where(use, d, 1.0)
    acc = acc * tl.where(use, inv / d_safe, inv)[:, None]
    eye = tl.arange(0, BLOCK_C)[:, None] == tl.arange(0, BLOCK_C)[None, :]
    minus_one = tl.where(eye & use[:, None], -1.0, 0.0).to(OP_DTYPE).to(DOT_DTYPE)
    acc = tl.dot(minus_one, tl.trans(w_tile), acc, input_precision=PRECISION)
    return acc * d_safe[:, None]


__all__ = ["bwd_w_kernel"]
