"""Forward kernel of the pair Circle loss: per batch row, the two online logsumexps.

Grid (row blocks, column splits). Each program holds ``BLOCK_M`` batch rows (resident:
loaded once, see ``pair_circle_triton_tiles``) and walks the ``BLOCK_N``-row reference
tiles of its split: similarities by ``tl.dot`` (float32 accumulator), masks, logits and
two online logsumexps (positives, negatives). Per-split (max, sum) partials go to OUT
(4, splits, B) and are combined in PyTorch (``pair_circle_triton._combine``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pair_circle_triton_tiles import circle_logits, load_rows, pair_masks, similarity_kloop

_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _fwd_kernel(
    X,
    Y,
    LAB,
    REF,
    POS,
    NEG,
    OUT,
    B,
    N,
    D,
    stride_x,
    stride_y,
    m,
    gamma,
    tiles_per_split,
    SELF: tl.constexpr,
    MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    if RESIDENT:  # BLOCK_D covers D: the row block is loaded once, for every tile
        dk = tl.arange(0, BLOCK_D)
        d_ok = dk < D
        xa = load_rows(X, rows, row_ok, stride_x, dk, d_ok).to(DOT_DTYPE)
    max_p = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    max_n = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    sum_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_n = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for t in range(t_start, t_end):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if RESIDENT:
            yb = load_rows(Y, cols, col_ok, stride_y, dk, d_ok).to(DOT_DTYPE)
            s = tl.dot(xa, tl.trans(yb), input_precision=PRECISION)
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
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
        pos, neg = pair_masks(LAB, REF, POS, NEG, rows, row_ok, cols, col_ok, N, SELF, MODE, False)
        z, _ = circle_logits(s, pos, m, gamma)
        zp = tl.where(pos, z, float("-inf"))
        zn = tl.where(neg, z, float("-inf"))
        new_p = tl.maximum(max_p, tl.max(zp, axis=1))
        new_n = tl.maximum(max_n, tl.max(zn, axis=1))
        sum_p = sum_p * tl.exp(max_p - new_p) + tl.sum(tl.exp(zp - new_p[:, None]), axis=1)
        sum_n = sum_n * tl.exp(max_n - new_n) + tl.sum(tl.exp(zn - new_n[:, None]), axis=1)
        max_p = new_p
        max_n = new_n
    # OUT is (4, splits, B): max_p, sum_p, max_n, sum_n.
    out = pid_s * B + rows
    plane = n_split * B
    tl.store(OUT + out, max_p, mask=row_ok)
    tl.store(OUT + plane + out, sum_p, mask=row_ok)
    tl.store(OUT + 2 * plane + out, max_n, mask=row_ok)
    tl.store(OUT + 3 * plane + out, sum_n, mask=row_ok)
