"""Backward kernel of the pair Circle loss: grad x (row side) or grad y (column side).

Grid (outer blocks, inner splits, D groups). A program holds ``BLOCK_O`` outer rows (batch
rows on the row side, reference rows on the column side; see ``pair_circle_triton_tiles``
for the orientation) and walks the ``BLOCK_I``-row inner tiles of its split. Per step it
recomputes the similarity tile, the softmax weight of each pair within its set times
dz/ds, w[o, i], and accumulates

    acc[o, :] += sum_i w[o, i] * b_i        (one ``tl.dot``: w (O x I) @ b (I x D))

which is sum_j w_ij dz_ij y_j for grad x_i (row side; the per-row factor g_i multiplies
the result afterwards) and sum_i g_i w_ij dz_ij x_i for grad y_j (column side; G is
scaled into [-1, 1]). Both sides are the same loop with the roles of x and y swapped.

Resident (``RESIDENT``: all of D in one group): the outer block is loaded once and each
inner tile once, for both of the step's dots (s = a b^T, then acc += w b). Otherwise
(D groups): s by the K-loop over all of D, then the inner tile's D-group slice for the
second dot.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pair_circle_triton_tiles import (
    circle_logits,
    load_rows,
    pair_masks,
    set_weights,
    side_vector,
    similarity_kloop,
)


@triton.jit
def _bwd_kernel(
    X,
    Y,
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
):
    """Float32 per-split partials GRAD (splits, B or N, D) of the gradient of
    sum_i g_i (lse_p_i + lse_n_i); BLOCK_M / BLOCK_N are the batch / reference tile sizes
    (outer / inner on the row side, inner / outer on the column side)."""
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_g = tl.program_id(2)
    if COLUMN_SIDE:  # outer: reference rows y, inner: batch rows x
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
    if RESIDENT:  # D_GROUP covers D: the outer block is loaded once, for every tile
        a = load_rows(A, outer, outer_ok, stride_a, dg, dg_ok).to(DOT_DTYPE)
    if not COLUMN_SIDE:  # the batch rows are fixed: their lse once per program
        lse_p = side_vector(LSE_P, outer, outer_ok, outer, outer_ok, 0.0, False)
        lse_n = side_vector(LSE_N, outer, outer_ok, outer, outer_ok, 0.0, False)
    acc = tl.zeros([BLOCK_O, D_GROUP], dtype=tl.float32)
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(n_inner, BLOCK_I))
    for t in tl.range(t_start, t_end, disable_licm=True):
        inner = t * BLOCK_I + tl.arange(0, BLOCK_I)
        inner_ok = inner < n_inner
        if RESIDENT:
            b = load_rows(Bm, inner, inner_ok, stride_b, dg, dg_ok).to(DOT_DTYPE)
            s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
        else:
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
        pos, neg = pair_masks(
            LAB, REF, POS, NEG, outer, outer_ok, inner, inner_ok, N, SELF, MODE, COLUMN_SIDE
        )
        z, dz = circle_logits(s, pos, m, gamma)
        if COLUMN_SIDE:
            lse_p = side_vector(LSE_P, outer, outer_ok, inner, inner_ok, 0.0, True)
            lse_n = side_vector(LSE_N, outer, outer_ok, inner, inner_ok, 0.0, True)
        w = set_weights(z, dz, pos, neg, lse_p, lse_n)
        if COLUMN_SIDE:
            w = w * side_vector(G, outer, outer_ok, inner, inner_ok, 0.0, True)
        # Rounded to the operand dtype as flash attention rounds its probabilities.
        w = w.to(Bm.dtype.element_ty).to(DOT_DTYPE)
        acc = tl.dot(w, b, acc, input_precision=PRECISION)
    out = (pid_s * n_outer + outer).to(tl.int64)[:, None] * D + dg[None, :]
    tl.store(GRAD + out, acc, mask=outer_ok[:, None] & dg_ok[None, :])
