"""What both class-level paths share: the transforms' names, the embeddings' and target
proxies' normalisation, the target column and its gradient, and the rounding of a
gradient operand.

The PyTorch path (:mod:`~pml_extras.ops.class_lse_autograd`) and the Triton launchers
(:mod:`~pml_extras.ops.class_lse_triton`) both import these, so that they normalise alike
and neither imports the other. Imports only :mod:`~pml_extras.ops.precision` and
:mod:`~pml_extras.ops.fixed_order`.

The target column's gradient goes into W with :func:`~.fixed_order.add_columns_`
(a fixed order on CUDA); that module's names are re-exported here, their first home.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .fixed_order import (  # noqa: F401  (re-exported: their first home)
    add_columns_,
    add_columns_deterministic_,
    add_rows_,
    add_rows_deterministic_,
    uses_sorted_add,
)
from .precision import EPS, accumulate_dtype, operand_dtype

KINDS = ("circle", "curricular", "scaled")


class Operands(NamedTuple):
    """The class-level matmul inputs, prepared once for both implementations."""

    op: torch.dtype  # the matmul operand dtype (the operand policy)
    acc: torch.dtype  # the accumulation dtype: float32, or float64 for float64 inputs
    x_op: Tensor  # (B, D) x rounded to ``op``
    x_hat: Tensor  # (B, D) its normalised rows, in ``acc``
    inv_x: Tensor  # (B,) their inverse norms, in ``acc``


def class_operand_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The operand policy for embeddings ``x`` against proxies ``weight``."""
    return operand_dtype(x, proxies=(weight,))


def unit_rows(x: Tensor, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(x_hat, inv_norm): x's rows normalised in ``acc`` and their (B,) inverse norms.

    ``x`` holds the operand values (already rounded). The norm floor is the proxies' one:
    rsqrt(max(sum x^2, 1e-12)). The normalisation is
    applied outside the matmul (to its float32 result, and to the gradient afterwards):
    with half inputs the gradient w.r.t. the unit vector has a large radial part near
    cos = +-1 that only the normalisation's backward removes, and that part would overflow
    fp16 if it were ever rounded to it."""
    xf = x.to(acc)
    inv = torch.rsqrt(torch.clamp_min((xf * xf).sum(1), EPS))
    return xf * inv[:, None], inv


def operands(x: Tensor, weight: Tensor, op: Optional[torch.dtype] = None) -> Operands:
    """:class:`Operands` of ``x`` against ``weight``; ``op`` None follows the policy.
    Shared by both implementations, so that they normalise alike."""
    op = class_operand_dtype(x, weight) if op is None else op
    acc = accumulate_dtype(x, weight)
    x_op = x.to(op)
    x_hat, inv_x = unit_rows(x_op, acc)
    return Operands(op, acc, x_op, x_hat, inv_x)


def project_rows(grad_hat: Tensor, x_hat: Tensor, inv_norm: Tensor) -> Tensor:
    """d/dx from d/dx_hat through x_hat = x / ||x||: (I - x_hat x_hat^T) / ||x||."""
    radial = (grad_hat * x_hat).sum(1, keepdim=True)
    return grad_hat.sub_(x_hat * radial).mul_(inv_norm[:, None])


class TargetColumns(NamedTuple):
    """The target proxies of a batch, normalised."""

    w_hat: Tensor  # (B, D) normalised target proxies, in the accumulation dtype
    inv_norm: Tensor  # (B,) their inverse norms
    has_target: Tensor  # (B,) bool: False where target = -1


def target_columns(weight: Tensor, target: Tensor, acc, op) -> TargetColumns:
    """Normalised target proxies (B, D) in ``acc`` (from their values rounded to the operand
    dtype ``op``), their inverse norms and a row mask."""
    has_target = target >= 0
    safe = torch.where(has_target, target, torch.zeros_like(target))
    w_y = weight.index_select(1, safe).t().to(op).to(acc)
    inv_norm = torch.rsqrt(torch.clamp_min((w_y * w_y).sum(1), EPS))
    return TargetColumns(w_y * inv_norm[:, None], inv_norm, has_target)


def unit_target_cosine(x_hat: Tensor, weight: Tensor, target: Tensor, op) -> Tensor:
    """(B,) <x_hat_i, w_hat_y> clamped to [-1, 1] in x_hat's dtype; 0 where target = -1."""
    w_y, _, has_target = target_columns(weight, target, x_hat.dtype, op)
    cos_y = (x_hat * w_y).sum(1).clamp(-1.0, 1.0)
    return torch.where(has_target, cos_y, torch.zeros_like(cos_y))


def add_target_grad(x_hat, weight, target, grad_cos, grad_hat, grad_w, op) -> None:
    """The target column's gradient (in place): d cos_y / d x_hat into ``grad_hat`` (may be
    None) and d cos_y / d w_y, through w's normalisation, into ``grad_w`` (may be None).

    No gradient mask at the clamp: the true cosine never leaves [-1, 1] (both vectors are
    normalised here), so only rounding can push it past +-1, and a mask would then be a
    coin toss between accumulation orders. The clamp bounds the value; the derivative
    is the smooth one (finite: the transforms are polynomials in c)."""
    w_y, inv_norm_y, has_target = target_columns(weight, target, x_hat.dtype, op)
    gc = torch.where(has_target, grad_cos, torch.zeros_like(grad_cos))
    if grad_hat is not None:
        grad_hat += gc[:, None] * w_y
    if grad_w is not None:
        g_wy = gc[:, None] * x_hat
        g_wy = (g_wy - w_y * (g_wy * w_y).sum(1, keepdim=True)) * inv_norm_y[:, None]
        safe = torch.where(has_target, target, torch.zeros_like(target))
        add_columns_(grad_w, safe, g_wy.t().to(weight.dtype))


def round_operand(t: Tensor, op: torch.dtype, dim: int):
    """(t rounded to the operand dtype ``op``, back in t's dtype; scale or None).

    float16 operands are first divided by their largest magnitude along ``dim`` (as the
    pair kernels do), so that neither overflow nor underflow touches them; the matmul's
    float32 result is multiplied back by the returned scale."""
    if op == t.dtype:
        return t, None
    if op == torch.float16:
        scale = t.abs().amax(dim, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return (t / scale).to(op).to(t.dtype), scale
    return t.to(op).to(t.dtype), None


__all__ = [
    "round_operand",
    "add_columns_",
    "add_columns_deterministic_",
    "add_rows_",
    "add_rows_deterministic_",
    "uses_sorted_add",
    "KINDS",
    "Operands",
    "TargetColumns",
    "add_target_grad",
    "class_operand_dtype",
    "operands",
    "project_rows",
    "target_columns",
    "unit_rows",
    "unit_target_cosine",
]
