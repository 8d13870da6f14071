"""The class forward kernel: per-(split, row) logsumexp partials and u = d lse / d x_hat.

Grid (row blocks, class splits, D groups). A program takes a BLOCK_M-row block of x and
walks the BLOCK_C-class tiles of its split:

    s   = x_blk @ W_tile                      (BLOCK_M x BLOCK_C, float32 accumulation)
    c   = clamp(s / ||x|| / ||w||, -1, 1),  (z, dz) = g(c), target / padding -> -inf
    online max m and sum-exp l (flash style)
    u  += softmax * dz @ w_hat^T              (only with NEED_U: training)

``RESIDENT`` (all of D in one group, the production case; ``BlockConfig.fwd_resident``
turns it off for training): the x block is loaded once per
program and each W tile once, feeding both dots: the logits read it as ``W_tile``, u's
dot as its transpose. For that the normalisation 1/||w|| goes on the softmax side
(``P_SIDE``: P_ij = e_ij dz_ij / ||w_j||, then P @ W^T) instead of scaling a second copy
of the tile. Float16 keeps the W side (w_hat = W / ||w|| in [-1, 1]: P / ||w|| could pass
fp16's 65504 for a near-zero proxy); bfloat16 and float32 have float32's range.

Otherwise the logits are a K-loop over D (:func:`~.class_lse_triton_tiles.logits_k_loop`,
reloading the x block per class tile; each D-slice program recomputes them when D is
split) and u's dot loads its slice of the W tile again, scaled on the W side.

Since grad_lse_i only scales row i, the backward's grad x is grad_lse[:, None] * u: no
second pass over W for x (see :mod:`.class_lse_triton`). Imports only the tile helpers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .class_lse_triton_tiles import NEG_BIG, logits_k_loop, transform


@triton.jit
def online_step(
    z,
    dz,
    keep,
    m_i,
    l_i,
    inv,
    OP_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    P_SIDE: tl.constexpr,
):
    """One class tile of the online logsumexp: (new running max, new sum-exp, the factor
    alpha that rescales earlier sums, u's dot operand P = e * dz/dc, times 1/||w|| when
    ``P_SIDE``, rounded to the operand dtype). Masked columns (``keep`` False) add 0."""
    z = tl.where(keep, z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    alpha = tl.exp(m_i - m_new)
    e = tl.exp(z - m_new[:, None])
    l_i = l_i * alpha + tl.sum(e, axis=1)
    # Softmax weight times dz/dc (at most ~2 * p0). The clamp bounds the value only (no
    # gradient mask: see class_common.add_target_grad).
    pw = e * dz
    if P_SIDE:
        pw = pw * inv[None, :]
    return m_new, l_i, alpha, pw.to(OP_DTYPE).to(DOT_DTYPE)  # fmt: skip


@triton.jit
def fwd_kernel(
    X,
    W,
    INV,
    RX,
    TGT,
    RP,
    P1,
    M_OUT,
    L_OUT,
    U_OUT,
    B,
    D,
    C,
    stride_xb,
    stride_xd,
    stride_wd,
    stride_wc,
    p0,
    p1_value,
    tiles_per_split,
    KIND: tl.constexpr,
    P1_PTR: tl.constexpr,
    NEED_U: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_GROUP: tl.constexpr,
    RESIDENT: tl.constexpr,
    P_SIDE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_g = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    rp = tl.load(RP + rows, mask=row_ok, other=0.0)
    rx = tl.load(RX + rows, mask=row_ok, other=0.0)
    if P1_PTR:
        p1 = tl.load(P1)
    else:
        p1 = p1_value
    # This program's slice of D for u (all of D unless D > D_GROUP).
    dg = pid_g * D_GROUP + tl.arange(0, D_GROUP)
    dg_ok = dg < D
    if RESIDENT:
        # Loaded once: every class tile of the split multiplies the same x block.
        x_blk = tl.load(
            X + rows.to(tl.int64)[:, None] * stride_xb + dg[None, :] * stride_xd,
            mask=row_ok[:, None] & dg_ok[None, :],
            other=0.0,
        )
        x_blk = x_blk.to(OP_DTYPE).to(DOT_DTYPE)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NEED_U:
        u_acc = tl.zeros([BLOCK_M, D_GROUP], dtype=tl.float32)

    n_tiles = tl.cdiv(C, BLOCK_C)
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        cols = t * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        inv = tl.load(INV + cols, mask=col_ok, other=0.0)
        w_cols = W + cols.to(tl.int64)[None, :] * stride_wc
        if RESIDENT:
            # One load of the tile (rounded to the operand dtype: W may be stored wider)
            # for both dots.
            w_tile = tl.load(
                w_cols + dg.to(tl.int64)[:, None] * stride_wd,
                mask=dg_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            w_tile = w_tile.to(OP_DTYPE).to(DOT_DTYPE)
            s = tl.dot(x_blk, w_tile, input_precision=PRECISION)
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
        keep = col_ok[None, :] & (cols[None, :] != tgt[:, None])
        # The elementwise work sits in a branch of its own for Triton 3.9's sake (as in
        # the backward): a dot whose result feeds another dot in the same region gets all
        # its warps along M, so a 64-row logits tile would be computed whole by both
        # warpgroups (and the resident forward spilled 232 B). Behind the branch the
        # logits dot splits its columns over the warpgroups and nothing spills. The
        # branch is exact: with p0 = 0 every transform gives z = 0 and dz/dc = 0, which
        # is what the else branch feeds the same online step.
        if p0 != 0.0:
            # Both normalisations outside the dot, on its float32 result.
            c = tl.minimum(tl.maximum(s * rx[:, None] * inv[None, :], -1.0), 1.0)
            z, dz = transform(c, rp, p0, p1, KIND)
            m_new, l_i, alpha, pw = online_step(
                z, dz, keep, m_i, l_i, inv, OP_DTYPE, DOT_DTYPE, P_SIDE
            )
        else:
            # p0 = 0: z = 0 on every kept column, and P = e * dz/dc = 0.
            zero = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            m_new, l_i, alpha, _ = online_step(
                zero, zero, keep, m_i, l_i, inv, OP_DTYPE, DOT_DTYPE, P_SIDE
            )
            pw = tl.zeros([BLOCK_M, BLOCK_C], dtype=DOT_DTYPE)
        if NEED_U:
            u_acc = u_acc * alpha[:, None]
            if P_SIDE:
                # 1/||w|| is in pw: u's dot reads the tile the logits read.
                u_acc = tl.dot(pw, tl.trans(w_tile), u_acc, input_precision=PRECISION)
            else:
                # 1/||w|| on the W side, so w_hat's entries lie in [-1, 1]: a near-zero
                # proxy's huge 1/||w|| never meets a 16-bit operand (float16).
                w_hat = tl.load(
                    w_cols + dg.to(tl.int64)[:, None] * stride_wd,
                    mask=dg_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                w_hat = w_hat.to(OP_DTYPE).to(tl.float32) * inv[None, :]
                w_hat = w_hat.to(OP_DTYPE).to(DOT_DTYPE)
                u_acc = tl.dot(pw, tl.trans(w_hat), u_acc, input_precision=PRECISION)
        m_i = m_new

    out = pid_s * B + rows
    if pid_g == 0:
        tl.store(M_OUT + out, m_i, mask=row_ok)
        tl.store(L_OUT + out, l_i, mask=row_ok)
    if NEED_U:
        tl.store(
            U_OUT + out.to(tl.int64)[:, None] * D + dg[None, :],
            u_acc,
            mask=row_ok[:, None] & dg_ok[None, :],
        )


__all__ = ["fwd_kernel", "online_step"]
