"""The hybrid class logsumexp (pml_extras/ops/class_lse_hybrid.py): library matmuls over
class chunks plus a fused Triton epilogue. Its PyTorch parts run on CPU directly, the
epilogue under Triton's interpreter: like test_class_lse_triton.py, the interpreted tests
(class ``TestInterpretedHybrid``) run in a TRITON_INTERPRET=1 child started by
``test_interpreter_child``. Oracles: ``class_lse._forward_torch`` / ``_backward_torch``
(the same rounding points), and the float64 dense reference of tests/helpers/reference.py.

    TRITON_INTERPRET=1 python -m pytest tests/ops/test_class_lse_hybrid.py -k Interpreted
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

_CHILD = "PML_EXTRAS_HYBRID_INTERPRET_CHILD"
if os.environ.get(_CHILD) == "1":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from reference import dense_class_logsumexp  # noqa: E402

from pml_extras.ops import class_lse  # noqa: E402
from pml_extras.ops.tolerances import CLASS_KERNEL  # noqa: E402

try:
    import triton  # noqa: F401, E402

    from pml_extras.ops import class_lse_hybrid as hyb  # noqa: E402
except ImportError:  # pragma: no cover - triton is a test dependency on Linux
    hyb = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRET or hyb is None, reason="runs in the TRITON_INTERPRET=1 child"
)
KINDS = [("circle", 64.0, 0.25), ("curricular", 16.0, 0.3), ("scaled", 30.0, 0.0)]


def test_interpreter_child():
    if INTERPRET:
        pytest.skip("already under TRITON_INTERPRET=1")
    if hyb is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD: "1"})
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-rfEs"]
    cmd += ["-p", "no:cacheprovider", "-o", "addopts=", "-k", "Interpreted"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreted hybrid tests failed:\n{out[-6000:]}"
    passed = re.search(r"(\d+) passed", out.strip().splitlines()[-1])
    assert passed and int(passed.group(1)) >= 20, out[-3000:]


def _problem(batch, dim, classes, dtype, seed=0):
    """x, W (both in ``dtype``), targets with a -1 row, and two extreme rows: row 0 equal
    to its own proxy (cos = +1 on the target), row 1 opposite to a negative (cos = -1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    target = torch.randint(0, classes, (batch,), generator=g)
    w[:, target[0]] = 2.0 * x[0]
    w[:, (target[1] + 1) % classes] = -0.5 * x[1]
    target[2] = -1
    row_param = torch.rand(batch, generator=g) - 0.5
    return x.to(dtype), w.to(dtype), target, row_param


def _both(x, w, target, row_param, kind, p0, p1, chunk, op=None):
    """((lse, cos_y, grad_x, grad_w) torch path, the same hybrid) for random upstream grads."""
    g = torch.Generator().manual_seed(1)
    grad_lse = torch.randn(x.shape[0], generator=g)
    grad_cos = torch.randn(x.shape[0], generator=g)
    lse, cos_y = class_lse._forward_torch(x, w, target, row_param, kind, p0, p1, chunk, op)
    ref = (lse, cos_y) + class_lse._backward_torch(
        x, w, target, row_param, kind, p0, p1, chunk, lse, grad_lse, grad_cos, op
    )
    h_lse, h_cos = hyb.forward(x, w, target, row_param, kind, p0, p1, op_dtype=op, chunk=chunk)
    ours = (h_lse, h_cos) + hyb.backward(
        x, w, target, row_param, kind, p0, p1, lse, grad_lse, grad_cos, op_dtype=op, chunk=chunk
    )
    return ref, ours


def _close(ref, ours, rtol, grad_rtol=None):
    """Relative errors (to each output's largest entry) within ``rtol``; the gradients
    within ``grad_rtol`` when given (16-bit operands, see ``_GRAD_RTOL``)."""
    for name, a, b in zip(("lse", "cos_y", "grad_x", "grad_w"), ref, ours):
        assert b.dtype == a.dtype and b.shape == a.shape, name
        a, b = a.double(), b.double()
        assert torch.isfinite(b[torch.isfinite(a)]).all(), name
        scale = a[torch.isfinite(a)].abs().max().clamp_min(1e-30)
        err = (a - b).nan_to_num(0.0).abs().max() / scale
        tol = grad_rtol if (grad_rtol is not None and name.startswith("grad")) else rtol
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


# The gradients with 16-bit operands. bf16: the hybrid rounds G / ||w|| for
# grad x_hat = (G / ||w||) W^T where the torch path rounds G and W / ||w|| apart (the
# fused kernels' P-side scale does the same), and its epilogue rounds G / ||x|| in
# Triton: the fused kernels' bound against the torch path, tolerances.CLASS_KERNEL
# (worst measured over seeds 0-5, both shapes, all kinds, with round-to-nearest casts:
# grad_x 8.9e-3, grad_w 7.8e-4; autocast 5.8e-3 / 1.4e-4). float16 keeps the torch
# path's rounding points (scaled, in PyTorch): a bound of its own, two float16 ulps of
# the largest entry (measured 3.5e-4). The forward outputs keep 2e-5 in every dtype.
_GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: CLASS_KERNEL[torch.bfloat16]["torch"]}
_FP16_GRAD_RTOL = 1e-3


@interpreted
class TestInterpretedHybrid:
    @pytest.mark.parametrize("kind,p0,p1", KINDS, ids=[k[0] for k in KINDS])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("shape", [(41, 33, 401), (9, 16, 1271)], ids=["41x401", "9x1271"])
    def test_matches_torch_path(self, shape, dtype, kind, p0, p1):
        """Odd shapes, several chunks (the last partial), cos = +-1 rows, a -1 target."""
        x, w, target, row_param = _problem(*shape, dtype)
        ref, ours = _both(x, w, target, row_param, kind, p0, p1, chunk=128)
        _close(ref, ours, 2e-5, _GRAD_RTOL[dtype])

    @pytest.mark.parametrize("kind,p0,p1", KINDS, ids=[k[0] for k in KINDS])
    def test_float16_keeps_the_scaled_rounding(self, kind, p0, p1):
        """float16 operands: the epilogue writes float32 G and the torch path's scaled
        roundings follow in PyTorch, so the rounding points are the torch path's."""
        x, w, target, row_param = _problem(41, 33, 401, torch.float16, seed=2)
        ref, ours = _both(x, w, target, row_param, kind, p0, p1, chunk=128)
        _close(ref, ours, 2e-5, _FP16_GRAD_RTOL)

    def test_tensor_p1_and_autocast(self):
        """CurricularFace's t as a 0-d tensor, under autocast (fp32 inputs, bf16 operands)."""
        x, w, target, row_param = _problem(41, 33, 401, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            op = class_lse.operand_dtype(x, w)
        assert op == torch.bfloat16
        ref, ours = _both(x, w, target, row_param, "curricular", 16.0, torch.tensor(0.3), 64, op)
        _close(ref, ours, 2e-5, _GRAD_RTOL[torch.bfloat16])

    def test_matches_float64_reference(self):
        """fp32 against the dense float64 reference: lse, cos_y and both gradients (rows
        away from cos = +-1, where the reference's clamp gradient differs by design)."""
        g = torch.Generator().manual_seed(3)
        x = F.normalize(torch.randn(13, 24, generator=g), dim=1)
        w = torch.randn(24, 301, generator=g)
        target = torch.randint(0, 301, (13,), generator=g)
        lse, cos_y = hyb.forward(x, w, target, torch.zeros(13), "circle", 32.0, 0.25, chunk=100)
        xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
        # x through its normalisation, as class_logsumexp's gradient is w.r.t. raw rows.
        unit = xr / xr.norm(dim=1, keepdim=True)
        ref_lse, ref_cos = dense_class_logsumexp(unit, wr, target, "circle", 32.0, 0.25)
        assert torch.allclose(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
        assert torch.allclose(cos_y.double(), ref_cos, rtol=1e-5, atol=1e-6)
        gl, gc = torch.randn(13, generator=g), torch.randn(13, generator=g)
        (ref_lse * gl.double()).sum().add((ref_cos * gc.double()).sum()).backward()
        gx, gw = hyb.backward(x, w, target, torch.zeros(13), "circle", 32.0, 0.25, lse, gl, gc,
                              chunk=100)  # fmt: skip
        assert torch.allclose(gx.double(), xr.grad, rtol=1e-4, atol=1e-5)
        assert torch.allclose(gw.double(), wr.grad, rtol=1e-4, atol=1e-5)

    def test_self_check_runs_the_hybrid(self, monkeypatch):
        """The self-check of the hybrid (family "class_lse_hybrid", what "auto" runs before
        it picks the hybrid on a GPU) runs the class problems through the hybrid's own
        kernels and passes here, on the interpreter (bf16: float32 would add 9 s)."""
        from pml_extras.ops import kernel_check

        calls = []
        real = hyb.forward

        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(hyb, "forward", counted)
        result = kernel_check.run_kernel_check("class_lse_hybrid", "cpu", torch.bfloat16)
        assert result.passed, result.describe()
        assert calls and result.family == "class_lse_hybrid" and result.storage

    @settings(max_examples=6, deadline=None)
    @given(chunk=st.integers(1, 300), batch=st.integers(1, 20))
    def test_chunk_size_does_not_change_the_result(self, chunk, batch):
        x, w, target, row_param = _problem(max(batch, 3), 16, 257, torch.bfloat16, seed=batch)
        one = hyb.forward(x, w, target, row_param, "circle", 64.0, 0.25, chunk=257)
        many = hyb.forward(x, w, target, row_param, "circle", 64.0, 0.25, chunk=chunk)
        assert torch.allclose(one[0], many[0], rtol=1e-5, atol=1e-4)
        assert torch.equal(one[1], many[1])

    def test_loss_module_selects_it(self):
        """impl="hybrid" through a PML loss: loss and gradients equal impl="torch"'s."""
        from pml_extras.losses import SparseCircleLoss

        out = {}
        for impl in ("torch", "hybrid"):
            torch.manual_seed(0)
            # D = 64 > 4 ln(C (C - 1)): not low-dimensional, so PML's normal_ init.
            loss_fn = SparseCircleLoss(300, 64, m=0.25, gamma=64.0, impl=impl)
            emb = torch.randn(17, 64, requires_grad=True)
            loss = loss_fn(emb, torch.randint(0, 300, (17,)))
            loss.backward()
            out[impl] = (loss.detach(), emb.grad, loss_fn.W.grad)
        for a, b in zip(out["torch"], out["hybrid"]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)

    def test_bad_input(self):
        x, w, target, row_param = _problem(5, 8, 20, torch.float64)
        with pytest.raises(TypeError, match="float32"):
            hyb.forward(x, w, target, row_param, "circle", 1.0, 0.25)
        with pytest.raises(ValueError, match="unknown transform kind 'arc'"):
            hyb.forward(x.float(), w.float(), target, row_param, "arc", 1.0, 0.25)
        with pytest.raises(TypeError, match="impl='hybrid' computes in float32"):
            class_lse.class_logsumexp(x, w, target, "circle", 1.0, 0.25, impl="hybrid")


def test_hybrid_needs_a_triton_device():
    """On CPU without the interpreter, impl='hybrid' says why it cannot run."""
    if INTERPRET:
        pytest.skip("the interpreter makes CPU a Triton device")
    x, w, target, _ = _problem(5, 8, 20, torch.float32)
    with pytest.raises(RuntimeError, match="impl='hybrid' needs the triton package"):
        class_lse.class_logsumexp(x, w, target, "circle", 1.0, 0.25, impl="hybrid")


# ------------------------------------------------ impl="auto": the cost model's choice

CUDA0 = torch.device("cuda", 0)
# (B, C, D) where the model predicts the fused kernels faster (the case) and
# where it predicts the hybrid faster (few classes, a large batch: the fused backward runs
# one program per 64-class tile, 16 programs for 1000 classes); bf16 operands and W.
FUSED_SHAPE, HYBRID_SHAPE = (1024, 100_000, 512), (16384, 1000, 2048)


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA devices where Triton imports and the kernels' self-check passes (no device
    needed: only the dispatch is exercised), as tests/ops/test_selfcheck.py does."""
    from pml_extras.ops import dispatch
    from pml_extras.ops import kernel_check as selfcheck

    dispatch._reset()
    monkeypatch.setattr(dispatch, "_import_error", lambda device, family=None: None)
    monkeypatch.setattr(dispatch, "tf32_enabled", lambda: False)
    monkeypatch.setattr(dispatch, "_gpu_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "check_kernels", True)
    monkeypatch.delenv(dispatch.SKIP_ENV, raising=False)
    passed = SimpleNamespace(passed=True)
    monkeypatch.setattr(selfcheck, "run_kernel_check", lambda *args: passed)
    yield dispatch
    dispatch._reset()


def _auto(dispatch, shape, op=torch.bfloat16, w=torch.bfloat16, device=CUDA0):
    return dispatch.resolve_impl(
        "auto", device, op, family="class_lse", operand=op, storage=w, shape=shape
    )


def test_auto_picks_by_the_cost_model(fake_gpu):
    """On CUDA, "auto" takes whichever of the fused kernels and the hybrid (both as built)
    the model predicts faster for the call's shapes and dtypes: both outcomes, and each
    agrees with the model's totals (so an inverted comparison goes red)."""
    from pml_extras.ops import cost_model as cm

    for shape, expected in ((FUSED_SHAPE, "triton"), (HYBRID_SHAPE, "hybrid")):
        b, c, d = shape
        fused = cm.total(cm.class_kernels(b, c, d, "bf16", "bf16", cm.CURRENT_CLASS), cm.H100_SXM)
        hybrid = cm.total(cm.hybrid_class_kernels(b, c, d, "bf16", "bf16", as_built=True),
                          cm.H100_SXM)  # fmt: skip
        assert (hybrid < fused) == (expected == "hybrid")
        assert _auto(fake_gpu, shape) == expected
    # No shape (a direct caller): the fused kernels, as before.
    assert _auto(fake_gpu, None) == "triton"
    # The family without a hybrid never gets it.
    assert fake_gpu.resolve_impl("auto", CUDA0, torch.bfloat16, family="pair_circle") == "triton"


def test_auto_model_choice_is_cached_and_follows_the_gpu(fake_gpu, monkeypatch):
    """Cached per (B, C, D, operand dtype, W dtype, GPU): the model is consulted once per
    key; the H200's figures where the device name says H200."""
    from pml_extras.ops import cost_model as cm

    calls = []
    real = cm.hybrid_class_kernels

    def counted(*args, **kwargs):
        calls.append(kwargs["hw"].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(cm, "hybrid_class_kernels", counted)
    for _ in range(3):
        _auto(fake_gpu, HYBRID_SHAPE)
    assert calls == ["H100 SXM"]
    _auto(fake_gpu, HYBRID_SHAPE, w=torch.float32)  # another W dtype: another key
    monkeypatch.setattr(fake_gpu, "_gpu_name", lambda device: "NVIDIA H200")
    _auto(fake_gpu, HYBRID_SHAPE)
    assert calls == ["H100 SXM", "H100 SXM", "H200"]


def test_auto_never_picks_a_hybrid_that_cannot_run(fake_gpu, monkeypatch):
    """Without torch.mm(out_dtype=) (torch < 2.8), "auto" keeps the fused kernels where
    the model prefers the hybrid, and impl="hybrid" on CUDA says why it cannot run; the
    same where the hybrid's module does not import; on CPU "auto" stays torch."""
    assert _auto(fake_gpu, HYBRID_SHAPE) == "hybrid"
    monkeypatch.setattr(fake_gpu, "mm_has_out_dtype", lambda: False)
    assert _auto(fake_gpu, HYBRID_SHAPE) == "triton"
    with pytest.raises(RuntimeError, match=r"torch.mm\(\.\.\., out_dtype=torch.float32\)"):
        fake_gpu.resolve_impl("hybrid", CUDA0, torch.bfloat16, family="class_lse")
    monkeypatch.undo()
    monkeypatch.setattr(
        fake_gpu,
        "_import_error",
        lambda device, family=None: "no module" if family == "hybrid" else None,
    )
    monkeypatch.setattr(fake_gpu, "check_kernels", False)
    monkeypatch.setattr(fake_gpu, "tf32_enabled", lambda: False)
    assert _auto(fake_gpu, HYBRID_SHAPE) == "triton"
    cpu = torch.device("cpu")
    assert _auto(fake_gpu, HYBRID_SHAPE, device=cpu) == "torch"


def test_auto_needs_the_class_kernels_self_check(fake_gpu, monkeypatch):
    """Where the class kernels fail their self-check, "auto" is PyTorch, hybrid shape or
    not (the hybrid shares the check's transforms and epilogue arithmetic)."""
    from pml_extras.ops import kernel_check as selfcheck

    failed = SimpleNamespace(passed=False, describe=lambda: "stand-in failure.",
                             device="cuda:0", dtype="bfloat16")  # fmt: skip
    monkeypatch.setattr(selfcheck, "run_kernel_check", lambda *args: failed)
    with pytest.warns(fake_gpu.KernelCheckWarning):
        assert _auto(fake_gpu, HYBRID_SHAPE) == "torch"


def test_auto_keeps_the_fused_kernels_when_the_hybrid_fails_its_check(fake_gpu, monkeypatch):
    """The hybrid's own kernels are self-checked (family "class_lse_hybrid") before "auto"
    picks it: where that check fails, "auto" runs the fused kernels (which passed) and
    warns once naming them; impl="hybrid" raises. Where the model prefers the fused
    kernels, the hybrid's check never runs."""
    from pml_extras.ops import kernel_check as selfcheck

    families = []
    failed = SimpleNamespace(passed=False, describe=lambda: "stand-in failure.",
                             device="cuda:0", dtype="bfloat16")  # fmt: skip

    def check(family, *args):
        families.append(family)
        return failed if family == "class_lse_hybrid" else SimpleNamespace(passed=True)

    monkeypatch.setattr(selfcheck, "run_kernel_check", check)
    assert _auto(fake_gpu, FUSED_SHAPE) == "triton"
    assert families == ["class_lse"]
    with pytest.warns(fake_gpu.KernelCheckWarning, match="uses the fused Triton kernels"):
        assert _auto(fake_gpu, HYBRID_SHAPE) == "triton"
    assert families == ["class_lse", "class_lse_hybrid"]
    with pytest.raises(fake_gpu.KernelCheckError, match="impl='hybrid' was requested"):
        fake_gpu.resolve_impl(
            "hybrid", CUDA0, torch.bfloat16, family="class_lse", operand=torch.bfloat16,
            storage=torch.bfloat16,
        )  # fmt: skip


def test_mm_out_dtype_probe_matches_this_torch():
    """The probe says what this torch's torch.mm signature says."""
    from pml_extras.ops import dispatch

    has = any("out_dtype" in str(s) for s in torch._C._jit_get_schemas_for_operator("aten::mm"))
    assert dispatch.mm_has_out_dtype() == has


def test_class_logsumexp_gives_the_dispatch_its_shape(monkeypatch):
    """The public op passes (B, C, D) to resolve_impl, so "auto" can ask the model."""
    seen = {}

    def resolve(impl, device, dtype, **kwargs):
        seen.update(kwargs)
        return "torch"

    monkeypatch.setattr(class_lse, "resolve_impl", resolve)
    x, w, target, _ = _problem(7, 12, 50, torch.float32)
    class_lse.class_logsumexp(x, w, target, "scaled", 8.0)
    assert seen["shape"] == (7, 50, 12)
