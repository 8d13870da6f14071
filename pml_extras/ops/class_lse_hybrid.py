"""Hybrid class logsumexp: library matmuls over class chunks plus one fused Triton epilogue.

The alternative to the fused kernels that ``cost_model.hybrid_class_kernels`` models
(docs/kernels/cost_model.md): per chunk of ``chunk`` classes,

* forward: raw = x_op @ W_op[:, chunk] as a float32 (B, chunk) tensor (tensor cores with
  float32 output on CUDA; it stays in L2 at B * chunk * 4 = 32 MB), then one Triton kernel
  that scales by both inverse norms, clamps, applies the transform, masks the target and
  padding columns and reduces each row to a (max, sum exp) pair; the chunks combine by
  logaddexp;
* backward: raw again, one Triton kernel that turns it in place into
  G_ij = softmax_ij * g'(c_ij) * grad_lse_i (target column 0), then the two gradient
  matmuls grad_x_hat += G W_hat^T and grad_w_hat = x^T (G / ||x||), exactly as
  ``class_lse._backward_torch`` (same rounding points, same radial projections).

Same contract and numbers as ``class_lse._forward_torch`` / ``_backward_torch``: the
matmul operands are rounded to the operand dtype and multiplied with float32 accumulation
(on CPU, and for float32 operands, as float32 matmuls of the rounded values, which is
what the PyTorch path does; on CUDA with 16-bit operands, ``torch.mm(..., out_dtype=
torch.float32)``). Only the elementwise chain differs (fused, float32 throughout).

Not chosen by ``impl="auto"``: it has never run on a GPU. The cost model predicts 2.8x
the matmul floor for the lean form of this design at B = 1024, D = 512, C = 1M in bf16
(5.9x for the fused kernels as they are), but 9.5x for this module as it is: the glue
between the matmuls and the epilogue is still plain PyTorch (about 45 launches per
chunk). ``class_logsumexp(..., impl="hybrid")`` selects it.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import is_interpreted, launch_device
from .class_common import (
    KINDS,
    add_target_grad,
    operands,
    project_rows,
    round_operand,
    unit_target_cosine,
)
from .precision import EPS

_KIND_IDS = {"circle": 0, "curricular": 1, "scaled": 2}
assert set(_KIND_IDS) == set(KINDS)
_NEG_BIG = tl.constexpr(-1.0e30)
DEFAULT_CHUNK = 8192  # classes per chunk: B * chunk float32 logits stay in L2 at B = 1024
BLOCK_M, BLOCK_N = 16, 128  # epilogue tiles (elementwise only: no tl.dot)


@triton.jit
def _transform(c, rp, p0, p1, KIND: tl.constexpr):
    """(z, dz/dc) of a float32 cosine tile, as class_lse.transform."""
    if KIND == 0:
        dz = p0 * tl.maximum(c + p1, 0.0)
        z = dz * (c - p1)
    elif KIND == 1:
        hard = c > rp[:, None]
        z = tl.where(hard, c * (p1 + c), c) * p0
        dz = tl.where(hard, (p1 + 2.0 * c) * p0, p0)
    else:
        z = c * p0
        dz = tl.zeros_like(c) + p0
    return z, dz


@triton.jit
def _epilogue_kernel(
    RAW,
    RX,
    INV,
    TGT,
    RP,
    LSE,
    GLSE,
    M_OUT,
    L_OUT,
    P1,
    B,
    N,
    start,
    p0,
    p1_value,
    KIND: tl.constexpr,
    P1_PTR: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One BLOCK_M-row block of a (B, N) chunk of raw dot products (row stride N).

    Forward: writes the block's rows' (max, sum exp(z - max)) over the chunk's non-target
    columns to M_OUT / L_OUT. Backward: overwrites RAW with G = exp(z - lse) * dz *
    grad_lse (0 at the target and padding columns)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    if P1_PTR:  # a 0-d tensor (CurricularFace's t buffer): read on the device, no sync
        p1 = tl.load(P1)
    else:
        p1 = p1_value
    rx = tl.load(RX + rows, mask=row_ok, other=0.0)
    rp = tl.load(RP + rows, mask=row_ok, other=0.0)
    local = tl.load(TGT + rows, mask=row_ok, other=-1) - start
    if BACKWARD:
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        glse = tl.load(GLSE + rows, mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    base = rows.to(tl.int64)[:, None] * N
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        inside = row_ok[:, None] & col_ok[None, :]
        raw = tl.load(RAW + base + cols[None, :], mask=inside, other=0.0)
        inv = tl.load(INV + cols, mask=col_ok, other=0.0)
        c = tl.minimum(tl.maximum(raw * rx[:, None] * inv[None, :], -1.0), 1.0)
        z, dz = _transform(c, rp, p0, p1, KIND)
        keep = inside & (cols[None, :] != local[:, None])
        if BACKWARD:
            g = tl.where(keep, tl.exp(z - lse[:, None]) * dz * glse[:, None], 0.0)
            tl.store(RAW + base + cols[None, :], g, mask=inside)
        else:
            z = tl.where(keep, z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_i = m_new
    if not BACKWARD:
        tl.store(M_OUT + rows, m_i, mask=row_ok)
        tl.store(L_OUT + rows, l_i, mask=row_ok)


INTERPRETED = is_interpreted(_epilogue_kernel)


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """float32 a @ b of operands holding values of the operand dtype (exact products,
    float32 sums). ``a`` / ``b`` are float32 tensors of rounded values, or 16-bit ones."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)  # tensor cores, float32 output
    return a.float() @ b.float()


def _chunk(x_mm, w, op, acc) -> Tuple[Tensor, Tensor, Tensor]:
    """(raw (B, n) float32-or-wider dot products, w_hat (D, n) in acc, 1/||w|| (n,))."""
    wf = w.to(op).to(acc)
    inv = torch.rsqrt(torch.clamp_min((wf * wf).sum(0), EPS))
    w_mm = w.to(op) if x_mm.dtype == op else wf
    raw = _mm32(x_mm, w_mm) if op != acc else (x_mm @ wf)
    return raw.contiguous(), wf * inv, inv


def _launch(raw, inv_x, inv, target, row_param, kind, p0, p1, start, lse=None, glse=None):
    batch, n = raw.shape
    backward = lse is not None
    m = l_out = None
    if not backward:
        m = torch.empty(batch, device=raw.device, dtype=torch.float32)
        l_out = torch.empty_like(m)
    dummy = inv_x
    p1_ptr = p1.detach().reshape(1).to(raw.device, torch.float32) if torch.is_tensor(p1) else None
    with launch_device(raw):
        _epilogue_kernel[(triton.cdiv(batch, BLOCK_M),)](
            raw,
            inv_x,
            inv,
            target,
            row_param,
            lse if backward else dummy,
            glse if backward else dummy,
            m if m is not None else dummy,
            l_out if l_out is not None else dummy,
            p1_ptr if p1_ptr is not None else dummy,
            batch,
            n,
            start,
            float(p0),
            0.0 if p1_ptr is not None else float(p1),
            KIND=_KIND_IDS[kind],
            P1_PTR=p1_ptr is not None,
            BACKWARD=backward,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
        )
    return m, l_out


def _check(kind, x, weight):
    if kind not in _KIND_IDS:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {KINDS}")
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if dtype == torch.float64:
        raise TypeError("the hybrid class logsumexp computes in float32; use impl='torch'")


def _prepare(x, weight, op):
    op, acc, x_op, x_hat, inv_x = operands(x, weight, op)
    # 16-bit operands go to the library matmul as they are on CUDA; elsewhere (and for
    # float32) as float32 tensors of the rounded values, like the PyTorch path.
    x_mm = x_op if (x_op.is_cuda and op != acc) else x_op.to(acc)
    return op, acc, x_mm, x_hat, inv_x


def forward(x, weight, target, row_param, kind, p0, p1, *, op_dtype=None, chunk=None):
    """(lse, cos_y), both (B,) float32, as ``class_lse._forward_torch``."""
    _check(kind, x, weight)
    op, acc, x_mm, x_hat, inv_x = _prepare(x, weight, op_dtype)
    batch, num_classes = x.shape[0], weight.shape[1]
    chunk = chunk or DEFAULT_CHUNK
    target = target.long().contiguous()
    row_param = row_param.to(acc).contiguous()
    inv_x = inv_x.contiguous()
    lse = torch.full((batch,), float("-inf"), device=x.device, dtype=acc)
    for start in range(0, num_classes if batch else 0, chunk):
        raw, _, inv = _chunk(x_mm, weight[:, start : start + chunk], op, acc)
        m, s = _launch(raw, inv_x, inv.contiguous(), target, row_param, kind, p0, p1, start)
        part = torch.where(s > 0, m + torch.log(s), torch.full_like(m, float("-inf")))
        lse = torch.logaddexp(lse, part)
    return lse, unit_target_cosine(x_hat, weight, target, op)


def backward(
    x, weight, target, row_param, kind, p0, p1, lse, grad_lse, grad_cos, *, op_dtype=None,
    chunk=None,
):  # fmt: skip
    """(grad_x in x.dtype, grad_w in weight.dtype), as ``class_lse._backward_torch``."""
    _check(kind, x, weight)
    op, acc, x_mm, x_hat, inv_x = _prepare(x, weight, op_dtype)
    num_classes = weight.shape[1]
    chunk = chunk or DEFAULT_CHUNK
    target = target.long().contiguous()
    row_param = row_param.to(acc).contiguous()
    inv_x = inv_x.contiguous()
    grad_lse = grad_lse.to(acc).contiguous()
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(acc).contiguous()
    grad_hat = torch.zeros(x.shape, device=x.device, dtype=acc)
    grad_w = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    xv = x_mm.to(acc)
    for start in range(0, num_classes if x.shape[0] else 0, chunk):
        raw, w_hat, inv = _chunk(x_mm, weight[:, start : start + chunk], op, acc)
        _launch(raw, inv_x, inv.contiguous(), target, row_param, kind, p0, p1, start,
                lse_safe, grad_lse)  # fmt: skip
        g = raw  # now G, in place
        g_op, g_scale = round_operand(g, op, 1)
        part = _mm32(g_op.to(op) if x_mm.dtype == op else g_op, _as_mm(w_hat.t(), op, x_mm))
        grad_hat += part if g_scale is None else part.mul_(g_scale)
        if op == acc:
            grad_w_hat = x_hat.t() @ g
        else:
            gx_op, gx_scale = round_operand(g * inv_x[:, None], op, 0)
            grad_w_hat = _mm32(_as_mm(xv.t(), op, x_mm), _as_mm(gx_op, op, x_mm))
            if gx_scale is not None:
                grad_w_hat.mul_(gx_scale)
        radial = (grad_w_hat * w_hat).sum(0)
        grad_w[:, start : start + chunk] = grad_w_hat.sub_(w_hat * radial).mul_(inv)
    if x.shape[0] == 0:
        grad_w.zero_()
    add_target_grad(x_hat, weight, target, grad_cos.to(acc), grad_hat, grad_w, op)
    return project_rows(grad_hat, x_hat, inv_x).to(x.dtype), grad_w


def _as_mm(t: Tensor, op: torch.dtype, x_mm: Tensor) -> Tensor:
    """``t`` (values already representable in ``op``, or to be rounded to it) in the form
    the library matmul takes: the 16-bit dtype on CUDA, float32 of the rounded values
    elsewhere."""
    rounded = t.to(op)
    return rounded if x_mm.dtype == op else rounded.to(torch.float32)


__all__ = ["DEFAULT_CHUNK", "backward", "forward"]
