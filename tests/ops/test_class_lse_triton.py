"""Fused Triton kernels of class_logsumexp (pml_extras/ops/class_lse_triton.py).

Without a GPU the kernels run under Triton's CPU interpreter. ``TRITON_INTERPRET`` is read
when ``@triton.jit`` decorates a kernel (at import of the kernel module), and setting it in
this process would also change what other test modules see (``impl="triton"`` on CPU
becomes legal). So the interpreter tests (classes ``TestInterpreted*``) run in a child
pytest process started with ``TRITON_INTERPRET=1`` by ``test_interpreter_suite``; in the
parent they are skipped. To run them directly:

    TRITON_INTERPRET=1 python -m pytest tests/ops/test_class_lse_triton.py -k Interpreted

Shapes are tiny and the block sizes small (4-16), so that row blocks, class tiles, class
splits and D groups all have several members, C < BLOCK_C and odd sizes occur, and labels
fall on tile boundaries. Oracles: ``_forward_torch`` / ``_backward_torch`` and float32
dense autograd math on the same (possibly bf16-valued) inputs.

The GPU path (the sm_90a compile, impl="triton" against impl="torch" through the loss
modules, TF32 settings, grids, the target column): test_class_lse_gpu_path.py. Cases, the
oracle and the check: tests/helpers/class_triton_cases.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_CHILD = "PML_EXTRAS_TRITON_INTERPRET_CHILD"
if os.environ.get(_CHILD) == "1":
    # Before anything imports triton (the parent also sets it in the child's environment).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from class_triton_cases import (  # noqa: E402
    INTERPRET,
    KINDS,
    PARAMS,
    SHAPES,
    TOL,
    check_all,
    clt,
    dense_oracle,
    interpreted,
    make_case,
    needs_triton,
    rel_err,
)

from pml_extras.ops import class_lse  # noqa: E402
from pml_extras.ops.tolerances import CLASS_KERNEL, CLASS_MODULE_HALF  # noqa: E402

_INTERPRETED_MODULES = (
    "ops/test_class_lse_gpu_path.py",
    "ops/test_class_bwd_jacobian.py",
    "losses/test_margin_losses.py",
    "losses/test_impl_hybrid.py",
    "ops/test_pair_circle_triton.py",
    "gpu/test_gpu.py",
)
# test_gpu.py runs whole (it is the GPU suite; on CPU the interpreter stands in for the
# GPU). The CUDA-only exceptions (there and in this module) are the only skips allowed,
# each with its reason.
_CUDA_ONLY = ("test_gpu.py", "test_class_lse_triton.py", "test_class_lse_gpu_path.py")


def test_interpreter_suite():
    """Runs the TestInterpreted* classes of this module and of _INTERPRETED_MODULES, and all
    of test_gpu.py, in a TRITON_INTERPRET=1 child."""
    if INTERPRET:
        pytest.skip("already under TRITON_INTERPRET=1: the interpreter tests run directly")
    if clt is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD: "1"})
    # One child for every module with interpreter tests: importing torch and triton is
    # most of a child's cost.
    here = os.path.dirname(os.path.abspath(__file__))
    others = [os.path.join(os.path.dirname(here), name) for name in _INTERPRETED_MODULES]
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), *others, "-q", "-rfEs"]
    cmd += ["-p", "no:cacheprovider", "-o", "addopts=", "-k", "Interpreted or test_gpu.py"]
    cmd += ["--durations=5"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    passed = re.search(r"(\d+) passed", summary)
    assert proc.returncode == 0, f"interpreter tests failed:\n{out[-8000:]}"
    assert passed and int(passed.group(1)) >= 125, f"too few interpreter tests ran:\n{out[-4000:]}"
    assert not re.search(r"\d+ (failed|error)", summary), out[-4000:]
    # Skips: only test_gpu.py's CUDA-only exceptions, each saying why.
    skips = re.findall(r"SKIPPED \[(\d+)\] (\S+?):\d+: (.+)", out)
    assert all(
        path.endswith(_CUDA_ONLY) and ("CUDA" in why or "GPU" in why) for _, path, why in skips
    )
    skipped = re.search(r"(\d+) skipped", summary)
    assert (int(skipped.group(1)) if skipped else 0) == sum(int(n) for n, _, _ in skips) <= 10, out


@interpreted
class TestInterpretedKernels:
    def test_runs_under_interpreter(self):
        assert clt.INTERPRETED
        assert "Interpreted" in type(clt._fwd_kernel).__name__

    @pytest.mark.parametrize("shape", list(SHAPES))
    @pytest.mark.parametrize("kind", KINDS)
    def test_fp32(self, kind, shape):
        B, D, C, cfg = SHAPES[shape]
        case = make_case(B, D, C, torch.float32, kind, cfg["block_c"])
        with clt.block_config(**cfg):
            check_all(*case[:4], kind, *case[4:], torch.float32, plain=True)

    @pytest.mark.parametrize("shape", ["splits", "dgroups"])
    @pytest.mark.parametrize("kind", KINDS)
    def test_bf16(self, kind, shape):
        B, D, C, cfg = SHAPES[shape]
        case = make_case(B, D, C, torch.bfloat16, kind, cfg["block_c"], seed=1)
        with clt.block_config(**cfg):
            check_all(*case[:4], kind, *case[4:], torch.bfloat16)

    def test_bf16_cast_rounds_as_the_gpu(self):
        """A float32 -> bfloat16 cast inside an interpreted kernel rounds to nearest even,
        bit for bit as torch (and the GPU's cvt.rn.bf16.f32): Triton 3.9's interpreter
        truncated (pml_extras/ops/_interpreter_rounding.py)."""
        import triton
        import triton.language as tl

        @triton.jit
        def cast(X, Y, N: tl.constexpr):
            i = tl.arange(0, N)
            tl.store(Y + i, tl.load(X + i).to(tl.bfloat16))

        g = torch.Generator().manual_seed(0)
        x = torch.randn(1024, generator=g) * torch.logspace(-40, 38, 1024)
        x[:4] = torch.tensor([1.0 + 3 * 2.0**-9, 1.0 + 2.0**-8, 3.4028234e38, float("nan")])
        y = torch.empty(1024, dtype=torch.bfloat16)
        cast[(1,)](x, y, N=1024)
        ref = x.bfloat16()
        assert torch.isnan(y[3]) and torch.equal(y[4:].view(torch.int16), ref[4:].view(torch.int16))
        assert y[:3].tolist() == [1.0 + 2.0**-7, 1.0, float("inf")] == ref[:3].tolist()

    @pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["W_bf16", "W_fp32"])
    @pytest.mark.parametrize("seed", [10, 11, 12])
    @pytest.mark.parametrize("kind", KINDS)
    def test_bf16_seed_sweep(self, kind, seed, w_dtype):
        """bf16 x, W stored in bf16 or float32 (rounded per tile), at seeds no other test
        uses: lse and cos_y agree with both oracles to float32, the gradients are held to
        the dense oracle (CLASS_KERNEL in pml_extras/ops/tolerances.py says why not to the
        PyTorch path). With the interpreter truncating float32 -> bfloat16, as Triton
        3.9's did, the float32-W lse was up to 4e-3 off."""
        B, D, C, cfg = SHAPES["splits"]
        x, W, t, rp, gl, gc = make_case(B, D, C, torch.float32, kind, cfg["block_c"], seed=seed)
        with clt.block_config(**cfg):
            check_all(
                x.bfloat16(), W.to(w_dtype), t, rp, kind, gl, gc, torch.bfloat16,
                compare_torch=False,
            )  # fmt: skip

    @pytest.mark.parametrize("kind", KINDS)
    def test_backward_without_state_recomputes(self, kind):
        """The plain interface: backward() without the forward's saved u."""
        B, D, C, cfg = SHAPES["splits"]
        case = make_case(B, D, C, torch.float32, kind, cfg["block_c"], seed=2)
        with clt.block_config(**cfg):
            check_all(*case[:4], kind, *case[4:], torch.float32, state_path=False)

    @pytest.mark.parametrize(
        "kind,dtype,w_dtype,seed",
        [(k, torch.bfloat16, torch.bfloat16, 1) for k in KINDS]
        + [
            ("circle", torch.float32, torch.float32, 1),
            ("circle", torch.float16, torch.float16, 1),  # 1/||w|| stays on the W side
            # W stored wider, rounded per tile (the seed of test_fp16_and_mixed_dtypes)
            ("scaled", torch.bfloat16, torch.float32, 0),
        ],
    )
    def test_k_loop_forward(self, kind, dtype, w_dtype, seed):
        """BlockConfig(fwd_resident=False): the training forward on the K-loop loading (x
        reloaded per class tile, the W tile loaded again for u, 1/||w|| on the W side),
        which the default resident forward replaced where all of D fits one group and
        which still runs where D is split; the no-grad forward stays resident. The
        launches must take those paths and agree with both oracles."""
        B, D, C, cfg = SHAPES["splits"]
        x, W, t, rp, gl, gc = make_case(B, D, C, torch.float32, kind, cfg["block_c"], seed=seed)
        seen = []

        def hook(*args, **kwargs):
            seen.append((kwargs.get("NEED_U"), kwargs.get("RESIDENT"), kwargs.get("P_SIDE")))

        clt._fwd_kernel.add_pre_run_hook(hook)
        try:
            with clt.block_config(fwd_resident=False, **cfg):
                tol_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
                check_all(x.to(dtype), W.to(w_dtype), t, rp, kind, gl, gc, tol_dtype, plain=True)
        finally:
            clt._fwd_kernel.pre_run_hooks.remove(hook)
        assert (True, False, False) in seen and (False, True, False) in seen, seen

    def test_selfcheck_runs_the_forward_loadings(self, monkeypatch):
        """The self-check (kernel_check) launches what training and evaluation launch: the
        forward with u and the no-grad forward, both resident (1/||w|| on the P side with
        u), with bf16-stored W."""
        from pml_extras.ops import kernel_check

        monkeypatch.setattr(
            kernel_check, "_CLASS_KINDS", {"scaled": kernel_check._CLASS_KINDS["scaled"]}
        )
        seen = set()

        def hook(*args, **kwargs):
            seen.add((kwargs.get("NEED_U"), kwargs.get("RESIDENT"), kwargs.get("P_SIDE")))

        clt._fwd_kernel.add_pre_run_hook(hook)
        try:
            result = kernel_check.run_kernel_check(
                "class_lse", "cpu", torch.bfloat16, torch.bfloat16
            )
        finally:
            clt._fwd_kernel.pre_run_hooks.remove(hook)
        assert result.passed, result.describe()
        assert {(True, True, True), (False, True, False)} <= seen, seen

    @pytest.mark.parametrize("kind", KINDS)
    def test_zero_scale_branch(self, kind):
        """p0 = 0 makes every dz/dc zero: the backward kernel then skips the softmax (its
        else branch, which exists to give Triton a region boundary) and G is exactly 0,
        so grad W outside the target columns is exactly 0 and every output agrees with
        the PyTorch path."""
        B, D, C, cfg = SHAPES["splits"]
        x, W, t, rp, gl, gc = make_case(B, D, C, torch.float32, kind, cfg["block_c"], seed=4)
        p1 = PARAMS[kind][1]
        with clt.block_config(**cfg):
            lse, cos_y, st = clt.forward(x, W, t, rp, kind, 0.0, p1, need_state=True)
            gx, gw = clt.backward(x, W, t, rp, kind, 0.0, p1, lse, gl, gc, state=st)
        r_lse, r_cos = class_lse._forward_torch(x, W, t, rp, kind, 0.0, p1, 3)
        r_gx, r_gw = class_lse._backward_torch(x, W, t, rp, kind, 0.0, p1, 3, r_lse, gl, gc)
        for ours, ref in ((lse, r_lse), (cos_y, r_cos), (gx, r_gx), (gw, r_gw)):
            assert rel_err(ours, ref) <= TOL[torch.float32]["torch"]
        others = torch.ones(C, dtype=torch.bool)
        others[t[t >= 0]] = False
        assert others.any() and torch.equal(gw[:, others], torch.zeros_like(gw[:, others]))

    def test_fp16_and_mixed_dtypes(self):
        B, D, C, cfg = SHAPES["splits"]
        x, W, t, rp, gl, gc = make_case(B, D, C, torch.float32, "circle", cfg["block_c"])
        with clt.block_config(**cfg):
            check_all(x.half(), W.half(), t, rp, "circle", gl, gc, torch.bfloat16)
            # bf16 x with fp32 W: bf16 operands (the operand policy), W's tiles rounded in
            # the kernel; grad_w comes back in float32, grad_x in bf16.
            check_all(x.bfloat16(), W, t, rp, "scaled", gl, gc, torch.bfloat16)

    @pytest.mark.parametrize("transpose", [False, True], ids=["row_major", "column_major"])
    def test_strided_views_with_nan_padding(self, transpose):
        """x and W as views into NaN-filled buffers: any read outside the masks (row, D or
        class tails) turns the results into NaN."""

        def padded_view(t):
            r, c = t.shape
            if transpose:
                store = torch.full((c + 2, r + 2), float("nan"))
                store[1 : c + 1, 1 : r + 1] = t.t()
                view = store.t()[1 : r + 1, 1 : c + 1]
            else:
                store = torch.full((r + 2, c + 2), float("nan"))
                store[1 : r + 1, 1 : c + 1] = t
                view = store[1 : r + 1, 1 : c + 1]
            assert torch.equal(view, t) and not view.is_contiguous()
            return view

        B, D, C, cfg = SHAPES["padded"]
        x, W, t, rp, gl, gc = make_case(B, D, C, torch.float32, "curricular", cfg["block_c"])
        with clt.block_config(**cfg):
            check_all(padded_view(x), padded_view(W), t, rp, "curricular", gl, gc, torch.float32)

    def test_all_columns_masked(self):
        """C = 1 and the row's target is that column: lse = -inf, finite zero gradients."""
        x = F.normalize(torch.randn(3, 4), dim=1)
        W = torch.randn(4, 1)
        target = torch.tensor([0, -1, 0])
        rp = torch.zeros(3)
        p0, p1 = PARAMS["circle"]
        with clt.block_config(block_m=4, block_c=4):
            lse, cos_y, state = clt.forward(x, W, target, rp, "circle", p0, p1, need_state=True)
            assert torch.isinf(lse[[0, 2]]).all() and (lse[[0, 2]] < 0).all()
            assert torch.isfinite(lse[1])
            gx, gw = clt.backward(
                x, W, target, rp, "circle", p0, p1, lse, torch.ones(3), torch.ones(3), state=state
            )
        r_lse, r_cos = class_lse._forward_torch(x, W, target, rp, "circle", p0, p1, 4)
        r_gx, r_gw = class_lse._backward_torch(
            x, W, target, rp, "circle", p0, p1, 4, r_lse, torch.ones(3), torch.ones(3)
        )
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
        assert rel_err(lse, r_lse) < 1e-5 and rel_err(cos_y, r_cos) < 1e-6
        assert rel_err(gx, r_gx) < 1e-5 and rel_err(gw, r_gw) < 1e-5

    def test_large_scale_is_stable_in_bf16(self):
        """gamma = 256 in bf16: finite, and as accurate as the fp32 oracle allows."""
        B, D, C, cfg = SHAPES["splits"]
        x, W, t, rp, gl, gc = make_case(B, D, C, torch.bfloat16, "circle", cfg["block_c"], 3)
        with clt.block_config(**cfg):
            lse, cos_y, state = clt.forward(x, W, t, rp, "circle", 256.0, 0.25, need_state=True)
            gx, gw = clt.backward(x, W, t, rp, "circle", 256.0, 0.25, lse, gl, gc, state=state)
        o_lse, _, o_gx, o_gw = dense_oracle(x, W, t, rp, "circle", 256.0, 0.25, gl, gc)
        assert torch.isfinite(lse).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
        assert rel_err(lse, o_lse) < 5e-3
        assert rel_err(gx, o_gx) < 3e-2 and rel_err(gw, o_gw) < 3e-2

    def test_empty_batch(self):
        W = torch.randn(4, 5)
        x = torch.empty(0, 4)
        t = torch.empty(0, dtype=torch.long)
        lse, cos_y = clt.forward(x, W, t, torch.empty(0), "scaled", 2.0, 0.0)
        assert lse.shape == cos_y.shape == (0,)
        gx, gw = clt.backward(x, W, t, torch.empty(0), "scaled", 2.0, 0.0, lse, lse, lse)
        assert gx.shape == (0, 4) and torch.equal(gw, torch.zeros_like(W))


@interpreted
class TestInterpretedAutograd:
    """Through class_logsumexp / the loss modules with impl="triton" vs impl="torch"."""

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("x_grad", [True, False], ids=["x_and_w_grad", "w_grad_only"])
    def test_class_logsumexp(self, kind, x_grad):
        B, D, C, cfg = SHAPES["splits"]
        x, W, t, rp, gl, gc = make_case(B, D, C, torch.float32, kind, cfg["block_c"], seed=4)
        p0, p1 = PARAMS[kind]
        grads = {}
        for impl in ("torch", "triton"):
            xi = x.clone().requires_grad_(x_grad)
            Wi = W.clone().requires_grad_()
            with clt.block_config(**cfg):
                lse, cos_y = class_lse.class_logsumexp(
                    xi, Wi, t, kind, p0, p1, row_param=rp, chunk_size=5, impl=impl
                )
                # softplus-like use of both outputs, with finite values only
                loss = (torch.where(torch.isfinite(lse), lse, 0) * gl).sum() + (cos_y * gc).sum()
                loss.backward()
            grads[impl] = (lse.detach(), cos_y, xi.grad, Wi.grad)
        for ours, ref in zip(grads["triton"], grads["torch"]):
            if ref is None:
                assert ours is None
            else:
                assert rel_err(ours, ref) < 1e-4

    @pytest.mark.parametrize("kind", KINDS)
    def test_saved_state_used(self, kind, monkeypatch):
        """With x needing a gradient the backward gets the forward's u; without, none."""
        B, D, C, cfg = SHAPES["splits"]
        x, W, t, rp, _, _ = make_case(B, D, C, torch.float32, kind, cfg["block_c"])
        p0, p1 = PARAMS[kind]
        seen = []
        real = clt.backward

        def spy(*args, **kwargs):
            seen.append((kwargs.get("state"), kwargs.get("need_grad_x", True)))
            return real(*args, **kwargs)

        monkeypatch.setattr(clt, "backward", spy)
        with clt.block_config(**cfg):
            for x_grad in (True, False):
                xi = x.clone().requires_grad_(x_grad)
                Wi = W.clone().requires_grad_()
                lse, cos_y = class_lse.class_logsumexp(
                    xi, Wi, t, kind, p0, p1, row_param=rp, impl="triton"
                )
                (lse.clamp_min(-1e4).sum() + cos_y.sum()).backward()
        assert len(seen) == 2
        assert seen[0][0] is not None and seen[0][1]
        assert seen[1][0] is None and not seen[1][1]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_sparse_circle_loss_module(self, dtype):
        from pml_extras.losses import SparseCircleLoss

        self._compare_modules(SparseCircleLoss, dict(m=0.25, gamma=128.0), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_curricular_face_loss_module(self, dtype):
        from pml_extras.losses import CurricularFaceLoss

        self._compare_modules(CurricularFaceLoss, dict(margin=0.5, scale=16.0), dtype)

    @staticmethod
    def _compare_modules(cls, kwargs, dtype):
        B, D, C, cfg = SHAPES["splits"]
        g = torch.Generator().manual_seed(5)
        emb = torch.randn(B, D, generator=g).to(dtype)
        labels = torch.randint(0, C, (B,), generator=g)
        labels[:3] = torch.tensor([0, cfg["block_c"], C - 1])
        out = {}
        for impl in ("torch", "triton"):
            loss_fn = cls(C, D, impl=impl, **kwargs)
            with torch.no_grad():
                loss_fn.W.copy_(torch.randn(D, C, generator=torch.Generator().manual_seed(6)))
            loss_fn = loss_fn.to(dtype)
            e = emb.clone().requires_grad_()
            with clt.block_config(**cfg):
                loss = loss_fn(e, labels)
                loss.backward()
            out[impl] = (loss.detach(), e.grad, loss_fn.W.grad)
        tol = CLASS_KERNEL[torch.float32]["torch"] if dtype == torch.float32 else CLASS_MODULE_HALF
        for ours, ref in zip(out["triton"], out["torch"]):
            assert rel_err(ours, ref) < tol


@interpreted
class TestInterpretedDispatch:
    def test_auto_never_picks_triton_on_cpu(self):
        # TRITON_INTERPRET=1 makes impl="triton" legal on CPU, but "auto" stays on torch.
        assert class_lse.triton_available(torch.device("cpu"))
        assert class_lse.resolve_impl("auto", torch.device("cpu")) == "torch"
        assert class_lse.resolve_impl("triton", torch.device("cpu")) == "triton"


# ------------------------------------------------------------ tests without the interpreter


def test_auto_on_cpu_is_torch():
    assert class_lse.resolve_impl("auto", torch.device("cpu")) == "torch"
    assert class_lse.resolve_impl("auto", torch.device("cpu"), torch.float32) == "torch"


@needs_triton
def test_auto_never_picks_triton_for_float64():
    cuda = torch.device("cuda")
    assert class_lse.resolve_impl("auto", cuda, torch.float64) == "torch"
    assert class_lse.resolve_impl("auto", cuda, torch.float32) == "triton"


@needs_triton
def test_float64_is_rejected_clearly():
    x, W = torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="impl='torch'"):
        clt.forward(x, W, t, torch.zeros(2), "scaled", 1.0, 0.0)


def test_auto_falls_back_when_triton_is_not_importable(monkeypatch):
    import pml_extras.ops as ops

    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" raises ImportError
    monkeypatch.delitem(sys.modules, "pml_extras.ops.class_lse_triton", raising=False)
    monkeypatch.delattr(ops, "class_lse_triton", raising=False)
    cuda = torch.device("cuda")
    assert not class_lse.triton_available(cuda)
    assert class_lse.resolve_impl("auto", cuda) == "torch"
    with pytest.raises(RuntimeError, match="triton"):
        class_lse.resolve_impl("triton", cuda)


@needs_triton
def test_block_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        with clt.block_config(block_c=12):
            clt._check_config(clt._configs.current)
    with pytest.raises(ValueError, match="n_splits"):
        clt._check_config(clt.BlockConfig(n_splits=0))
    if not clt.INTERPRETED:
        with pytest.raises(ValueError, match=">= 16"):
            clt._check_config(clt.BlockConfig(block_m=8))
