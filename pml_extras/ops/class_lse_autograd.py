"""The class-level logsumexp as an autograd Function: the PyTorch path (the Triton
kernels' oracle) and the switch to the fused kernels, with the implementation fixed.

:func:`apply_class_lse` applies :class:`ClassLogSumExp` with ``impl`` ("torch" or
"triton") and the operand dtype already decided; the public
:func:`~pml_extras.ops.class_lse.class_logsumexp` decides them (validation, the operand
policy, :func:`~pml_extras.ops.dispatch.resolve_impl`) and the self-check
(:mod:`~pml_extras.ops.kernel_check`) calls this module directly, so checking a kernel
never goes through the dispatcher again. The contract (transforms, precision) is in
:mod:`~pml_extras.ops.class_lse`'s docstring.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._launch import apply_eagerly
from .class_common import (
    KINDS,
    add_target_grad,
    operands,
    project_rows,
    round_operand,
    unit_target_cosine,
)
from .precision import EPS, accumulate_dtype

# Temporaries per chunk are B x chunk float32; ~16 MB keeps CPU caches and GPU
# allocators happy while leaving the matmuls large enough to be efficient.
_CHUNK_ELEMS = 1 << 22


def default_chunk_size(batch_size: int, num_classes: int) -> int:
    chunk = _CHUNK_ELEMS // max(batch_size, 1)
    chunk = max(256, min(chunk, 65536))
    return max(1, min(chunk, num_classes))


def transform(kind: str, c: Tensor, row_param: Optional[Tensor], p0: float, p1: float):
    """Return (z, dz/dc) for a float32 cosine block ``c`` of shape (B, n)."""
    if kind == "circle":
        weight = torch.clamp_min(c + p1, 0.0)
        return p0 * weight * (c - p1), p0 * weight
    if kind == "curricular":
        hard = c > row_param[:, None]
        z = torch.where(hard, c * (p1 + c), c) * p0
        dz = torch.where(hard, (p1 + 2.0 * c) * p0, torch.full_like(c, p0))
        return z, dz
    if kind == "scaled":
        return c * p0, torch.full_like(c, p0)
    raise ValueError(f"unknown transform kind {kind!r}; expected one of {KINDS}")


def _chunk_cosines(xv, x_hat, inv_x, w, op, acc):
    """Raw cosines (B, n) in ``acc``, normalised proxies w_hat (D, n) and their inverse norms.

    ``xv`` holds x's operand values (rounded to ``op``) in ``acc``; W's chunk is rounded to
    ``op`` too, and its norms are those of the rounded values, so that every cosine is the
    cosine of the two rounded vectors. Full-precision operands multiply x_hat by w_hat
    directly; half operands multiply the rounded values in ``acc`` (exact products,
    float32 sums: what the tensor cores compute) and scale the product by both inverse
    norms afterwards, as the Triton kernels do.
    """
    wf = w.to(op).to(acc)
    inv_norm = torch.rsqrt(torch.clamp_min((wf * wf).sum(0), EPS))
    w_hat = wf * inv_norm
    if op == acc:
        return x_hat @ w_hat, w_hat, inv_norm
    raw = xv @ wf
    return raw.mul_(inv_x[:, None]).mul_(inv_norm), w_hat, inv_norm


def _mask_target_(z: Tensor, target: Tensor, start: int) -> Tensor:
    """Set z[i, target_i - start] = -inf where the target falls in this chunk: O(B), not
    a B x n comparison, and no host sync."""
    n = z.shape[1]
    local = target - start
    inside = ((local >= 0) & (local < n))[:, None]
    idx = local.clamp(0, n - 1)[:, None]
    cur = z.gather(1, idx)
    return z.scatter_(1, idx, torch.where(inside, torch.full_like(cur, float("-inf")), cur))


def _logits_inplace(kind, c, row_param, p0, p1):
    """g(c) for the forward, overwriting ``c`` where that saves a temporary."""
    if kind == "circle":
        weight = (c + p1).clamp_min_(0.0)
        return weight.mul_(c.sub_(p1)).mul_(p0)
    if kind == "curricular":
        hard = c > row_param[:, None]
        return torch.where(hard, c * (p1 + c), c).mul_(p0)
    if kind == "scaled":
        return c.mul_(p0)
    raise ValueError(f"unknown transform kind {kind!r}; expected one of {KINDS}")


def _forward_torch(x, weight, target, row_param, kind, p0, p1, chunk, op=None):
    """(lse, cos_y) of raw embeddings ``x`` (normalised here) against W's classes."""
    batch, num_classes = x.shape[0], weight.shape[1]
    op, acc, x_op, x_hat, inv_x = operands(x, weight, op)
    xv = x_op.to(acc)
    lse = torch.full((batch,), float("-inf"), device=x.device, dtype=acc)
    for start in range(0, num_classes, chunk):
        w = weight[:, start : start + chunk]
        c, _, _ = _chunk_cosines(xv, x_hat, inv_x, w, op, acc)
        z = _logits_inplace(kind, c.clamp_(-1.0, 1.0), row_param, p0, p1)
        z = _mask_target_(z, target, start)
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
    return lse, unit_target_cosine(x_hat, weight, target, op)


def _backward_torch(
    x, weight, target, row_param, kind, p0, p1, chunk, lse, grad_lse, grad_cos, op=None
):
    """(grad_x in x.dtype, grad_w in weight.dtype) of sum(grad_lse*lse + grad_cos*cos_y)."""
    num_classes = weight.shape[1]
    op, acc, x_op, x_hat, inv_x = operands(x, weight, op)
    xv = x_op.to(acc)
    grad_hat = torch.zeros(x.shape, device=x.device, dtype=acc)
    grad_w = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    # Rows whose negatives are all masked have lse = -inf and every p_ij = 0.
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[:, None]
    for start in range(0, num_classes, chunk):
        w = weight[:, start : start + chunk]
        raw, w_hat, inv_norm = _chunk_cosines(xv, x_hat, inv_x, w, op, acc)
        z, dz = transform(kind, raw.clamp(-1.0, 1.0), row_param, p0, p1)
        z = _mask_target_(z, target, start)
        # d lse_i / d c_ij = softmax_ij * g'(c_ij), computed in place over z. The clamp
        # bounds the value only (see class_common.add_target_grad).
        g = z.sub_(lse_safe).exp_().mul_(dz).mul_(grad_lse[:, None])
        del dz, z
        # Both gradient matmuls take the operand dtype too: G and w_hat rounded to it
        # (fp16: G scaled into [-1, 1] first), float32 products and sums.
        g_op, g_scale = round_operand(g, op, 1)
        part = g_op @ w_hat.t().to(op).to(acc)  # |w_hat| <= 1: no scaling needed
        grad_hat += part if g_scale is None else part.mul_(g_scale)
        # grad_w_hat_j = sum_i G_ij x_hat_i = sum_i (G_ij / ||x_i||) x_i.
        if op == acc:
            grad_w_hat = x_hat.t() @ g
        else:
            gx_op, gx_scale = round_operand(g * inv_x[:, None], op, 0)
            grad_w_hat = xv.t() @ gx_op
            if gx_scale is not None:
                grad_w_hat.mul_(gx_scale)
        del g, raw
        # Project out the radial part: d(w/||w||)/dw = (I - w_hat w_hat^T) / ||w||.
        radial = (grad_w_hat * w_hat).sum(0)
        grad_w[:, start : start + chunk] = grad_w_hat.sub_(w_hat * radial).mul_(inv_norm)
    add_target_grad(x_hat, weight, target, grad_cos, grad_hat, grad_w, op)
    return project_rows(grad_hat, x_hat, inv_x).to(x.dtype), grad_w


class ClassLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, row_param, kind, p0, p1, chunk, impl, op):
        x_d, w_d = x.detach(), weight.detach()
        state = ()
        # The operand dtype was chosen outside (autocast included); inside, nothing may
        # re-cast the matmuls behind our back.
        with torch.autocast(x.device.type, enabled=False):
            if impl == "triton":
                from . import class_lse_triton

                # When x needs a gradient the kernels also return d lse / d x_hat and the
                # class inverse norms, which spares the backward a second pass over W.
                out = class_lse_triton.forward(
                    x_d,
                    w_d,
                    target,
                    row_param,
                    kind,
                    p0,
                    p1,
                    op_dtype=op,
                    need_state=ctx.needs_input_grad[0],
                )
                lse, cos_y = out[0], out[1]
                state = tuple(out[2]) if len(out) > 2 else ()
            elif impl == "hybrid":
                from . import class_lse_hybrid

                lse, cos_y = class_lse_hybrid.forward(
                    x_d, w_d, target, row_param, kind, p0, p1, op_dtype=op
                )
            else:
                lse, cos_y = _forward_torch(x_d, w_d, target, row_param, kind, p0, p1, chunk, op)
        ctx.save_for_backward(x_d, w_d, target, row_param, lse, *state)
        ctx.args = (kind, p0, p1, chunk, impl, op)
        return lse, cos_y

    @staticmethod
    def backward(ctx, grad_lse, grad_cos):
        x, weight, target, row_param, lse, *state = ctx.saved_tensors
        kind, p0, p1, chunk, impl, op = ctx.args
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
        grad_cos = torch.zeros_like(lse) if grad_cos is None else grad_cos.to(lse.dtype)
        with torch.autocast(x.device.type, enabled=False):
            if impl == "triton":
                from . import class_lse_triton

                grad_x, grad_w = class_lse_triton.backward(
                    x,
                    weight,
                    target,
                    row_param,
                    kind,
                    p0,
                    p1,
                    lse,
                    grad_lse,
                    grad_cos,
                    state=tuple(state) or None,
                    need_grad_x=ctx.needs_input_grad[0],
                    need_grad_w=ctx.needs_input_grad[1],
                    op_dtype=op,
                )
            elif impl == "hybrid":
                from . import class_lse_hybrid

                grad_x, grad_w = class_lse_hybrid.backward(
                    x, weight, target, row_param, kind, p0, p1, lse, grad_lse, grad_cos,
                    op_dtype=op,
                )  # fmt: skip
            else:
                grad_x, grad_w = _backward_torch(
                    x, weight, target, row_param, kind, p0, p1, chunk, lse, grad_lse, grad_cos, op
                )
        return grad_x, grad_w, None, None, None, None, None, None, None, None


# Dynamo cannot trace the Triton launchers (host-side grid and config arithmetic; under


def apply_class_lse(x, weight, target, kind, p0, p1, row_param, chunk_size, impl, op):
    """(lse, cos_y) through :class:`ClassLogSumExp` with ``impl`` ("torch", "triton" or "hybrid")
    and operand dtype ``op`` fixed: no dispatch, no check. ``row_param`` None means zeros;
    ``chunk_size`` is the PyTorch path's (the kernels tile on their own)."""
    acc = accumulate_dtype(x, weight)
    if row_param is None:
        row_param = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
    p1 = p1.detach().to(device=x.device, dtype=acc) if torch.is_tensor(p1) else float(p1)
    args = (x, weight, target.long(), row_param.detach().to(acc), kind, float(p0), p1)
    # Read by the caller, under its autocast state; the Function runs with autocast off.
    args += (int(chunk_size), impl, op)
    if impl in ("triton", "hybrid"):
        return apply_eagerly(ClassLogSumExp, *args)
    return ClassLogSumExp.apply(*args)


__all__ = ["ClassLogSumExp", "apply_class_lse", "default_chunk_size", "transform"]
