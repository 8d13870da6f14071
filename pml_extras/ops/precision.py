"""The operand policy of every fused op (class-level and pair-level alike), written once.

A leaf: it imports only torch and the version shims of :mod:`pml_extras._compat`, so that
the PyTorch paths, the Triton launchers, the dispatcher and the self-check can all read one
rule without importing each other.

The policy (:func:`operand_dtype`), for matmul operands of embeddings (and proxies):

* float64 if any input is float64 (the PyTorch path only);
* under ``torch.autocast`` for the inputs' device type: the autocast dtype;
* embeddings that are all bfloat16 (or all float16): that dtype (proxies, if any, are
  rounded to it tile by tile where they are read, never copied);
* float32 otherwise, as IEEE or TF32 dots following torch's own float32 matmul setting
  (:func:`tf32_enabled`).

Products accumulate in :func:`accumulate_dtype`: float32, or float64 for float64 inputs,
never narrower; logsumexp, softplus, normalisation factors and losses stay there too.

Example:
    >>> x = torch.randn(4, 8)
    >>> operand_dtype(x), accumulate_dtype(x)
    (torch.float32, torch.float32)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     operand_dtype(x)
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _compat

# Norm floor: rsqrt(max(sum x^2, EPS)) for embeddings and proxies, in both paths.
EPS = 1e-12
# The operand dtypes the Triton kernels take (float64 stays on the PyTorch path).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)


def accumulate_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: never narrower than float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The inputs' promoted dtype (``resolve_impl`` keeps float64 on the PyTorch path)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def operand_dtype(*embeddings: Tensor, proxies: Sequence[Tensor] = ()) -> torch.dtype:
    """The matmul operand dtype of ``embeddings`` (against ``proxies``): the policy above.

    Class-level ops pass ``(x, proxies=(W,))``; pair-level ops pass both embedding sets
    ``(x, y)``: two bf16 sets multiply in bf16, a bf16 and a float32 set in float32 (the
    dtype the two would promote to), and autocast decides for both families alike.
    """
    dtypes = [t.dtype for t in embeddings] + [t.dtype for t in proxies]
    if torch.float64 in dtypes:
        return torch.float64
    device_type = embeddings[0].device.type
    if autocast_enabled(device_type):
        return autocast_dtype(device_type)
    first = embeddings[0].dtype
    if first in _HALF and all(t.dtype == first for t in embeddings):
        return first
    return torch.float32


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (a shim across torch releases,
    :mod:`pml_extras._compat`)."""
    return _compat.is_autocast_enabled(device_type)


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype ``torch.autocast`` casts to on ``device_type``."""
    return _compat.get_autocast_dtype(device_type)


def _matmul_backend():
    """torch.backends.cuda.matmul (a function, so that tests can stand in either API)."""
    return torch.backends.cuda.matmul


def tf32_enabled() -> bool:
    """Whether torch's float32 matmuls may use TF32, read without raising.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or
    "none": inherit ``torch.backends.fp32_precision``, which its getter already resolves).
    After a user sets it, reading the legacy ``allow_tf32`` raises ``RuntimeError`` (torch
    2.13: "mix of the legacy and new APIs"), so the new switch is read first and the
    legacy one only where the new one says nothing."""
    matmul = _matmul_backend()
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # a mixed state torch cannot resolve: PyTorch's default, IEEE
        return False


@contextlib.contextmanager
def fp32_matmul_precision(precision: str):
    """Set torch's float32 matmul precision ("ieee" or "tf32") inside a ``with`` block and
    restore the previous setting after, through whichever API this torch offers."""
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    matmul = _matmul_backend()
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = precision
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:  # torch < 2.9: only the legacy switch
        old = matmul.allow_tf32
        matmul.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def dtype_label(dtype: torch.dtype, tf32: Optional[bool] = False) -> str:
    """'bfloat16', 'float32', or 'float32+tf32' when TF32 dots are meant."""
    name = str(dtype).replace("torch.", "")
    return f"{name}+tf32" if dtype == torch.float32 and tf32 else name


__all__ = [
    "EPS",
    "TRITON_DTYPES",
    "accumulate_dtype",
    "autocast_dtype",
    "autocast_enabled",
    "compute_dtype",
    "dtype_label",
    "fp32_matmul_precision",
    "operand_dtype",
    "tf32_enabled",
]
