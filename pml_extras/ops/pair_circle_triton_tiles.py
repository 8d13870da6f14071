"""Tile-level pieces of the pair Circle kernels (``pair_circle_triton_fwd`` / ``_bwd``).

Every kernel walks tiles of pairs in one orientation: an *outer* block of ``BLOCK_O`` rows
of one embedding set, held for the whole program, against *inner* tiles of ``BLOCK_I``
rows of the other set that stream by. The similarity tile is s[o, i] = <a_o, b_i>. On
the forward and the row side of the backward the outer rows are the batch rows x_i and
the inner ones the reference rows y_j; on the column side of the backward it is the
other way round (outer y_j, inner x_i), so s is the transposed tile. ``COLUMN_SIDE``
says which, and the helpers below index labels, masks and per-row vectors accordingly.

Two ways to get s:

* resident (``RESIDENT``, D fits one tile): the outer block (BLOCK_O, D) is loaded once
  per program and each inner tile (BLOCK_I, D) once per step, and s is one ``tl.dot``
  over all of D; the backward reuses the same inner tile for its second dot.
* K-loop (larger D): both tiles are reloaded ``BLOCK_D`` columns at a time
  (:func:`similarity_kloop`), as the v1 kernels did for every D.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(P, idx, ok, stride, dk, d_ok):
    """(len(idx), len(dk)) tile of rows ``idx`` of P (unit stride along D), 0 outside."""
    return tl.load(
        P + idx.to(tl.int64)[:, None] * stride + dk[None, :],
        mask=ok[:, None] & d_ok[None, :],
        other=0.0,
    )


@triton.jit
def similarity_kloop(
    A,
    Bm,
    outer,
    outer_ok,
    inner,
    inner_ok,
    D,
    stride_a,
    stride_b,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_O, BLOCK_I) float32 tile of <a_o, b_i>, both tiles reloaded BLOCK_D columns
    at a time (the path for D too large to keep the outer block resident)."""
    s = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        d_ok = dk < D
        ak = load_rows(A, outer, outer_ok, stride_a, dk, d_ok)
        bk = load_rows(Bm, inner, inner_ok, stride_b, dk, d_ok)
        s = tl.dot(ak.to(DOT_DTYPE), tl.trans(bk.to(DOT_DTYPE)), s, input_precision=PRECISION)
    return s


@triton.jit
def side_vector(P, outer, outer_ok, inner, inner_ok, other, COLUMN_SIDE: tl.constexpr):
    """A per-batch-row vector (lse, g) broadcast over a tile: (BLOCK_O, 1) on the row side
    (batch rows are outer), (1, BLOCK_I) on the column side (batch rows are inner)."""
    if COLUMN_SIDE:
        return tl.load(P + inner, mask=inner_ok, other=other)[None, :]
    else:
        return tl.load(P + outer, mask=outer_ok, other=other)[:, None]


@triton.jit
def pair_masks(
    LAB,
    REF,
    POS,
    NEG,
    outer,
    outer_ok,
    inner,
    inner_ok,
    N,
    SELF: tl.constexpr,
    MODE: tl.constexpr,
    COLUMN_SIDE: tl.constexpr,
):
    """(pos, neg) boolean (BLOCK_O, BLOCK_I) tiles; both False outside the B x N range."""
    inside = outer_ok[:, None] & inner_ok[None, :]
    if COLUMN_SIDE:
        rows = inner[None, :]
        cols = outer[:, None]
    else:
        rows = outer[:, None]
        cols = inner[None, :]
    if MODE == 0:
        lab = side_vector(LAB, outer, outer_ok, inner, inner_ok, 0, COLUMN_SIDE)
        if COLUMN_SIDE:
            ref = tl.load(REF + outer, mask=outer_ok, other=0)[:, None]
        else:
            ref = tl.load(REF + inner, mask=inner_ok, other=0)[None, :]
        pos = (lab == ref) & inside
        neg = (lab != ref) & inside
        if SELF:
            pos = pos & (rows != cols)
    else:
        offs = rows.to(tl.int64) * N + cols
        pos = tl.load(POS + offs, mask=inside, other=0) != 0
        neg = tl.load(NEG + offs, mask=inside, other=0) != 0
    return pos, neg


@triton.jit
def circle_logits(s, pos, m, gamma):
    """(z, dz/ds) with the [.]_+ weight detached; one form for both sets (see pair_circle)."""
    u = tl.where(pos, 1.0 - s, s)
    weight = tl.maximum(u + m, 0.0) * gamma
    z = weight * (u - m)
    return z, tl.where(pos, -weight, weight)


@triton.jit
def set_weights(z, dz, pos, neg, lse_p, lse_n):
    """exp(z - lse) of each pair within its own set, times dz; 0 for pairs in neither.

    A pair in a set implies the set is non-empty, so its lse is finite and z <= lse. One
    exp per pair: the set's lse is selected before the exp, not the exp after."""
    w = tl.exp(z - tl.where(pos, lse_p, lse_n))
    return tl.where(pos | neg, w * dz, 0.0)
