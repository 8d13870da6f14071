"""Backward kernel of the pair Circle loss: grad x (row side) or grad y (column side).

Grid (held blocks, streamed splits, D groups). A program holds ``BLOCK_O`` rows of one
embedding set (batch rows x_i on the row side, reference rows y_j on the column side)
and walks the ``BLOCK_I``-row tiles of the other set in its split. Per step it recomputes
the similarity tile and the softmax weight of each pair within its set times dz/ds,
w_ij; then

    row side:     acc[i, :] += sum_j w_ij y_j            (``tl.dot(w, y tile)``)
    column side:  acc[j, :] += sum_i g_i w_ij x_i        (``tl.dot((g w)^T, x tile)``)

The row side leaves out g (a per-row factor, applied afterwards); on the column side G is
scaled into [-1, 1] before the rounding to the operand dtype.

Resident (``RESIDENT``: all of D in one group, ``D_GROUP >= D``): the held block is
loaded once per program (Triton keeps it in shared memory) and each streamed tile once,
for both of the step's dots (s, then the accumulation). With ``TMA`` (rows that are
16-byte multiples on a Hopper GPU, or the interpreter) both come in by
tensor-memory-accelerator copies from host-made descriptors ``AD`` (held) / ``BD``
(streamed): no per-element addresses or masks in registers, which is what lets 64 x 64
steps next to a 64 x 512 float32 accumulator fit in 255 registers (ptxas, sm_90a), and
the tile is oriented (batch rows, reference rows) on both sides, so that the per-row
vectors (lse, g, labels) take a few registers per thread. Otherwise (pointer loads,
32-row streamed tiles) the column side keeps its held reference rows on the tile's
first axis, and with D groups s comes from the K-loop over all of D and the streamed
tile's D-group slice is loaded for the second dot. Every bf16 variant compiles without
spills for sm_90a (tests/gpu/test_sm90_spills.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pair_circle_triton_tiles import circle_logits, load_rows, set_weights, similarity_kloop


@triton.jit
def _along(v, ROWS_M: tl.constexpr, IS_ROWS: tl.constexpr):
    """A vector over the tile's batch rows (IS_ROWS) or reference rows, broadcast along
    the tile's M axis (``[:, None]``) or N axis (``[None, :]``)."""
    if IS_ROWS == ROWS_M:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _bwd_kernel(
    X,
    Y,
    AD,
    BD,
    LAB,
    REF,
    POS,
    NEG,
    LSE_P,
    LSE_N,
    G,
    GRAD,
    B,
    N,
    D,
    stride_x,
    stride_y,
    m,
    gamma,
    tiles_per_split,
    COLUMN_SIDE: tl.constexpr,
    SELF: tl.constexpr,
    MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_GROUP: tl.constexpr,
    RESIDENT: tl.constexpr,
    TMA: tl.constexpr,
):
    """Float32 per-split partials GRAD (splits, B or N, D) of the gradient of
    sum_i g_i (lse_p_i + lse_n_i) with respect to x (row side) or y (column side)."""
    # Whether the tile's first (M) axis is the batch rows. With TMA both sides do so;
    # the column side with pointer loads keeps its held reference rows on M instead (its
    # streamed batch rows then sit on N and cost a register each per column, but the
    # rows-on-M form spills 516 B there: its s dot would have 32 rows, no wgmma).
    ROWS_M: tl.constexpr = TMA or not COLUMN_SIDE
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_g = tl.program_id(2)
    if COLUMN_SIDE:  # held: reference rows y_j; streamed: batch rows x_i
        A = Y
        Bm = X
        stride_a = stride_y
        stride_b = stride_x
        n_outer = N
        n_inner = B
    else:
        A = X
        Bm = Y
        stride_a = stride_x
        stride_b = stride_y
        n_outer = B
        n_inner = N
    outer = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    outer_ok = outer < n_outer
    dg = pid_g * D_GROUP + tl.arange(0, D_GROUP)
    dg_ok = dg < D
    if RESIDENT:
        if TMA:
            a = AD.load([pid_o * BLOCK_O, 0]).to(DOT_DTYPE)
        else:
            a = load_rows(A, outer, outer_ok, stride_a, dg, dg_ok).to(DOT_DTYPE)
    # Row side: the held rows' labels and lse, once per program. (The column side reloads
    # its held labels per step: kept live across the loop they cost 132 spill bytes.)
    if not COLUMN_SIDE:
        if MODE == 0:
            lab_o = tl.load(LAB + outer, mask=outer_ok, other=0)
        lse_p = tl.load(LSE_P + outer, mask=outer_ok, other=0.0)[:, None]  # rows on M
        lse_n = tl.load(LSE_N + outer, mask=outer_ok, other=0.0)[:, None]
    acc = tl.zeros([BLOCK_O, D_GROUP], dtype=tl.float32)
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(n_inner, BLOCK_I))
    # disable_licm: hoisted (tile, D)-sized address and mask tensors would stay live
    # across the loop and spill (ptxas, sm_90a, D = 512).
    for t in tl.range(t_start, t_end, disable_licm=True):
        inner = t * BLOCK_I + tl.arange(0, BLOCK_I)
        inner_ok = inner < n_inner
        if COLUMN_SIDE:
            rows = inner
            row_ok = inner_ok
            cols = outer
            col_ok = outer_ok
        else:
            rows = outer
            row_ok = outer_ok
            cols = inner
            col_ok = inner_ok
        if RESIDENT:
            if TMA:
                b = BD.load([t * BLOCK_I, 0]).to(DOT_DTYPE)
            else:
                b = load_rows(Bm, inner, inner_ok, stride_b, dg, dg_ok).to(DOT_DTYPE)
            if COLUMN_SIDE and ROWS_M:
                s = tl.dot(b, tl.trans(a), input_precision=PRECISION)
            else:
                s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
        else:  # (held, streamed): never TMA, so ROWS_M is "not COLUMN_SIDE" here
            s = similarity_kloop(
                A,
                Bm,
                outer,
                outer_ok,
                inner,
                inner_ok,
                D,
                stride_a,
                stride_b,
                DOT_DTYPE,
                PRECISION,
                BLOCK_O,
                BLOCK_I,
                BLOCK_D,
            )
            b = load_rows(Bm, inner, inner_ok, stride_b, dg, dg_ok).to(DOT_DTYPE)
        # (pos, neg) of the tile; both False outside the B x N range.
        inside = _along(row_ok, ROWS_M, True) & _along(col_ok, ROWS_M, False)
        if MODE == 0:
            if COLUMN_SIDE:
                lab = tl.load(LAB + inner, mask=inner_ok, other=0)
                ref = tl.load(REF + outer, mask=outer_ok, other=0)
            else:
                lab = lab_o
                ref = tl.load(REF + inner, mask=inner_ok, other=0)
            lab = _along(lab, ROWS_M, True)
            ref = _along(ref, ROWS_M, False)
            pos = (lab == ref) & inside
            neg = (lab != ref) & inside
            if SELF:
                pos = pos & (_along(rows, ROWS_M, True) != _along(cols, ROWS_M, False))
        else:
            offs = _along(rows.to(tl.int64), ROWS_M, True) * N + _along(cols, ROWS_M, False)
            pos = tl.load(POS + offs, mask=inside, other=0) != 0
            neg = tl.load(NEG + offs, mask=inside, other=0) != 0
        z, dz = circle_logits(s, pos, m, gamma)
        if COLUMN_SIDE:
            lse_p = _along(tl.load(LSE_P + inner, mask=inner_ok, other=0.0), ROWS_M, True)
            lse_n = _along(tl.load(LSE_N + inner, mask=inner_ok, other=0.0), ROWS_M, True)
        w = set_weights(z, dz, pos, neg, lse_p, lse_n)
        if COLUMN_SIDE:
            w = w * _along(tl.load(G + inner, mask=inner_ok, other=0.0), ROWS_M, True)
        # Rounded to the operand dtype as flash attention rounds its probabilities.
        w = w.to(X.dtype.element_ty).to(DOT_DTYPE)
        if COLUMN_SIDE and ROWS_M:  # (rows, cols) -> (held cols, streamed rows)
            w = tl.trans(w)
        acc = tl.dot(w, b, acc, input_precision=PRECISION)
    out = (pid_s * n_outer + outer).to(tl.int64)[:, None] * D + dg[None, :]
    tl.store(GRAD + out, acc, mask=outer_ok[:, None] & dg_ok[None, :])
