"""pml_extras/ops/_interpreter_rounding.py: float32 -> bfloat16 casts under Triton's CPU
interpreter round to nearest even, as the GPU's ``cvt.rn.bf16.f32`` and torch do.

The oracle is torch's own ``.to(torch.bfloat16)``. The interpreted kernels' side (a cast
inside a ``@triton.jit`` kernel under TRITON_INTERPRET=1) is checked in the interpreter
child (tests/ops/test_class_lse_triton.py, ``test_bf16_cast_rounds_as_the_gpu``), and the
GPU's side in the sm_90a PTX (tests/gpu/test_sm90_spills.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_extras.ops import _interpreter_rounding as ir

try:
    import triton.language as tl
    from triton.runtime import interpreter
except ImportError:  # pragma: no cover - triton is a test dependency on Linux
    interpreter = tl = None

needs_triton = pytest.mark.skipif(interpreter is None, reason="triton is not installed")

# Ties (the low 16 bits exactly 0x8000) to even in both directions, just past and just
# short of a tie, the largest finite float32 (rounds to inf), the largest value that stays
# finite, subnormals, signed zeros, infinities and NaNs (quiet, signalling, negative).
EDGE_BITS = [
    0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0xBF818000,
    0x7F7FFFFF, 0x7F7F7FFF, 0xFF7FFFFF, 0x00000001, 0x00008000, 0x00018000, 0x807FFFFF,
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,
]  # fmt: skip


def _torch_bits(bits: np.ndarray) -> np.ndarray:
    values = torch.from_numpy(bits.astype(np.uint32).view(np.float32).copy())
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _same(ours: np.ndarray, ref: np.ndarray) -> bool:
    """Bit-identical, except that any NaN matches any NaN."""
    nan = lambda b: ((b & 0x7F80) == 0x7F80) & ((b & 0x007F) != 0)  # noqa: E731
    return bool(np.all((ours == ref) | (nan(ours) & nan(ref))))


def test_edge_values_match_torch():
    bits = np.array(EDGE_BITS, dtype=np.uint32)
    ours = ir.rtne_bf16_bits(bits.view(np.float32))
    assert ours.dtype == np.uint16
    assert _same(ours, _torch_bits(bits))
    # The cases that truncation gets wrong: ties to odd round up, past a tie rounds up,
    # the largest float32 overflows to inf. Spelled out so that a truncating version fails.
    assert ours[1] == 0x3F82 and ours[2] == 0x3F81 and ours[6] == 0x7F80
    nan = ours[[17, 18, 19]]  # 0x7FC00000, 0x7F800001 (signalling), 0xFFFFFFFF
    assert np.all((nan & 0x7F80) == 0x7F80) and np.all(nan & 0x007F)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_any_float32_matches_torch(bit_patterns):
    bits = np.array(bit_patterns, dtype=np.uint32)
    assert _same(ir.rtne_bf16_bits(bits.view(np.float32)), _torch_bits(bits))


def test_random_values_of_every_scale_match_torch():
    g = np.random.default_rng(0)
    values = (g.standard_normal(20000) * 10.0 ** g.uniform(-44, 38, 20000)).astype(np.float32)
    bits = values.view(np.uint32)
    assert _same(ir.rtne_bf16_bits(values), _torch_bits(bits))


def test_shapes_are_kept():
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    assert ir.rtne_bf16_bits(values).shape == (2, 3, 4)
    assert ir.rtne_bf16_bits(np.float32(1.5)).shape == (1,)


@needs_triton
def test_install_patches_a_truncating_interpreter(monkeypatch):
    """On an interpreter that truncates (Triton 3.9's), install() replaces only the
    float32 -> bfloat16 conversion, and is idempotent; on one that rounds it leaves the
    interpreter as it is."""
    monkeypatch.setattr(interpreter, "_convert_float", interpreter._convert_float)
    original = interpreter._convert_float
    if getattr(original, "_pml_extras_rtne_bf16", False):  # installed by this process
        original = original.original
        monkeypatch.setattr(interpreter, "_convert_float", original)
    truncates = ir.interpreter_truncates()
    assert ir.install() is truncates
    if not truncates:
        assert interpreter._convert_float is original
        return
    patched = interpreter._convert_float
    assert patched is not original and ir.install() is True
    assert interpreter._convert_float is patched  # idempotent
    assert not ir.interpreter_truncates()
    bits = np.array(EDGE_BITS, dtype=np.uint32)
    values = bits.view(np.float32).reshape(4, 5)
    out = patched(values, tl.float32, tl.bfloat16, None)
    assert out.shape == (4, 5) and _same(out.reshape(-1), _torch_bits(bits))
    # Other conversions go to the interpreter's own code, unchanged.
    halves = np.array([1.0, 2.5, -3.25], dtype=np.float32)
    bf = patched(halves, tl.float32, tl.bfloat16, None)
    assert np.array_equal(
        patched(bf, tl.bfloat16, tl.float32, None), original(bf, tl.bfloat16, tl.float32, None)
    )
    small = np.array([0x0001, 0x7BFF], dtype=np.uint16).view(np.float16)
    assert np.array_equal(
        patched(small, tl.float16, tl.float32, None), original(small, tl.float16, tl.float32, None)
    )


@needs_triton
def test_the_3_9_interpreter_truncated(monkeypatch):
    """Why the module exists: the interpreter's own conversion takes 1 + 3 * 2^-9 down
    to 1 (truncation) where torch and the GPU round it up to 1 + 2^-7. If a Triton release fixes it,
    install() does nothing (the test above) and this test says so."""
    original = interpreter._convert_float
    original = getattr(original, "original", original)
    probe = np.array([1.0 + 3 * 2.0**-9], dtype=np.float32)
    theirs = np.asarray(original(probe, tl.float32, tl.bfloat16, None)).view(np.uint16)[0]
    ours = ir.rtne_bf16_bits(probe)[0]
    assert ours == 0x3F81  # 1 + 2^-7: rounded up
    if theirs == ours:
        pytest.skip("this Triton's interpreter rounds float32 -> bfloat16 correctly")
    assert theirs == 0x3F80  # 1: truncated
