"""Blockwise cosine-classifier logsumexp that never materialises the B x C logits.

Every class-level loss in this package has the shape

    loss_i = softplus( logsumexp_{j != y_i} z_ij  -  f(c_iy) )

where c_ij = <x_i, w_j> / ||w_j|| is the cosine between a normalised embedding and
class proxy j, z_ij = g(c_ij) is a cheap elementwise transform of it, and f acts on
the target cosine only. The B x C part is just "transform, then logsumexp over the
non-target columns"; the target term lives on (B,) tensors and is left to autograd.

``class_logsumexp`` computes, in one pass over class chunks,

* ``lse``   (B,) float32 or wider: logsumexp_{j != y_i} g(c_ij)
* ``cos_y`` (B,) float32 or wider: the target cosine c_iy (0 where the row has no target)

and its backward recomputes each chunk. The gradient of the target column is added
into the same dW buffer as the rest, so at most one C-sized gradient ever exists.

Transforms (``kind``), with p0/p1 scalars and ``row_param`` a per-row tensor:

* ``"circle"``     g(c) = p0 * [c + p1]_+ * (c - p1)                  (p0=gamma, p1=m)
                   with the weight [c + m]_+ detached, as in the paper.
* ``"curricular"`` g(c) = p0 * (c * (p1 + c) if c > row_param_i else c)  (p0=s, p1=t,
                   row_param = cos(theta_y + m)); the hard-example mask has no gradient.
* ``"scaled"``     g(c) = p0 * c   (ArcFace / CosFace / normalised softmax negatives).

Targets equal to -1 mean "this row's class is not among these columns" (used by the
class-sharded distributed losses); such rows get cos_y = 0 and no target masking.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._validation import _compile_opt_out

KINDS = ("circle", "curricular", "scaled")
IMPLS = ("auto", "torch", "triton")

# Temporaries per chunk are B x chunk float32; ~16 MB keeps CPU caches and GPU
# allocators happy while leaving the matmuls large enough to be efficient.
_CHUNK_ELEMS = 1 << 22
_EPS = 1e-12


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


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def accumulate_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """float32, or float64 when the inputs are float64: never below float32."""
    return torch.promote_types(_compute_dtype(x, weight), torch.float32)


def _target_columns(weight: Tensor, target: Tensor, acc) -> Tuple[Tensor, Tensor, Tensor]:
    """Normalised target proxies (B, D) in ``acc``, their inverse norms and a row mask."""
    has_target = target >= 0
    safe = torch.where(has_target, target, torch.zeros_like(target))
    w_y = weight.index_select(1, safe).t().to(acc)
    inv_norm = torch.rsqrt(torch.clamp_min((w_y * w_y).sum(1), _EPS))
    return w_y * inv_norm[:, None], inv_norm, has_target


def _chunk_cosines(xc, w, acc):
    """Raw cosines (B, n) in ``acc``, normalised proxies w_hat (D, n) and their inverse norms.

    Full-precision inputs multiply by w_hat directly, which saves a pass over the B x n
    block; half inputs keep the half matmul and scale the product afterwards.
    """
    wf = w.to(acc)
    inv_norm = torch.rsqrt(torch.clamp_min((wf * wf).sum(0), _EPS))
    w_hat = wf * inv_norm
    if xc.dtype == acc:
        return xc @ w_hat, w_hat, inv_norm
    return (xc @ w.to(xc.dtype)).to(acc).mul_(inv_norm), w_hat, inv_norm


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


def _forward_torch(x, weight, target, row_param, kind, p0, p1, chunk):
    batch, num_classes = x.shape[0], weight.shape[1]
    cdtype, acc = _compute_dtype(x, weight), accumulate_dtype(x, weight)
    xc = x.to(cdtype)
    lse = torch.full((batch,), float("-inf"), device=x.device, dtype=acc)
    for start in range(0, num_classes, chunk):
        c, _, _ = _chunk_cosines(xc, weight[:, start : start + chunk], acc)
        z = _logits_inplace(kind, c.clamp_(-1.0, 1.0), row_param, p0, p1)
        z = _mask_target_(z, target, start)
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
    return lse, target_cosine(x, weight, target)


@torch.no_grad()
def target_cosine(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """(B,) cosine between each normalised row of ``x`` and its target proxy, no gradient.

    Rows whose target is -1 get 0. Costs one gather of B proxies, not a pass over C.
    """
    acc = accumulate_dtype(x, weight)
    w_y, _, has_target = _target_columns(weight, target.long(), acc)
    cos_y = (x.to(acc) * w_y).sum(1).clamp(-1.0, 1.0)
    return torch.where(has_target, cos_y, torch.zeros_like(cos_y))


def _backward_torch(x, weight, target, row_param, kind, p0, p1, chunk, lse, grad_lse, grad_cos):
    num_classes = weight.shape[1]
    cdtype, acc = _compute_dtype(x, weight), accumulate_dtype(x, weight)
    xc = x.to(cdtype)
    xf = x.to(acc)
    grad_x = torch.zeros(x.shape, device=x.device, dtype=acc)
    grad_w = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    # Rows whose negatives are all masked have lse = -inf and every p_ij = 0.
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[:, None]
    for start in range(0, num_classes, chunk):
        raw, w_hat, inv_norm = _chunk_cosines(xc, weight[:, start : start + chunk], acc)
        c = raw.clamp(-1.0, 1.0)
        clamped = c != raw  # clamp passes no gradient outside [-1, 1]
        del raw
        z, dz = transform(kind, c, row_param, p0, p1)
        del c
        z = _mask_target_(z, target, start)
        # d lse_i / d c_ij = softmax_ij * g'(c_ij), computed in place over z.
        g = z.sub_(lse_safe).exp_().mul_(dz).mul_(grad_lse[:, None])
        g.masked_fill_(clamped, 0.0)
        del dz, clamped
        grad_x += g @ w_hat.t()
        grad_w_hat = xf.t() @ g
        # Project out the radial part: d(w/||w||)/dw = (I - w_hat w_hat^T) / ||w||.
        radial = (grad_w_hat * w_hat).sum(0)
        grad_w[:, start : start + chunk] = grad_w_hat.sub_(w_hat * radial).mul_(inv_norm)
    w_y, inv_norm_y, has_target = _target_columns(weight, target, acc)
    gc = torch.where(has_target, grad_cos, torch.zeros_like(grad_cos))
    cos_raw = (xf * w_y).sum(1)
    gc = gc * ((cos_raw >= -1.0) & (cos_raw <= 1.0))
    grad_x += gc[:, None] * w_y
    g_wy = gc[:, None] * xf
    g_wy = (g_wy - w_y * (g_wy * w_y).sum(1, keepdim=True)) * inv_norm_y[:, None]
    safe = torch.where(has_target, target, torch.zeros_like(target))
    grad_w.index_add_(1, safe, g_wy.t().to(weight.dtype))
    return grad_x.to(x.dtype), grad_w


class _ClassLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, row_param, kind, p0, p1, chunk, impl):
        x_d, w_d = x.detach(), weight.detach()
        state = ()
        if impl == "triton":
            from . import class_lse_triton

            # When x needs a gradient the kernels also return d lse / d x and the class
            # inverse norms, which spares the backward a second pass over W.
            out = class_lse_triton.forward(
                x_d, w_d, target, row_param, kind, p0, p1, need_state=ctx.needs_input_grad[0]
            )
            lse, cos_y = out[0], out[1]
            state = tuple(out[2]) if len(out) > 2 else ()
        else:
            lse, cos_y = _forward_torch(x_d, w_d, target, row_param, kind, p0, p1, chunk)
        ctx.save_for_backward(x_d, w_d, target, row_param, lse, *state)
        ctx.args = (kind, p0, p1, chunk, impl)
        return lse, cos_y

    @staticmethod
    def backward(ctx, grad_lse, grad_cos):
        x, weight, target, row_param, lse, *state = ctx.saved_tensors
        kind, p0, p1, chunk, impl = ctx.args
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
        grad_cos = torch.zeros_like(lse) if grad_cos is None else grad_cos.to(lse.dtype)
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
            )
        else:
            grad_x, grad_w = _backward_torch(
                x, weight, target, row_param, kind, p0, p1, chunk, lse, grad_lse, grad_cos
            )
        return grad_x, grad_w, None, None, None, None, None, None, None


# Dynamo cannot trace the Triton launchers (host-side grid and config arithmetic; under
# TRITON_INTERPRET=1 it would trace the interpreter itself and fail), so under
# torch.compile the Triton path opts out: one graph break, run eagerly, autograd intact.
# The PyTorch path stays traceable.
@_compile_opt_out("pml_extras runs its fused Triton kernels eagerly; impl='torch' can be traced")
def apply_eagerly(function, *args):
    """``function.apply(*args)`` outside torch.compile's graph."""
    return function.apply(*args)


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from . import class_lse_triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_impl(impl: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """``dtype``: the inputs' promoted dtype; "auto" keeps float64 on the torch path."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type != "cuda" or dtype == torch.float64:
            return "torch"
        return "triton" if triton_available(device) else "torch"
    if impl == "triton" and not triton_available(device):
        raise RuntimeError(
            "impl='triton' needs the triton package and a CUDA tensor "
            "(or TRITON_INTERPRET=1 on CPU); use impl='torch' or 'auto'"
        )
    return impl


def class_logsumexp(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    kind: str,
    p0: float,
    p1=0.0,
    row_param: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Masked logsumexp of transformed cosine logits, computed blockwise over classes.

    Args:
        x: (B, D) L2-normalised embeddings (any float dtype).
        weight: (D, C) class proxies, *not* normalised (columns are normalised per chunk).
        target: (B,) int64 target column per row, or -1 for none.
        kind: "circle", "curricular" or "scaled" (see the module docstring).
        p0, p1: the transform's scalars; ``p1`` may be a 0-d tensor (CurricularFace's t,
            which lives on the device and should not force a host sync).
        row_param: (B,) float32, needed by "curricular" (the hard-example threshold).
        chunk_size: classes per block; default keeps B x chunk around 4M elements.
        impl: "auto" (Triton on CUDA when available, else PyTorch), "torch" or "triton".

    Returns:
        (lse, cos_y): both (B,) in float32 (float64 for float64 inputs), differentiable
        w.r.t. ``x`` and ``weight``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {KINDS}")
    if kind == "curricular" and row_param is None:
        raise ValueError("kind='curricular' needs row_param (the per-row threshold)")
    batch, num_classes = x.shape[0], weight.shape[1]
    if chunk_size is None:
        chunk_size = default_chunk_size(batch, num_classes)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if row_param is None:
        row_param = torch.zeros(batch, device=x.device, dtype=torch.float32)
    impl = resolve_impl(impl, x.device, _compute_dtype(x, weight))
    acc = accumulate_dtype(x, weight)
    p1 = p1.detach().to(device=x.device, dtype=acc) if torch.is_tensor(p1) else float(p1)
    args = (x, weight, target.long(), row_param.detach().to(acc), kind, float(p0), p1)
    args += (int(chunk_size), impl)
    if impl == "triton":
        return apply_eagerly(_ClassLogSumExp, *args)
    return _ClassLogSumExp.apply(*args)
