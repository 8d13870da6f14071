"""What any fused class design can reach on the model's terms, whatever its tiles.

A class logsumexp that never stores the B x C logits multiplies B * C * D four times per
training step, against the matmul floor's three (:func:`~.class_kernels.class_floor`):

* the forward's logits;
* the backward's logits again: no softmax weight is known before lse has seen every
  class, and the weights are not kept;
* G W^T for grad x (the forward's u in today's kernels) and x^T G for grad W.

It also does the softmax's elementwise work on the CUDA cores, in both passes:
``ALU_PER_LOGIT_CLASS_FWD`` / ``_BWD`` float32 instructions and one exp2 per logit.

:func:`class_bound` puts numbers on the best such a design can do. The matmuls run at the
tensor peak, every byte is free, and the softmax is either hidden entirely under the
matmuls or not at all. It also gives what the ratio ``target`` would demand: the share of
the softmax hidden at peak, or the tensor efficiency with all of it hidden. These are
PREDICTIONS of the roofline model (its package docstring), not measurements. The floor is
at the tensor peak, so a measured floor, which cuBLAS runs below peak, gives a lower
measured ratio than these.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .class_kernels import class_floor
from .roofline import ALU_PER_LOGIT_CLASS_BWD, ALU_PER_LOGIT_CLASS_FWD, H100_SXM, Hardware


@dataclasses.dataclass(frozen=True)
class ClassBound:
    """Ratios to the matmul floor (fwd+bwd) of a design that stores no logits."""

    matmuls_s: float  # the four B*C*D matmuls at the tensor peak
    softmax_s: float  # CUDA-core time of both passes' elementwise work
    floor_s: float
    hidden: float  # ratio, the softmax entirely under the matmuls
    exposed: float  # ratio, none of it hidden (overlap 0, what the PTX shows today)
    target: float
    # Share of the softmax that must hide under the matmuls (at peak) for ``target``;
    # None when even the matmuls alone exceed it.
    overlap_needed: Optional[float]
    # Tensor-core efficiency ``target`` needs with the softmax entirely hidden.
    efficiency_needed: float


def class_bound(
    batch: int,
    classes: int,
    dim: int,
    op: str = "bf16",
    w_dtype: Optional[str] = None,
    hw: Hardware = H100_SXM,
    target: float = 1.5,
) -> ClassBound:
    """The best any fused class design can do on ``hw`` (see the module docstring)."""
    logits = float(batch) * classes
    matmul = 2.0 * logits * dim / (hw.tensor_tflops[op] * 1e12)
    alu = (ALU_PER_LOGIT_CLASS_FWD + ALU_PER_LOGIT_CLASS_BWD) * logits / hw.rate(hw.fp32_lanes)
    sfu = 2.0 * logits / hw.rate(hw.sfu_per_clk)
    softmax = max(alu, sfu)
    floor = class_floor(batch, classes, dim, op, w_dtype, hw)
    matmuls = 4.0 * matmul
    room = target * floor - matmuls
    overlap = None if room < 0 else max(0.0, 1.0 - room / softmax)
    return ClassBound(
        matmuls_s=matmuls,
        softmax_s=softmax,
        floor_s=floor,
        hidden=matmuls / floor,
        exposed=(matmuls + softmax) / floor,
        target=target,
        overlap_needed=overlap,
        efficiency_needed=matmuls / (target * floor),
    )


def describe_bound(b: ClassBound) -> str:
    """One paragraph of :class:`ClassBound`'s figures."""
    need = (
        "cannot be met even with the softmax hidden"
        if b.overlap_needed is None
        else f"needs {b.overlap_needed:.0%} of the softmax hidden under the matmuls at peak"
    )
    return (
        f"  four matmuls at peak {b.matmuls_s * 1e3:.2f} ms, softmax {b.softmax_s * 1e3:.2f} ms, "
        f"floor {b.floor_s * 1e3:.2f} ms\n"
        f"  ratio {b.hidden:.2f} with the softmax hidden, {b.exposed:.2f} with none of it "
        f"hidden\n"
        f"  {b.target}x {need}, or {b.efficiency_needed:.0%} of the tensor peak with all of "
        f"it hidden"
    )


__all__ = ["ClassBound", "class_bound", "describe_bound"]
