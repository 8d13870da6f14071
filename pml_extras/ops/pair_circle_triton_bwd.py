"""Backward kernel of the pair Circle loss: grad x (row side) or grad y (column side).

Grid (held blocks, streamed splits, D groups). A program holds ``BLOCK_O`` rows of one
embedding set (batch rows x_i on the row side, reference rows y_j on the column side)
and walks the ``BLOCK_I``-row tiles of the other set in its split. Per step it recomputes
the similarity tile, always oriented (batch rows, reference rows) so that the per-row
vectors (lse, g, labels) cost a few registers per thread, and the softmax weight of each
pair within its set times dz/ds, w_ij; then

    row side:     acc[i, :] += sum_j w_ij y_j            (``tl.dot(w, y tile)``)
    column side:  acc[j, :] += sum_i g_i w_ij x_i        (``tl.dot(trans(g w), x tile)``)

The row side leaves out g (a per-row factor, applied afterwards); on the column side G is
scaled into [-1, 1] before the rounding to the operand dtype.

Resident (``RESIDENT``: all of D in one group, ``D_GROUP >= D``): the held block is
loaded once per program (Triton keeps it in shared memory) and each streamed tile once,
for both of the step's dots (s, then the accumulation). With ``TMA`` (16-bit operands
whose rows are 16-byte aligned) both come in by tensor-memory-accelerator copies from
host-made descriptors ``AD`` (held) / ``BD`` (streamed): no per-element addresses or
masks in registers, which is what lets 64 x 64 steps with a 64 x 512 float32 accumulator
fit in 255 registers (ptxas, sm_90a). Otherwise (D groups) s comes from the K-loop over
all of D and the streamed tile's D-group slice is loaded for the second dot.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pair_circle_triton_tiles import circle_logits, load_rows, set_weights, similarity_kloop


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
    # Tile sizes of the (batch rows, reference rows) orientation.
    BLOCK_R: tl.constexpr = BLOCK_I if COLUMN_SIDE else BLOCK_O
    BLOCK_C: tl.constexpr = BLOCK_O if COLUMN_SIDE else BLOCK_I
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
        lse_p = tl.load(LSE_P + outer, mask=outer_ok, other=0.0)[:, None]
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
            if COLUMN_SIDE:
                s = tl.dot(b, tl.trans(a), input_precision=PRECISION)
            else:
                s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
        else:
            s = similarity_kloop(
                X,
                Y,
                rows,
                row_ok,
                cols,
                col_ok,
                D,
                stride_x,
                stride_y,
                DOT_DTYPE,
                PRECISION,
                BLOCK_R,
                BLOCK_C,
                BLOCK_D,
            )
            b = load_rows(Bm, inner, inner_ok, stride_b, dg, dg_ok).to(DOT_DTYPE)
        # (pos, neg) of the (rows, cols) tile; both False outside the B x N range.
        inside = row_ok[:, None] & col_ok[None, :]
        if MODE == 0:
            if COLUMN_SIDE:
                lab = tl.load(LAB + inner, mask=inner_ok, other=0)[:, None]
                ref = tl.load(REF + outer, mask=outer_ok, other=0)[None, :]
            else:
                lab = lab_o[:, None]
                ref = tl.load(REF + inner, mask=inner_ok, other=0)[None, :]
            pos = (lab == ref) & inside
            neg = (lab != ref) & inside
            if SELF:
                pos = pos & (rows[:, None] != cols[None, :])
        else:
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            pos = tl.load(POS + offs, mask=inside, other=0) != 0
            neg = tl.load(NEG + offs, mask=inside, other=0) != 0
        z, dz = circle_logits(s, pos, m, gamma)
        if COLUMN_SIDE:
            lse_p = tl.load(LSE_P + inner, mask=inner_ok, other=0.0)[:, None]
            lse_n = tl.load(LSE_N + inner, mask=inner_ok, other=0.0)[:, None]
        w = set_weights(z, dz, pos, neg, lse_p, lse_n)
        if COLUMN_SIDE:
            w = w * tl.load(G + inner, mask=inner_ok, other=0.0)[:, None]
        # Rounded to the operand dtype as flash attention rounds its probabilities.
        w = w.to(X.dtype.element_ty).to(DOT_DTYPE)
        if COLUMN_SIDE:
            w = tl.trans(w)
        acc = tl.dot(w, b, acc, input_precision=PRECISION)
    out = (pid_s * n_outer + outer).to(tl.int64)[:, None] * D + dg[None, :]
    tl.store(GRAD + out, acc, mask=outer_ok[:, None] & dg_ok[None, :])
