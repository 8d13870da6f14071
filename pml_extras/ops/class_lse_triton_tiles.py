"""Device helpers shared by the class kernels (:mod:`class_lse_triton_fwd`,
:mod:`class_lse_triton_bwd`): the transforms z = g(c) with dz/dc, the K-loop logits of a
(rows x classes) tile when D is split over programs, and the inverse norms of W.

Imports only the leaf :mod:`~pml_extras.ops.precision` (and Triton).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .precision import EPS as _EPS

# The KIND branches of _transform; class_lse_triton checks them against class_common.KINDS.
KIND_IDS = {"circle": 0, "curricular": 1, "scaled": 2}
# Finite "minus infinity" for the running max (keeps exp(m - m) = 1 on all-masked rows).
NEG_BIG = tl.constexpr(-1.0e30)
EPS = tl.constexpr(_EPS)


@triton.jit
def transform(c, rp, p0, p1, KIND: tl.constexpr):
    """(z, dz/dc) of a float32 (rows x classes) cosine tile; ``rp`` is the (rows,) row
    parameter."""
    if KIND == 0:  # circle: p0 * [c + p1]_+ * (c - p1), the weight detached
        dz = p0 * tl.maximum(c + p1, 0.0)
        z = dz * (c - p1)
    elif KIND == 1:  # curricular: p0 * (c (p1 + c) if c > rp else c), mask detached
        hard = c > rp[:, None]
        z = tl.where(hard, c * (p1 + c), c) * p0
        dz = tl.where(hard, (p1 + 2.0 * c) * p0, p0)
    else:  # scaled
        z = c * p0
        dz = tl.zeros_like(c) + p0
    return z, dz


@triton.jit
def inv_norm_kernel(
    W,
    INV,
    D,
    C,
    stride_wd,
    stride_wc,
    OP_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """INV[j] = 1 / max(||w_j||, 1e-6) of W's columns rounded to ``OP_DTYPE``."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w_cols = W + cols.to(tl.int64)[None, :] * stride_wc
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(
            w_cols + dk.to(tl.int64)[:, None] * stride_wd,
            mask=(dk < D)[:, None] & col_ok[None, :],
            other=0.0,
        )
        w = w.to(OP_DTYPE).to(tl.float32)  # norms of the operand values the dots use
        acc += tl.sum(w * w, axis=0)
    # Correctly rounded sqrt and division (the default "/" and sqrt are approximate on
    # the GPU): the same inverse norms as the PyTorch path up to its rsqrt's rounding.
    norm = tl.sqrt_rn(tl.maximum(acc, EPS))
    tl.store(INV + cols, tl.div_rn(tl.full([BLOCK_C], 1.0, tl.float32), norm), mask=col_ok)


@triton.jit
def logits_k_loop(
    X,
    w_cols,
    rows,
    row_ok,
    col_ok,
    D,
    stride_xb,
    stride_xd,
    stride_wd,
    OP_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """x[rows] . w[:, cols] over all of D in BLOCK_D steps (float32 accumulator): the
    logits of programs that hold only a slice of D (D larger than ``d_group``)."""
    s = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xb  # int64: B * stride may pass 2^31
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        d_ok = dk < D
        xk = tl.load(
            x_rows + dk[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        wk = tl.load(
            w_cols + dk.to(tl.int64)[:, None] * stride_wd,
            mask=d_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        s = tl.dot(
            xk.to(OP_DTYPE).to(DOT_DTYPE),
            wk.to(OP_DTYPE).to(DOT_DTYPE),
            s,
            input_precision=PRECISION,
        )
    return s


__all__ = ["EPS", "KIND_IDS", "NEG_BIG", "inv_norm_kernel", "logits_k_loop", "transform"]
