"""The bf16 class backward's tiles and its Jacobian on the tensor cores
(pml_extras/ops/class_lse_triton_bwd.py: ``_jacobian_on_tensor_cores``, issue 21).

The bf16 backward accumulates (x^T G)^T and writes grad_j = inv_j acc_j - d_j w_j
(d = r inv^2) as (acc_j inv_j / d_j - w_j) d_j, a diag(-1) @ W^T dot between two per-row
scalings; rows where acc / d could overflow take d = 0. Here that epilogue runs alone
under the interpreter (``TestInterpreted*``, in the TRITON_INTERPRET=1 child of
test_class_lse_triton.py::test_interpreter_suite) against float64 math, at extremes
included; the end-to-end numbers are the class kernel tests' (bf16 runs this path).

    TRITON_INTERPRET=1 python -m pytest tests/ops/test_class_bwd_jacobian.py -k Interpreted
"""

from __future__ import annotations

import os

_CHILD = "PML_EXTRAS_TRITON_INTERPRET_CHILD"
if os.environ.get(_CHILD) == "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from class_triton_cases import clt, interpreted, needs_triton, triton  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

if clt is not None:
    import triton.language as tl

    from pml_extras.ops import class_lse_triton_bwd as bwd

    @triton.jit
    def _epilogue(ACC, W, INV, R, OUT, C: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr):
        rows = tl.arange(0, C)
        dims = tl.arange(0, D)
        acc = tl.load(ACC + rows[:, None] * D + dims[None, :])
        w = tl.load(W + dims[:, None] * C + rows[None, :]).to(tl.bfloat16).to(DOT)
        out = bwd._jacobian_on_tensor_cores(
            acc, w, tl.load(INV + rows), tl.load(R + rows), tl.bfloat16, DOT, None, C
        )
        tl.store(OUT + rows[:, None] * D + dims[None, :], out)


C, D = 16, 16


def _run(acc, w, inv, r):
    out = torch.empty_like(acc)
    _epilogue[(1,)](acc, w, inv, r, out, C=C, D=D, DOT=tl.float32)
    return out


def _reference(acc, w, inv, r):
    """float64: inv_j acc_j - (r_j inv_j^2) w_j, W at its bf16 values."""
    a, i, rr = acc.double(), inv.double(), r.double()
    wb = w.to(torch.bfloat16).double()
    return a * i[:, None] - (rr * i * i)[:, None] * wb.t()


def _case(seed, scale_exp):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randn(C, D, generator=g) * 2.0 ** float(scale_exp)
    w = torch.randn(D, C, generator=g) * (0.1 + 3 * torch.rand(C, generator=g))
    inv = 1.0 / w.to(torch.bfloat16).float().norm(dim=0)
    r = torch.randn(C, generator=g) * 2.0 ** float(scale_exp)
    return acc, w, inv, r


@interpreted
class TestInterpretedJacobian:
    @settings(max_examples=12, deadline=None)
    @given(seed=st.integers(0, 2**31 - 1), scale_exp=st.integers(-60, 60))
    def test_matches_float64(self, seed, scale_exp):
        """Ordinary rows at any scale: within a few float32 roundings of each entry's
        two terms (the kernel rounds 1/d, two products and a sum)."""
        acc, w, inv, r = _case(seed, scale_exp)
        out, ref = _run(acc, w, inv, r).double(), _reference(acc, w, inv, r)
        terms = (acc.double() * inv.double()[:, None]).abs() + (
            (r * inv * inv).double()[:, None] * w.to(torch.bfloat16).double().t()
        ).abs()
        assert torch.isfinite(out).all()
        assert ((out - ref).abs() <= 4 * 2.0**-24 * terms + 1e-45).all(), (out - ref).abs().max()

    def test_extreme_rows(self):
        """d = 0 (no correction), d below the smallest normal float32, acc far larger than
        d (acc / d would overflow), an all-zero row of acc with d != 0, and d = +-1e30:
        finite, and each within float32 rounding of the float64 value (the dropped
        corrections are below 2^-126 of the row or absolutely)."""
        acc, w, inv, r = _case(3, 0)
        r[0] = 0.0
        r[1] = 1e-39 / float(inv[1] ** 2)  # d = 1e-39, a subnormal
        acc[2] *= 1e30
        r[2] = 1e-10 / float(inv[2] ** 2)  # acc / d ~ 1e40 > float32's max
        acc[3] = 0.0
        r[4] = 1e30
        acc[5] *= 1e-30  # a tiny gradient row: its correction still counts
        r[5] = 1e-30
        out, ref = _run(acc, w, inv, r).double(), _reference(acc, w, inv, r)
        assert torch.isfinite(out).all(), out
        scale = ref.abs().amax(dim=1, keepdim=True)
        assert ((out - ref).abs() <= 1e-6 * scale + 1e-37).all(), ((out - ref).abs() / scale).max()
        # Row 3 is the correction alone, row 0 the scaled accumulator alone.
        assert torch.allclose(out[3], ref[3], rtol=1e-6, atol=0)
        assert torch.allclose(out[0], ref[0], rtol=1e-6, atol=0)
        # Row 5: the correction is of the row's size, so dropping it would fail here.
        assert ((r[5] * inv[5] ** 2).double() * w[:, 5].to(torch.bfloat16).double()).abs().max() > (
            0.1 * scale[5]
        )


@needs_triton
def test_backward_tiles_per_operand_dtype():
    """bf16 operands get 64-class backward tiles by default (twice block_c) or
    ``bwd_block_c``; float32 and float16 keep block_c."""
    cfg = clt.BlockConfig()
    assert clt._bwd_block_c(cfg, tl.bfloat16) == 2 * cfg.block_c == 64
    assert clt._bwd_block_c(cfg, tl.float32) == clt._bwd_block_c(cfg, tl.float16) == cfg.block_c
    small = clt.BlockConfig(block_c=8, bwd_block_c=16)
    assert clt._bwd_block_c(small, tl.bfloat16) == 16
    assert clt._bwd_block_c(clt.BlockConfig(block_c=8), tl.bfloat16) == 16


@needs_triton
def test_bwd_block_c_is_validated():
    with pytest.raises(ValueError, match="bwd_block_c must be a power of two, got 48"):
        clt._check_config(clt.BlockConfig(bwd_block_c=48))
    clt._check_config(clt.BlockConfig(bwd_block_c=128))
