"""The Triton kernels of the hybrid class logsumexp (:mod:`.class_lse_hybrid`): the two
epilogues over a chunk's float32 raw dot products and the radial projection of the
chunk's grad W columns. Elementwise and reductions only (no ``tl.dot``): the matmuls
are the library's.

Imports only :mod:`.class_lse_triton_tiles` (the transforms, shared with the fused
kernels so that both compute g and g' alike) and Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .class_lse_triton_tiles import NEG_BIG, transform

# Tiles (cost_model.hybrid_class_kernels assumes these grids). The forward epilogue
# reduces whole rows, so its grid is the row blocks alone: 2-row blocks give 512
# programs at B = 1024 (one wave of an H100 at 4 per SM). The backward epilogue is
# elementwise: a 2-D grid of 16 x 128 tiles. The radial kernel owns 16 columns of the
# chunk (512 programs per 8192-class chunk) and walks D twice (the radial sum, then the
# write).
FWD_BLOCK_M, FWD_BLOCK_N = 2, 512
BWD_BLOCK_M, BWD_BLOCK_N = 16, 128
RADIAL_BLOCK_D, RADIAL_BLOCK_N = 64, 16


@triton.jit
def _cosine_tile(RAW, RX, INV, TGT, RP, rows, cols, B, N, start, p0, p1, KIND: tl.constexpr):
    """(z, dz, keep, inside, offsets, rx, inv) of one (rows x cols) tile of the chunk's
    raw dot products: c = clamp(raw / (||x|| ||w||), -1, 1), z = g(c), dz = g'(c); keep
    is False at the target column and outside the chunk."""
    row_ok = rows < B
    col_ok = cols < N
    inside = row_ok[:, None] & col_ok[None, :]
    rx = tl.load(RX + rows, mask=row_ok, other=0.0)
    rp = tl.load(RP + rows, mask=row_ok, other=0.0)
    local = tl.load(TGT + rows, mask=row_ok, other=-1) - start
    inv = tl.load(INV + cols, mask=col_ok, other=0.0)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    raw = tl.load(RAW + offs, mask=inside, other=0.0)
    # The torch path's order: (raw * 1/||x||) * 1/||w||, then the clamp.
    c = tl.minimum(tl.maximum(raw * rx[:, None] * inv[None, :], -1.0), 1.0)
    z, dz = transform(c, rp, p0, p1, KIND)
    keep = inside & (cols[None, :] != local[:, None])
    return z, dz, keep, inside, offs, rx, inv


@triton.jit
def fwd_epilogue_kernel(
    RAW, RX, INV, TGT, RP, M_RUN, L_RUN, P1, B, N, start, p0, p1_value,
    KIND: tl.constexpr, P1_PTR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Folds one chunk into the running (max, sum exp(z - max)) of each row, in place:
    the chunk's (m_c, l_c) over its non-target columns, then
    M, L <- max(M, m_c), L exp(M - max) + l_c exp(m_c - max). ``INV`` points at the
    chunk's first inverse norm; rows of RAW have stride N."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    if P1_PTR:  # a 0-d tensor (CurricularFace's t): read on the device, no sync
        p1 = tl.load(P1)
    else:
        p1 = p1_value
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        z, _, keep, _, _, _, _ = _cosine_tile(
            RAW, RX, INV, TGT, RP, rows, cols, B, N, start, p0, p1, KIND
        )
        z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    m_run = tl.load(M_RUN + rows, mask=row_ok, other=0.0)
    l_run = tl.load(L_RUN + rows, mask=row_ok, other=0.0)
    m_new = tl.maximum(m_run, m_i)
    l_new = l_run * tl.exp(m_run - m_new) + l_i * tl.exp(m_i - m_new)
    tl.store(M_RUN + rows, m_new, mask=row_ok)
    tl.store(L_RUN + rows, l_new, mask=row_ok)


@triton.jit
def bwd_epilogue_kernel(
    RAW, RX, INV, TGT, RP, LSE, GLSE, GX, GW, P1, B, N, start, p0, p1_value,
    KIND: tl.constexpr, P1_PTR: tl.constexpr, OUT_DTYPE: tl.constexpr,
    G_ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M x BLOCK_N) tile of G_ij = exp(z_ij - lse_i) g'(c_ij) grad_lse_i (0 at
    the target and padding columns), written as the two gradient matmuls' operands,
    rounded to ``OUT_DTYPE``: GX = G / ||w_j|| (for grad x_hat = GX W^T: the column
    scale on G's side, so no normalised copy of W is built) and GW = G / ||x_i|| (for
    grad w_hat = x^T GW). ``G_ONLY`` (float16 operands): G itself, float32, over RAW, for
    the PyTorch path's scaled rounding."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    if P1_PTR:
        p1 = tl.load(P1)
    else:
        p1 = p1_value
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    glse = tl.load(GLSE + rows, mask=row_ok, other=0.0)
    z, dz, keep, inside, offs, rx, inv = _cosine_tile(
        RAW, RX, INV, TGT, RP, rows, cols, B, N, start, p0, p1, KIND
    )
    g = tl.where(keep, tl.exp(z - lse[:, None]) * dz * glse[:, None], 0.0)
    if G_ONLY:
        tl.store(RAW + offs, g, mask=inside)
    else:
        tl.store(GX + offs, (g * inv[None, :]).to(OUT_DTYPE), mask=inside)
        tl.store(GW + offs, (g * rx[:, None]).to(OUT_DTYPE), mask=inside)


@triton.jit
def radial_kernel(
    GWH, W, INV, OUT, D, N, stride_wd, stride_wc, stride_od, stride_oc,
    OP_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """grad_w[:, c] = (gwh[:, c] - w_hat[:, c] r_c) / ||w_c||, r_c = sum_d gwh[d, c]
    w_hat[d, c], w_hat = round(W)[:, c] / ||w_c|| (the normalisation's backward), for
    RADIAL_BLOCK_N of the chunk's columns: GWH is the (D, N) float32 grad w_hat (row stride N), W
    and OUT the chunk's views of W and grad W (OUT in W's dtype)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    inv = tl.load(INV + cols, mask=col_ok, other=0.0)
    r = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        ok = (dk < D)[:, None] & col_ok[None, :]
        w = tl.load(W + dk.to(tl.int64)[:, None] * stride_wd + cols[None, :] * stride_wc,
                    mask=ok, other=0.0)  # fmt: skip
        w_hat = w.to(OP_DTYPE).to(tl.float32) * inv[None, :]
        gwh = tl.load(GWH + dk.to(tl.int64)[:, None] * N + cols[None, :], mask=ok, other=0.0)
        r += tl.sum(gwh * w_hat, axis=0)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        ok = (dk < D)[:, None] & col_ok[None, :]
        w = tl.load(W + dk.to(tl.int64)[:, None] * stride_wd + cols[None, :] * stride_wc,
                    mask=ok, other=0.0)  # fmt: skip
        w_hat = w.to(OP_DTYPE).to(tl.float32) * inv[None, :]
        gwh = tl.load(GWH + dk.to(tl.int64)[:, None] * N + cols[None, :], mask=ok, other=0.0)
        out = (gwh - w_hat * r[None, :]) * inv[None, :]
        dst = OUT + dk.to(tl.int64)[:, None] * stride_od + cols[None, :] * stride_oc
        tl.store(dst, out.to(OUT.dtype.element_ty), mask=ok)


__all__ = [
    "BWD_BLOCK_M",
    "BWD_BLOCK_N",
    "FWD_BLOCK_M",
    "FWD_BLOCK_N",
    "RADIAL_BLOCK_D",
    "RADIAL_BLOCK_N",
    "bwd_epilogue_kernel",
    "fwd_epilogue_kernel",
    "radial_kernel",
]
