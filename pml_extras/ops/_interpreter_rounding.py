"""Float32 -> bfloat16 casts that round to nearest even under Triton's CPU interpreter.

On a GPU, ``t.to(tl.bfloat16)`` of a float32 tensor compiles to ``cvt.rn.bf16.f32`` (or
its ``bf16x2`` form): round to nearest, ties to even, as ``torch.Tensor.to(torch.bfloat16)``
does. Triton 3.9's interpreter (``TRITON_INTERPRET=1``) truncates instead: its
``_convert_float`` keeps the top 16 bits, with ``fp_downcast_rounding="rtne"`` too (that
path goes through the same cast). Truncation shrinks every magnitude, so the errors of a
sum of rounded terms add up instead of cancelling. Under the interpreter the kernels'
bf16 roundings (the softmax weights fed to the gradient dots, W tiles stored in float32
under autocast) were therefore biased where the GPU's are not, and CI compared that
emulation with the PyTorch path:

* bf16 x and W: gradients up to 1.5e-2 (of the largest entry) from the PyTorch path and
  9.3e-3 / 1.2e-2 (grad x / grad W) from the dense float32 oracle; rounding to nearest:
  1.1e-2, and 4.8e-3 / 1.1e-2;
* bf16 x with float32 W: lse off by up to 4.3e-3 (the logits' W operand truncated; 1.9e-7
  rounding to nearest), and gradients by up to 0.34 where a CurricularFace hard-example
  mask then flipped (1.1e-2).

(Measured over seeds 0-7 x the three transforms x the "splits" and "dgroups" layouts of
the class kernel tests' cases, tests/helpers/class_triton_cases.py, under the interpreter.)

:func:`install` replaces the interpreter's float32 -> bfloat16 conversion by a correctly
rounded one (NaN stays NaN, overflow goes to infinity, ties go to even: bit for bit what
torch gives), and only when :func:`interpreter_truncates` finds the installed interpreter
truncating, so a Triton whose interpreter already rounds is left as it is. Every other
conversion (float16 goes through numpy, which rounds) is unchanged. The package installs
it when it imports its Triton launchers with ``TRITON_INTERPRET=1`` (``_triton_common``):
the interpreter is a developer's tool, and this makes what it runs round as the device
does.
"""

from __future__ import annotations

import numpy as np

_PATCHED = "_pml_extras_rtne_bf16"


def rtne_bf16_bits(values: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns of float32 ``values``, rounded to nearest even."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    # Add half an ulp of bf16 (0x7FFF) plus the kept part's lowest bit (ties to even),
    # then drop the low 16 bits; a carry into the exponent is the correct rounding up
    # (up to infinity from the largest finite values).
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # keep NaN a (quiet) NaN: the carry could otherwise make it infinity
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def _interpreter():
    from triton.runtime import interpreter

    return interpreter


def interpreter_truncates() -> bool:
    """Whether the installed interpreter's float32 -> bfloat16 conversion truncates: it
    takes 1 + 3 * 2^-9, three quarters of the way from 1 to the next bfloat16 value, down
    to 1."""
    import triton.language as tl

    probe = np.array([1.0 + 3 * 2.0**-9], dtype=np.float32)
    out = _interpreter()._convert_float(probe, tl.float32, tl.bfloat16, None)
    return int(np.asarray(out).view(np.uint16)[0]) != int(rtne_bf16_bits(probe)[0])


def install() -> bool:
    """Make the interpreter's float32 -> bfloat16 casts round to nearest even (see the
    module docstring). Returns whether the conversion is patched now; idempotent."""
    try:
        interp = _interpreter()
        import triton.language as tl
    except ImportError:  # pragma: no cover - triton without its interpreter
        return False
    original = interp._convert_float
    if getattr(original, _PATCHED, False):
        return True
    if not interpreter_truncates():
        return False

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            return rtne_bf16_bits(np.asarray(input)).reshape(np.shape(input))
        return original(input, input_dtype, output_dtype, rounding_mode)

    setattr(convert_float, _PATCHED, True)
    convert_float.original = original
    interp._convert_float = convert_float
    return True


__all__ = ["install", "interpreter_truncates", "rtne_bf16_bits"]
