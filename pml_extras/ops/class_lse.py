"""Blockwise cosine-classifier logsumexp that never materialises the B x C logits.

Every class-level loss in this package has the shape

    loss_i = softplus( logsumexp_{j != y_i} z_ij  -  f(c_iy) )

where c_ij = <x_i, w_j> / (||x_i|| ||w_j||) is the cosine between embedding i and
class proxy j (both normalised here), z_ij = g(c_ij) is a cheap elementwise transform of
it, and f acts on the target cosine only. The B x C part is just "transform, then logsumexp over the
non-target columns"; the target term lives on (B,) tensors and is left to autograd.

``class_logsumexp`` computes, in one pass over class chunks,

* ``lse``   (B,) float32 or wider: logsumexp_{j != y_i} g(c_ij)
* ``cos_y`` (B,) float32 or wider: the target cosine c_iy (0 where the row has no target)

and its backward recomputes each chunk. The gradient of the target column is added
into the same dW buffer as the rest, so at most one C-sized gradient ever exists.

Precision (the operand policy, :func:`operand_dtype`, the same in both implementations):
the matmul operands are the autocast dtype under ``torch.autocast``, else the embeddings'
dtype when it is bf16/fp16, else float32 (IEEE, or TF32 when torch's float32 matmul
setting allows it). W is never copied: each tile of it is rounded to the operand dtype
where it is read. Products accumulate in float32. Embeddings are normalised outside the
matmul: the dot takes the raw rows (rounded to the operand dtype) and its float32 result
is scaled by float32 inverse norms of both sides; the gradient's radial part is removed
in float32 before anything is rounded to the input dtype. The logsumexp, the target
cosine and every normalisation factor stay in float32 (float64 for float64 inputs). The
PyTorch path computes the same products by rounding the operands and multiplying the
rounded values in float32 (exact products, float32 sums), so the two stay like for like.

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

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._compat import get_autocast_dtype, is_autocast_enabled
from .._validation import _compile_opt_out

# impl dispatch and the kernels' self-check live in dispatch.py; re-exported here.
from .dispatch import resolve_impl, triton_available  # noqa: F401

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


def operand_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the class-level matmul operands (the operand policy).

    * float64 if either input is float64 (the PyTorch path only);
    * under ``torch.autocast`` for x's device type, the autocast dtype;
    * bfloat16 / float16 embeddings: their dtype (W's tiles are rounded to it where they
      are read, never as a full copy of W);
    * float32 otherwise, as IEEE or TF32 dots following torch's own float32 matmul setting.

    Products accumulate in float32 (float64 for float64) whatever the operands; the
    normalisation factors, the logsumexp, the target cosine and the loss stay there too.
    """
    if torch.float64 in (x.dtype, weight.dtype):
        return torch.float64
    device_type = x.device.type
    if is_autocast_enabled(device_type):
        return get_autocast_dtype(device_type)
    if x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    return torch.float32


def accumulate_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """float32, or float64 when the inputs are float64: never below float32."""
    return torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The promoted input dtype (``resolve_impl`` keeps float64 on the torch path)."""
    return torch.promote_types(x.dtype, weight.dtype)


def unit_rows(x: Tensor, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(x_hat, inv_norm): x's rows normalised in ``acc`` and their (B,) inverse norms.

    ``x`` holds the operand values (already rounded). The norm floor is the proxies' one:
    rsqrt(max(sum x^2, 1e-12)). The normalisation is
    applied outside the matmul (to its float32 result, and to the gradient afterwards):
    with half inputs the gradient w.r.t. the unit vector has a large radial part near
    cos = +-1 that only the normalisation's backward removes, and that part would overflow
    fp16 if it were ever rounded to it."""
    xf = x.to(acc)
    inv = torch.rsqrt(torch.clamp_min((xf * xf).sum(1), _EPS))
    return xf * inv[:, None], inv


def _project_rows(grad_hat: Tensor, x_hat: Tensor, inv_norm: Tensor) -> Tensor:
    """d/dx from d/dx_hat through x_hat = x / ||x||: (I - x_hat x_hat^T) / ||x||."""
    radial = (grad_hat * x_hat).sum(1, keepdim=True)
    return grad_hat.sub_(x_hat * radial).mul_(inv_norm[:, None])


def _target_columns(weight: Tensor, target: Tensor, acc, op) -> Tuple[Tensor, Tensor, Tensor]:
    """Normalised target proxies (B, D) in ``acc`` (from their values rounded to the operand
    dtype ``op``), their inverse norms and a row mask."""
    has_target = target >= 0
    safe = torch.where(has_target, target, torch.zeros_like(target))
    w_y = weight.index_select(1, safe).t().to(op).to(acc)
    inv_norm = torch.rsqrt(torch.clamp_min((w_y * w_y).sum(1), _EPS))
    return w_y * inv_norm[:, None], inv_norm, has_target


def _unit_target_cosine(x_hat: Tensor, weight: Tensor, target: Tensor, op) -> Tensor:
    """(B,) <x_hat_i, w_hat_y> clamped to [-1, 1] in x_hat's dtype; 0 where target = -1."""
    w_y, _, has_target = _target_columns(weight, target, x_hat.dtype, op)
    cos_y = (x_hat * w_y).sum(1).clamp(-1.0, 1.0)
    return torch.where(has_target, cos_y, torch.zeros_like(cos_y))


def _add_target_grad(x_hat, weight, target, grad_cos, grad_hat, grad_w, op) -> None:
    """The target column's gradient (in place): d cos_y / d x_hat into ``grad_hat`` (may be
    None) and d cos_y / d w_y, through w's normalisation, into ``grad_w`` (may be None).

    No gradient mask at the clamp: the true cosine never leaves [-1, 1] (both vectors are
    normalised here), so only rounding can push it past +-1, and a mask would then be a
    coin toss between accumulation orders. The clamp bounds the value; the derivative
    is the smooth one (finite: the transforms are polynomials in c)."""
    w_y, inv_norm_y, has_target = _target_columns(weight, target, x_hat.dtype, op)
    gc = torch.where(has_target, grad_cos, torch.zeros_like(grad_cos))
    if grad_hat is not None:
        grad_hat += gc[:, None] * w_y
    if grad_w is not None:
        g_wy = gc[:, None] * x_hat
        g_wy = (g_wy - w_y * (g_wy * w_y).sum(1, keepdim=True)) * inv_norm_y[:, None]
        safe = torch.where(has_target, target, torch.zeros_like(target))
        grad_w.index_add_(1, safe, g_wy.t().to(weight.dtype))


def _round_operand(t: Tensor, op: torch.dtype, dim: int):
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
    inv_norm = torch.rsqrt(torch.clamp_min((wf * wf).sum(0), _EPS))
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


def operands(x: Tensor, weight: Tensor, op: Optional[torch.dtype] = None):
    """(op, acc, x_op, x_hat, inv_x): the operand dtype (``operand_dtype`` when None), the
    accumulation dtype, x rounded to ``op``, its normalised rows in ``acc`` and their
    inverse norms. Shared by both implementations, so that they normalise alike."""
    op = operand_dtype(x, weight) if op is None else op
    acc = accumulate_dtype(x, weight)
    x_op = x.to(op)
    x_hat, inv_x = unit_rows(x_op, acc)
    return op, acc, x_op, x_hat, inv_x


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
    return lse, _unit_target_cosine(x_hat, weight, target, op)


@torch.no_grad()
def target_cosine(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """(B,) cosine between each row of ``x`` and its target proxy, no gradient: the cosine
    of the two vectors rounded to :func:`operand_dtype` (as ``class_logsumexp``'s cos_y),
    computed in float32 or wider. Rows whose target is -1 get 0. Costs one gather of B
    proxies, not a pass over C.
    """
    op, _, _, x_hat, _ = operands(x, weight)
    return _unit_target_cosine(x_hat, weight, target.long(), op)


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
        # bounds the value only (see _add_target_grad).
        g = z.sub_(lse_safe).exp_().mul_(dz).mul_(grad_lse[:, None])
        del dz, z
        # Both gradient matmuls take the operand dtype too: G and w_hat rounded to it
        # (fp16: G scaled into [-1, 1] first), float32 products and sums.
        g_op, g_scale = _round_operand(g, op, 1)
        part = g_op @ w_hat.t().to(op).to(acc)  # |w_hat| <= 1: no scaling needed
        grad_hat += part if g_scale is None else part.mul_(g_scale)
        # grad_w_hat_j = sum_i G_ij x_hat_i = sum_i (G_ij / ||x_i||) x_i.
        if op == acc:
            grad_w_hat = x_hat.t() @ g
        else:
            gx_op, gx_scale = _round_operand(g * inv_x[:, None], op, 0)
            grad_w_hat = xv.t() @ gx_op
            if gx_scale is not None:
                grad_w_hat.mul_(gx_scale)
        del g, raw
        # Project out the radial part: d(w/||w||)/dw = (I - w_hat w_hat^T) / ||w||.
        radial = (grad_w_hat * w_hat).sum(0)
        grad_w[:, start : start + chunk] = grad_w_hat.sub_(w_hat * radial).mul_(inv_norm)
    _add_target_grad(x_hat, weight, target, grad_cos, grad_hat, grad_w, op)
    return _project_rows(grad_hat, x_hat, inv_x).to(x.dtype), grad_w


class _ClassLogSumExp(torch.autograd.Function):
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
            else:
                grad_x, grad_w = _backward_torch(
                    x, weight, target, row_param, kind, p0, p1, chunk, lse, grad_lse, grad_cos, op
                )
        return grad_x, grad_w, None, None, None, None, None, None, None, None


# Dynamo cannot trace the Triton launchers (host-side grid and config arithmetic; under
# TRITON_INTERPRET=1 it would trace the interpreter itself and fail), so under
# torch.compile the Triton path opts out: one graph break, run eagerly, autograd intact.
# The PyTorch path stays traceable.
@_compile_opt_out("pml_extras runs its fused Triton kernels eagerly; impl='torch' can be traced")
def apply_eagerly(function, *args):
    """``function.apply(*args)`` outside torch.compile's graph."""
    return function.apply(*args)


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
        x: (B, D) embeddings, any float dtype; normalised here (float32 inverse norms
            applied outside the matmul), so unit rows and raw ones give the same result.
        weight: (D, C) class proxies, *not* normalised (columns are normalised per tile).
        target: (B,) int64 target column per row, or -1 for none.
        kind: "circle", "curricular" or "scaled" (see the module docstring).
        p0, p1: the transform's scalars; ``p1`` may be a 0-d tensor (CurricularFace's t,
            which lives on the device and should not force a host sync).
        row_param: (B,) float32, needed by "curricular" (the hard-example threshold).
        chunk_size: classes per block; default keeps B x chunk around 4M elements.
        impl: "auto" (Triton on CUDA when available, else PyTorch), "torch" or "triton".
            Both follow the same operand policy (:func:`operand_dtype`): the matmul
            operands take the autocast dtype under ``torch.autocast``, else the
            embeddings' dtype when it is bf16/fp16, else float32 (IEEE or TF32 as torch's
            float32 matmul setting says); W keeps its dtype and is rounded tile by tile;
            products accumulate in float32, and the normalisation, logsumexp and target
            cosine stay in float32 (float64 for float64 inputs, PyTorch path only).

    Returns:
        (lse, cos_y): both (B,) in float32 (float64 for float64 inputs), differentiable
        w.r.t. ``x`` and ``weight``; the gradients come back in their dtypes.

    Example:
        >>> x, W = torch.randn(8, 16), torch.randn(16, 100)
        >>> lse, cos_y = class_logsumexp(x, W, torch.randint(0, 100, (8,)), "scaled", 64.0)
        >>> lse.shape, cos_y.dtype
        (torch.Size([8]), torch.float32)
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
    op = operand_dtype(x, weight)
    impl = resolve_impl(impl, x.device, _compute_dtype(x, weight), family="class_lse", operand=op)
    acc = accumulate_dtype(x, weight)
    p1 = p1.detach().to(device=x.device, dtype=acc) if torch.is_tensor(p1) else float(p1)
    args = (x, weight, target.long(), row_param.detach().to(acc), kind, float(p0), p1)
    # Read here, under the caller's autocast state; the Function runs with autocast off.
    args += (int(chunk_size), impl, op)
    if impl == "triton":
        return apply_eagerly(_ClassLogSumExp, *args)
    return _ClassLogSumExp.apply(*args)
