"""Hybrid class logsumexp: library matmuls over class chunks plus fused Triton epilogues.

The alternative to the fused kernels that ``cost_model.hybrid_class_kernels`` models
(docs/kernels/cost_model.md). Once per call: the inverse norms of all of W
(``class_lse_triton.inverse_norms``, of W's values rounded to the operand dtype). Then,
per chunk of ``chunk`` classes (W's chunk a view; one cast of it only where W is stored
in another dtype than the operands, e.g. float32 W under autocast):

* forward (2 launches): raw = x_op @ W_op[:, chunk], float32 (B, chunk) (tensor cores
  with float32 output on CUDA; B * chunk * 4 = 32 MB stays in L2 at B = 1024), then one
  epilogue kernel that scales by both inverse norms, clamps, applies the transform,
  masks the target and padding columns, reduces each row of the chunk to (max, sum exp)
  and folds that into the running pair of the row, in place;
* backward (6 launches): raw again; one epilogue kernel that writes both gradient
  matmuls' operands already rounded to the operand dtype, GX = G / ||w_j|| and
  GW = G / ||x_i||, with G_ij = softmax_ij g'(c_ij) grad_lse_i (target column 0);
  grad x_hat += GX @ W_op^T (the matmul, then the add: 2 launches); grad w_hat =
  x_op^T @ GW; one kernel for the radial projection of the chunk's grad W columns,
  written straight into grad W's slice in W's dtype.

Numbers: those of ``class_lse._forward_torch`` / ``_backward_torch`` (the operands
rounded to the operand dtype and multiplied with float32 accumulation: on CUDA with
16-bit operands ``torch.mm(..., out_dtype=torch.float32)``; on CPU, and for float32
operands, float32 matmuls of the rounded values) with one difference in rounding: for
16-bit operands the torch path rounds G and w_hat = W / ||w|| separately for
grad x_hat = G w_hat^T, this module rounds G / ||w|| and multiplies it by W's operand
values (as the fused kernels' P-side scale does). float16 operands keep the PyTorch
path's scaled rounding (``class_common.round_operand``: divide by the row / column
maximum first), which needs a whole row or column of G: there the epilogue writes
float32 G and the rounding, W_hat and the scalings are PyTorch, as in
``_backward_torch`` (about 15 more launches per backward chunk).

``impl="hybrid"`` selects it; ``impl="auto"`` on CUDA picks it where the cost model
(``cost_model.hybrid_class_kernels(..., as_built=True)``) predicts it faster than the
fused kernels as built for the call's shapes and dtypes (``dispatch``), and only once its
kernels have passed their own self-check on the device (``kernel_check`` family
``class_lse_hybrid``). It has not run on a GPU yet.
"""

from __future__ import annotations

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
from .class_lse_hybrid_kernels import (
    BWD_BLOCK_M,
    BWD_BLOCK_N,
    FWD_BLOCK_M,
    FWD_BLOCK_N,
    RADIAL_BLOCK_D,
    RADIAL_BLOCK_N,
    bwd_epilogue_kernel,
    fwd_epilogue_kernel,
    radial_kernel,
)
from .class_lse_triton import inverse_norms
from .class_lse_triton_tiles import KIND_IDS as _KIND_IDS
from .class_lse_triton_tiles import NEG_BIG

assert set(_KIND_IDS) == set(KINDS)
DEFAULT_CHUNK = 8192  # classes per chunk at B <= 1024
# Larger batches take narrower chunks, so that the (B, chunk) float32 raw products (and
# the backward's two operand-dtype copies) stay in L2 (32 MB of raw): cost_model's
# hybrid_chunk is the same rule.
_L2_ELEMS = 1 << 23


def default_chunk(batch: int) -> int:
    """Classes per chunk for ``batch`` rows: 8192 up to B = 1024, then 8M / B, at least
    256."""
    return max(256, min(DEFAULT_CHUNK, _L2_ELEMS // max(batch, 1)))


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

INTERPRETED = is_interpreted(fwd_epilogue_kernel)


def _run(kernel, grid, ref: Tensor, *args, **meta) -> None:
    """One Triton launch (every launch of this module goes through here, so that
    tests/ops/test_class_lse_hybrid.py can count them against the cost model)."""
    with launch_device(ref):
        kernel[grid](*args, **meta)


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """One library matmul a @ b with a float32 result; ``a`` and ``b`` hold operand
    values (rounded to the operand dtype, in that dtype): exact products, float32 sums."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)  # IEEE or TF32 as torch's setting says, like the torch path
    if a.is_cuda:
        # tensor cores with float32 output (torch >= 2.8; dispatch refuses the hybrid on
        # CUDA where torch.mm has no out_dtype)
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # CPU: the same products and sums, in float32


def _w_operand(w: Tensor, op: torch.dtype) -> Tensor:
    """W's chunk as a matmul operand: the view itself when W is stored in ``op``, else one
    cast (float32 W under autocast: rounded to the 16-bit operands)."""
    return w if w.dtype == op else w.to(op)


def _p1_args(p1, device):
    """(pointer tensor or None, float value): a 0-d tensor p1 is read on the device."""
    if torch.is_tensor(p1):
        return p1.detach().reshape(1).to(device=device, dtype=torch.float32), 0.0
    return None, float(p1)


def _check(kind, x, weight):
    if kind not in _KIND_IDS:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {KINDS}")
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if dtype == torch.float64:
        raise TypeError("the hybrid class logsumexp computes in float32; use impl='torch'")


class _Setup:
    """What forward and backward share: the operands, the row vectors, p1 and 1/||w||."""

    def __init__(self, x, weight, target, row_param, kind, p1, op_dtype):
        _check(kind, x, weight)
        self.op, self.acc, self.x_op, self.x_hat, inv_x = operands(x, weight, op_dtype)
        self.inv_x = inv_x.contiguous()
        self.target = target.long().contiguous()
        self.row_param = row_param.to(self.acc).contiguous()
        self.p1_ptr, self.p1_value = _p1_args(p1, x.device)
        self.kind = _KIND_IDS[kind]
        empty = x.shape[0] == 0 or weight.shape[1] == 0
        self.inv = None if empty else inverse_norms(weight, op_dtype=self.op)

    def scalars(self):
        """(P1 pointer, p1 value, P1_PTR): the P1 pointer is a dummy when p1 is a float."""
        ptr = self.p1_ptr
        return (self.inv_x if ptr is None else ptr), self.p1_value, ptr is not None


def forward(x, weight, target, row_param, kind, p0, p1, *, op_dtype=None, chunk=None):
    """(lse, cos_y), both (B,) float32, as ``class_lse._forward_torch``."""
    s = _Setup(x, weight, target, row_param, kind, p1, op_dtype)
    batch, num_classes = x.shape[0], weight.shape[1]
    chunk = chunk or default_chunk(batch)
    m_run = torch.full((batch,), NEG_BIG.value, device=x.device, dtype=torch.float32)
    l_run = torch.zeros(batch, device=x.device, dtype=torch.float32)
    p1_ptr, p1_value, p1_is_ptr = s.scalars()
    for start in range(0, num_classes if s.inv is not None else 0, chunk):
        raw = _mm32(s.x_op, _w_operand(weight[:, start : start + chunk], s.op))
        n = raw.shape[1]
        _run(fwd_epilogue_kernel, (triton.cdiv(batch, FWD_BLOCK_M),), raw,
             raw, s.inv_x, s.inv[start:], s.target, s.row_param, m_run, l_run, p1_ptr,
             batch, n, start, float(p0), p1_value,
             KIND=s.kind, P1_PTR=p1_is_ptr, BLOCK_M=FWD_BLOCK_M, BLOCK_N=FWD_BLOCK_N)  # fmt: skip
    # All columns masked (or none): sum 0, lse = -inf, as the torch path's logsumexp.
    lse = torch.where(l_run > 0, m_run + torch.log(l_run), float("-inf"))
    return lse, unit_target_cosine(s.x_hat, weight, s.target, s.op)


def backward(
    x, weight, target, row_param, kind, p0, p1, lse, grad_lse, grad_cos, *, op_dtype=None,
    chunk=None,
):  # fmt: skip
    """(grad_x in x.dtype, grad_w in weight.dtype), as ``class_lse._backward_torch``."""
    s = _Setup(x, weight, target, row_param, kind, p1, op_dtype)
    batch, num_classes = x.shape[0], weight.shape[1]
    chunk = chunk or default_chunk(batch)
    op, acc = s.op, s.acc
    grad_lse = grad_lse.to(acc).contiguous()
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(acc).contiguous()
    grad_hat = torch.zeros(x.shape, device=x.device, dtype=acc)
    grad_w = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    if batch == 0:
        grad_w.zero_()
    p1_ptr, p1_value, p1_is_ptr = s.scalars()
    g_only = op == torch.float16
    x_t = s.x_op.t()
    for start in range(0, num_classes if s.inv is not None else 0, chunk):
        w = weight[:, start : start + chunk]
        w_op = _w_operand(w, op)
        raw = _mm32(s.x_op, w_op)
        n = raw.shape[1]
        inv = s.inv[start : start + n]
        gx = gw = raw  # G_ONLY: G over raw; else two (B, n) operand-dtype tensors
        if not g_only:
            gx, gw = (
                torch.empty(batch, n, device=x.device, dtype=op),
                torch.empty(batch, n, device=x.device, dtype=op),
            )
        grid = (triton.cdiv(batch, BWD_BLOCK_M), triton.cdiv(n, BWD_BLOCK_N))
        _run(bwd_epilogue_kernel, grid, raw,
             raw, s.inv_x, inv, s.target, s.row_param, lse_safe, grad_lse, gx, gw, p1_ptr,
             batch, n, start, float(p0), p1_value,
             KIND=s.kind, P1_PTR=p1_is_ptr, OUT_DTYPE=_TL[op], G_ONLY=g_only,
             BLOCK_M=BWD_BLOCK_M, BLOCK_N=BWD_BLOCK_N)  # fmt: skip
        if g_only:
            grad_w_hat = _half_glue(raw, w_op, inv, s, grad_hat)
        else:
            grad_hat.add_(_mm32(gx, w_op.t()))
            grad_w_hat = _mm32(x_t, gw)
        _run(radial_kernel, (triton.cdiv(n, RADIAL_BLOCK_N),), raw,
             grad_w_hat, w, inv, grad_w[:, start : start + n], x.shape[1], n,
             w.stride(0), w.stride(1), grad_w.stride(0), grad_w.stride(1),
             OP_DTYPE=_TL[op], BLOCK_D=RADIAL_BLOCK_D, BLOCK_N=RADIAL_BLOCK_N)  # fmt: skip
    add_target_grad(s.x_hat, weight, s.target, grad_cos.to(acc), grad_hat, grad_w, op)
    return project_rows(grad_hat, s.x_hat, s.inv_x).to(x.dtype), grad_w


def _half_glue(g: Tensor, w_op: Tensor, inv: Tensor, s: _Setup, grad_hat: Tensor) -> Tensor:
    """float16 operands: ``_backward_torch``'s scaled roundings of G (float32) in PyTorch;
    adds G w_hat^T into ``grad_hat`` and returns grad w_hat = x_hat^T G, (D, n) float32."""
    op = s.op
    g_op, g_scale = round_operand(g, op, 1)
    w_hat = (w_op.float() * inv).to(op)  # |w_hat| <= 1: no scaling needed
    part = _mm32(g_op.to(op), w_hat.t())
    grad_hat += part if g_scale is None else part.mul_(g_scale)
    gx_op, gx_scale = round_operand(g * s.inv_x[:, None], op, 0)
    grad_w_hat = _mm32(s.x_op.t(), gx_op.to(op))
    return grad_w_hat if gx_scale is None else grad_w_hat.mul_(gx_scale)


__all__ = ["DEFAULT_CHUNK", "backward", "default_chunk", "forward"]
