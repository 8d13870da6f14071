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

Precision (the operand policy, :func:`operand_dtype`, the same in both implementations and
for the pair-level ops: :mod:`~pml_extras.ops.precision`):
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

from . import precision
from ._launch import apply_eagerly  # noqa: F401  (re-exported: its old home)
from .class_common import (  # noqa: F401  (re-exported: their old homes)
    KINDS,
    Operands,
    add_target_grad,
    operands,
    project_rows,
    target_columns,
    unit_rows,
    unit_target_cosine,
)
from .class_lse_autograd import (  # noqa: F401  (re-exported: their old homes)
    ClassLogSumExp,
    _backward_torch,
    _chunk_cosines,
    _forward_torch,
    apply_class_lse,
    default_chunk_size,
    transform,
)
from .dispatch import IMPLS, resolve_impl, triton_available  # noqa: F401
from .precision import EPS as _EPS  # noqa: F401

# Old private names of the shared helpers (now public in class_common).
_add_target_grad = add_target_grad
_project_rows = project_rows
_target_columns = target_columns
_unit_target_cosine = unit_target_cosine
_ClassLogSumExp = ClassLogSumExp


def operand_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the class-level matmul operands (the operand policy,
    :func:`pml_extras.ops.precision.operand_dtype`, with W as the proxies).

    * float64 if either input is float64 (the PyTorch path only);
    * under ``torch.autocast`` for x's device type, the autocast dtype;
    * bfloat16 / float16 embeddings: their dtype (W's tiles are rounded to it where they
      are read, never as a full copy of W);
    * float32 otherwise, as IEEE or TF32 dots following torch's own float32 matmul setting.

    Products accumulate in float32 (float64 for float64) whatever the operands; the
    normalisation factors, the logsumexp, the target cosine and the loss stay there too.
    """
    return precision.operand_dtype(x, proxies=(weight,))


def accumulate_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """float32, or float64 when the inputs are float64: never below float32."""
    return precision.accumulate_dtype(x, weight)


@torch.no_grad()
def target_cosine(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """(B,) cosine between each row of ``x`` and its target proxy, no gradient: the cosine
    of the two vectors rounded to :func:`operand_dtype` (as ``class_logsumexp``'s cos_y),
    computed in float32 or wider. Rows whose target is -1 get 0. Costs one gather of B
    proxies, not a pass over C.
    """
    ops = operands(x, weight)
    return unit_target_cosine(ops.x_hat, weight, target.long(), ops.op)


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
        impl: "auto" (on CUDA, Triton or the hybrid, whichever the cost model predicts
            faster for these shapes, :func:`~pml_extras.ops.dispatch.model_choice`; else
            PyTorch), "torch", "triton", or "hybrid" (library matmuls + fused Triton
            epilogues, :mod:`class_lse_hybrid`).
            All follow the same operand policy (:func:`operand_dtype`): the matmul
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
    op = operand_dtype(x, weight)  # read here, under the caller's autocast state
    compute = precision.compute_dtype(x, weight)
    impl = resolve_impl(
        impl,
        x.device,
        compute,
        family="class_lse",
        operand=op,
        storage=weight.dtype,
        shape=(batch, num_classes, x.shape[1]),
    )
    return apply_class_lse(x, weight, target, kind, p0, p1, row_param, chunk_size, impl, op)


__all__ = [
    "IMPLS",
    "KINDS",
    "class_logsumexp",
    "default_chunk_size",
    "operand_dtype",
    "target_cosine",
]
