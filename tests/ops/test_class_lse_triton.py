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

``TestInterpretedOrGPU`` compares impl="triton" with impl="torch" through the loss modules
(medium sizes on a GPU, small ones under the interpreter).
``test_kernels_compile_for_sm90`` compiles the kernels for an H100 without one (ptxas).
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
from _sm90 import compile_for_sm90, nvidia_backend_or_skip  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pml_extras.ops import class_lse, precision  # noqa: E402
from pml_extras.ops.tolerances import CLASS_KERNEL, CLASS_MODULE_HALF  # noqa: E402

try:
    import triton  # noqa: E402, F401

    from pml_extras.ops import _triton_common as tc  # noqa: E402
    from pml_extras.ops import class_lse_triton as clt  # noqa: E402
    from pml_extras.ops._triton_common import fp32_matmul_precision  # noqa: E402
except ImportError:  # pragma: no cover - triton is a test dependency on Linux
    clt = tc = fp32_matmul_precision = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()

needs_triton = pytest.mark.skipif(clt is None, reason="triton is not installed")
interpreted = pytest.mark.skipif(
    not INTERPRET or clt is None,
    reason="interpreter tests run in a TRITON_INTERPRET=1 child process (test_interpreter_suite)",
)

PARAMS = {  # (p0, p1) per kind; curricular's p1 (t) is a 0-d tensor, as the module passes it
    "circle": (64.0, 0.25),
    "curricular": (16.0, torch.tensor(0.3)),
    "scaled": (30.0, 0.0),
}
KINDS = tuple(PARAMS)
# name -> (B, D, C, block config overrides)
SHAPES = {
    "tiny": (1, 3, 1, dict(block_m=4, block_c=4)),  # B = 1, C = 1 < BLOCK_C
    # 2 row blocks, 3 class splits, 2 D steps of the logits
    "splits": (5, 16, 41, dict(block_m=4, block_c=8, block_d=8)),
    # D = 16 split into 2 groups of 8 (each recomputing the logits)
    "dgroups": (9, 16, 19, dict(block_m=8, block_c=8, d_group=8, d_group_fp32=8, block_d=8)),
    "padded": (17, 3, 7, dict(block_m=4, block_c=4, n_splits=2)),  # D, C padded in tiles
}


def make_case(B, D, C, dtype, kind, block_c, seed=0):
    """Inputs with labels on tile boundaries, target -1 rows and |raw cosine| > 1 entries."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, C, generator=g) * (0.2 + 2 * torch.rand(C, generator=g))
    x = F.normalize(torch.randn(B, D, generator=g), dim=1)
    special = [0, block_c - 1, block_c, C - 1, -1]
    target = torch.randint(0, C, (B,), generator=g)
    for i in range(min(B, len(special))):
        target[i] = special[i] if special[i] < C else C - 1
    if B >= 3:
        target[2::5] = -1
    # Rows not of unit length (the op normalises them): row 0 is 1.1 times a non-target
    # proxy j, so its cosine to j is 1 up to rounding (point 7: no gradient mask may flip
    # there between implementations); row 1 is -(1.1 w_j + 0.3 v), v orthogonal to w_j.
    w_hat = F.normalize(W, dim=0)
    for i, sign, off in ((0, 1.0, 0.0), (min(1, B - 1), -1.0, 0.3)):
        j = (int(target[i]) + 1) % C if C > 1 else 0
        if C == 1 and int(target[i]) == 0:
            continue
        v = torch.randn(D, generator=g)
        v = F.normalize(v - w_hat[:, j] * (v @ w_hat[:, j]), dim=0) if D > 1 else 0 * v
        x[i] = sign * (1.1 * w_hat[:, j] + off * v)
    row_param = torch.rand(B, generator=g) - 0.5
    grad_lse = torch.randn(B, generator=g)
    grad_cos = torch.randn(B, generator=g)
    x, W = x.to(dtype), W.to(dtype)
    return x, W, target, row_param, grad_lse, grad_cos


def _operand(x):
    """The operand policy's dtype without autocast (bf16/fp16 embeddings: theirs)."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _clamp_value(c):
    """clamp(c, -1, 1) in value, identity in gradient (the op's straight-through clamp)."""
    return c + (c.clamp(-1.0, 1.0) - c).detach()


def dense_oracle(x, W, target, row_param, kind, p0, p1, grad_lse, grad_cos):
    """float32 dense autograd on the operand values (x and W rounded to the operand dtype,
    both normalised, cosines clamped in value): (lse, cos_y, grad_x, grad_w)."""
    op = _operand(x)
    x = x.detach().to(op).float().requires_grad_()
    W = W.detach().to(op).float().requires_grad_()
    p1 = float(p1)
    x_hat = x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
    w_hat = W / W.norm(dim=0).clamp_min(1e-6)
    c = _clamp_value(x_hat @ w_hat)
    if kind == "circle":
        z = p0 * (c.detach() + p1).clamp_min(0.0) * (c - p1)
    elif kind == "curricular":
        z = p0 * torch.where(c.detach() > row_param[:, None], c * (p1 + c), c)
    else:
        z = p0 * c
    masked = torch.arange(W.shape[1], device=W.device)[None, :] == target[:, None]
    empty = masked.all(1)
    z = z.masked_fill(masked, float("-inf"))
    lse = torch.logsumexp(torch.where(empty[:, None], torch.zeros_like(z), z), dim=1)
    has = target >= 0
    cos_y = _clamp_value((x_hat * w_hat[:, target.clamp_min(0)].t()).sum(1))
    cos_y = torch.where(has, cos_y, torch.zeros_like(cos_y))
    loss = (torch.where(empty, torch.zeros_like(lse), lse) * grad_lse).sum()
    loss = loss + (cos_y * grad_cos).sum()
    grad_x, grad_w = torch.autograd.grad(loss, (x, W))
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse)
    return lse.detach(), cos_y.detach(), grad_x, grad_w


def rel_err(a, b):
    """max |a - b| / max |b|, with matching infinities allowed."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b]), (a, b)
    assert not torch.isnan(a).any()
    a, b = a[~inf_a], b[~inf_b]
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


# Tolerances (relative to the largest entry). fp32: IEEE dots in both implementations.
# bf16: both implementations multiply the same bf16 operands with float32 sums, so the
# logits agree to float32; the gradient matmuls round their second operand (G, the
# softmax weights) to bf16 at different points (2^-9 each).
TOL = CLASS_KERNEL


def check_all(
    x, W, target, row_param, kind, grad_lse, grad_cos, dtype, state_path=True, plain=False
):
    p0, p1 = PARAMS[kind]
    lse, cos_y, state = clt.forward(x, W, target, row_param, kind, p0, p1, need_state=True)
    if plain:  # the forward without u (NEED_U=False) gives the same outputs
        out = clt.forward(x, W, target, row_param, kind, p0, p1)
        assert len(out) == 2 and torch.equal(out[1], cos_y)
        assert rel_err(out[0], lse) <= 1e-6
    assert lse.dtype == cos_y.dtype == torch.float32
    grad_x, grad_w = clt.backward(
        x,
        W,
        target,
        row_param,
        kind,
        p0,
        p1,
        lse,
        grad_lse,
        grad_cos,
        state=state if state_path else None,
    )
    assert grad_x.dtype == x.dtype and grad_w.dtype == W.dtype
    assert grad_x.shape == x.shape and grad_w.shape == W.shape

    chunk = 3
    r_lse, r_cos = class_lse._forward_torch(x, W, target, row_param, kind, p0, p1, chunk)
    r_gx, r_gw = class_lse._backward_torch(
        x, W, target, row_param, kind, p0, p1, chunk, r_lse, grad_lse, grad_cos
    )
    o_lse, o_cos, o_gx, o_gw = dense_oracle(
        x, W, target, row_param, kind, p0, p1, grad_lse, grad_cos
    )
    tol = TOL[dtype]
    for name, ours, torch_ref, oracle in (
        ("lse", lse, r_lse, o_lse),
        ("cos_y", cos_y, r_cos, o_cos),
        ("grad_x", grad_x, r_gx, o_gx),
        ("grad_w", grad_w, r_gw, o_gw),
    ):
        e_torch, e_oracle = rel_err(ours, torch_ref), rel_err(ours, oracle)
        assert e_torch <= tol["torch"], f"{name} vs _forward/_backward_torch: {e_torch:.2e}"
        assert e_oracle <= tol["oracle"], f"{name} vs dense oracle: {e_oracle:.2e}"


_INTERPRETED_MODULES = (
    "losses/test_margin_losses.py",
    "losses/test_impl_hybrid.py",
    "ops/test_pair_circle_triton.py",
    "gpu/test_gpu.py",
)
# test_gpu.py runs whole (it is the GPU suite; on CPU the interpreter stands in for the
# GPU). The CUDA-only exceptions (there and in this module) are the only skips allowed,
# each with its reason.
_CUDA_ONLY = ("test_gpu.py", "test_class_lse_triton.py")


def test_interpreter_suite():
    """Runs the TestInterpreted* classes of this module, test_margin_losses.py and
    test_pair_circle_triton.py, and all of test_gpu.py, in a TRITON_INTERPRET=1 child."""
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


_ALL_COMPILES = pytest.mark.skipif(
    os.environ.get("PML_EXTRAS_COMPILE_ALL") != "1",
    reason="~20 s of compilation each; set PML_EXTRAS_COMPILE_ALL=1",
)


@needs_triton
@pytest.mark.skipif(INTERPRET, reason="compiles real kernels; not under the interpreter")
@pytest.mark.parametrize(
    "dtype,d,need_u",
    [
        pytest.param("bf16", 512, True, id="bf16-d512-u"),
        pytest.param("bf16", 512, False, id="bf16-d512", marks=_ALL_COMPILES),
        pytest.param("fp32", 1024, True, id="fp32-d1024-groups", marks=_ALL_COMPILES),
        pytest.param("fp16", 768, True, id="fp16-d768-groups", marks=_ALL_COMPILES),
    ],
)
def test_kernels_compile_for_sm90(dtype, d, need_u):
    """Triton -> PTX -> cubin (ptxas) for sm_90 with the default tile sizes: catches what
    the interpreter accepts but the GPU compiler does not (dot shapes, dtypes, layouts).
    Compiled kernels are cached in ~/.triton/cache, so reruns are fast."""
    nvidia_backend_or_skip()
    import triton.language as tl

    cfg = clt.BlockConfig()
    block_d, d_group, _ = clt._d_layout(d, cfg, dtype == "fp32")
    op = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    common = dict(
        KIND=1,
        P1_PTR=True,
        OP_DTYPE=op,
        DOT_DTYPE=op,
        PRECISION="ieee" if dtype == "fp32" else None,
        BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_c,
        BLOCK_D=block_d,
        D_GROUP=d_group,
    )
    ptrs = dict(X=f"*{dtype}", W=f"*{dtype}", GW=f"*{dtype}", TGT="*i64")
    for name in ("INV", "RX", "RP", "P1", "M_OUT", "L_OUT", "U_OUT", "LSE", "GLSE"):
        ptrs[name] = "*fp32"
    for kernel, constexprs in (
        # As the launcher: resident (x block and W tiles loaded once) when all of D fits
        # one group, 1/||w|| on the P side with u (but for fp16).
        (
            clt._fwd_kernel,
            dict(
                common,
                NEED_U=need_u,
                RESIDENT=d_group >= d,
                P_SIDE=need_u and d_group >= d and dtype != "fp16",
            ),
        ),
        (
            clt._bwd_w_kernel,
            dict(
                common,
                RESCALE=dtype == "fp16",
                BLOCK_M=clt._bwd_block_m(cfg),
                RESIDENT=d_group >= d,
            ),
        ),
    ):
        compile_for_sm90(
            kernel,
            ptrs,
            constexprs,
            ("p0", "p1_value"),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            unit_strides=("stride_xd", "stride_wc", "stride_gc"),
        )


_DEV = torch.device("cuda" if CUDA else "cpu")


@pytest.mark.skipif(
    not (CUDA or INTERPRET) or clt is None,
    reason="needs a CUDA device, or the TRITON_INTERPRET=1 child (test_interpreter_suite)",
)
class TestInterpretedOrGPU:
    """impl="triton" vs impl="torch" at a medium size on a GPU (small ones on CPU under the
    interpreter: only the device and the sizes differ), through the PML loss modules."""

    B, D, C = (256, 128, 5000) if CUDA else (9, 32, 37)

    def _run(self, cls, kwargs, dtype, impl, values_dtype=None, seed=0):
        """(loss, grad emb, grad W) as float32; inputs rounded through ``values_dtype``."""
        values_dtype = values_dtype or dtype
        g = torch.Generator(device=_DEV).manual_seed(seed)
        emb = torch.randn(self.B, self.D, device=_DEV, generator=g)
        emb = emb.to(values_dtype).to(dtype)
        labels = torch.randint(0, self.C, (self.B,), device=_DEV, generator=g)
        loss_fn = cls(self.C, self.D, impl=impl, **kwargs).to(_DEV)
        with torch.no_grad():
            W = torch.randn(self.D, self.C, device=_DEV, generator=g)
            loss_fn.W.copy_(W.to(values_dtype).float())
        loss_fn = loss_fn.to(dtype)
        emb.requires_grad_()
        loss = loss_fn(emb, labels)
        loss.backward()
        return loss.detach().float(), emb.grad.float(), loss_fn.W.grad.float()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("which", ["circle", "curricular"])
    def test_modules_match_torch(self, which, dtype):
        from pml_extras.losses import CurricularFaceLoss, SparseCircleLoss

        cls, kwargs = {
            "circle": (SparseCircleLoss, dict(m=0.25, gamma=256.0)),
            "curricular": (CurricularFaceLoss, dict(margin=0.5, scale=64.0)),
        }[which]
        ours = self._run(cls, kwargs, dtype, "triton")
        ref = self._run(cls, kwargs, dtype, "torch")
        if dtype == torch.float32:
            for a, b in zip(ours, ref):
                assert torch.isfinite(a).all()
                assert rel_err(a, b) < 1e-3
            return
        # bf16: the torch path rounds the logits to bf16 (z off by up to gamma * 2^-9), so
        # both are judged against float32 math on the same bf16-valued inputs, and the
        # kernels must be at least about as accurate as the torch path.
        exact = self._run(cls, kwargs, torch.float32, "torch", values_dtype=dtype)
        for a, b, e in zip(ours, ref, exact):
            assert torch.isfinite(a).all()
            assert rel_err(a, e) <= max(1.5 * rel_err(b, e), 2e-2)

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("d", [128, 1024], ids=["full_d", "d_groups"])
    def test_op_matches_dense_oracle(self, kind, d):
        B, C = (200, 3001) if CUDA else (5, 41)
        x, W, t, rp, gl, gc = make_case(B, d, C, torch.float32, kind, 64, seed=7)
        x, W, t, rp, gl, gc = (v.to(_DEV) for v in (x, W, t, rp, gl, gc))
        p0, p1 = PARAMS[kind]
        p1 = p1.to(_DEV) if torch.is_tensor(p1) else p1
        with fp32_matmul_precision("ieee"):
            lse, cos_y, state = clt.forward(x, W, t, rp, kind, p0, p1, need_state=True)
            gx, gw = clt.backward(x, W, t, rp, kind, p0, p1, lse, gl, gc, state=state)
            o_lse, o_cos, o_gx, o_gw = dense_oracle(x, W, t, rp, kind, p0, p1, gl, gc)
        for a, b in ((lse, o_lse), (cos_y, o_cos), (gx, o_gx), (gw, o_gw)):
            assert rel_err(a, b) < 1e-3

    @pytest.mark.skipif(not CUDA, reason="needs CUDA: CPU has no peak-allocation counter")
    def test_no_batch_by_classes_memory(self):
        B, D, C = 1024, 512, 100_000
        x = F.normalize(torch.randn(B, D, device="cuda"), dim=1).bfloat16().requires_grad_()
        W = torch.randn(D, C, device="cuda", dtype=torch.bfloat16).requires_grad_()
        t = torch.randint(0, C, (B,), device="cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        lse, cos_y = class_lse.class_logsumexp(x, W, t, "circle", 256.0, 0.25, impl="triton")
        (lse.sum() + cos_y.sum()).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        budget = 1.5 * (W.numel() * W.element_size() * 2 + x.numel() * x.element_size())
        assert extra < budget, (extra, budget)
        assert extra < B * C * 4  # never a B x C float32 tensor


# ---------------------------------------------- issue 10: the GPU-only lines, run in CI


class _LegacyMatmul:
    """torch < 2.9's torch.backends.cuda.matmul: only ``allow_tf32``."""

    allow_tf32 = False


class _MixedMatmul:
    """A state where the new switch says "none" and reading the legacy one raises."""

    fp32_precision = "none"

    @property
    def allow_tf32(self):
        raise RuntimeError("mix of the legacy and new APIs")


@needs_triton
def test_tf32_setting_is_read_through_either_api(monkeypatch):
    matmul = torch.backends.cuda.matmul
    with fp32_matmul_precision("tf32"):
        assert matmul.fp32_precision == "tf32" and tc.tf32_enabled()
        # The bug this replaces: torch 2.13 refuses the legacy read in this state.
        with pytest.raises(RuntimeError):
            matmul.allow_tf32  # noqa: B018
        assert tc.operand_types(torch.float32, True, "x")[2] == "tf32"
        with fp32_matmul_precision("ieee"):
            assert not tc.tf32_enabled()
            assert tc.operand_types(torch.float32, True, "x")[2] == "ieee"
        assert tc.tf32_enabled()
    assert matmul.fp32_precision == "none"  # restored
    assert tc.operand_types(torch.bfloat16, True, "x")[2] is None
    legacy = _LegacyMatmul()
    monkeypatch.setattr(precision, "_matmul_backend", lambda: legacy)
    assert not tc.tf32_enabled()
    with fp32_matmul_precision("tf32"):
        assert legacy.allow_tf32 and tc.tf32_enabled()
    assert legacy.allow_tf32 is False
    monkeypatch.setattr(precision, "_matmul_backend", lambda: _MixedMatmul())
    assert not tc.tf32_enabled()  # IEEE, PyTorch's default, instead of raising
    with pytest.raises(ValueError, match="precision"):
        with fp32_matmul_precision("fp16"):
            pass


@needs_triton
def test_wave_splits_fill_whole_waves():
    # The case: B = 1024 (16 row blocks of 64), one D group, 132 SMs, C = 1M.
    n_tiles = triton.cdiv(1_000_000, 32)
    old = triton.cdiv(2 * 132, 16)  # the former rule: 17 splits, 272 programs, 3 waves
    assert 16 * old == 272 and triton.cdiv(272, 132) == 3
    splits, per_split = tc.wave_splits(16, n_tiles, 132, 10_000)
    programs = 16 * splits
    assert programs / (triton.cdiv(programs, 132) * 132) >= 0.95
    assert (splits - 1) * per_split < n_tiles <= splits * per_split
    # More row blocks than SMs: no split needed when the waves are already full enough.
    assert tc.wave_splits(264, n_tiles, 132, 100)[0] == 1
    # Few tiles: never more splits than tiles.
    assert tc.wave_splits(1, 3, 132, 100) == (3, 1)


@needs_triton
@given(
    programs=st.integers(1, 300),
    n_tiles=st.integers(1, 5000),
    slots=st.integers(1, 200),
    most=st.integers(1, 600),
)
@settings(max_examples=150, deadline=None)
def test_wave_splits_property(programs, n_tiles, slots, most):
    splits, per_split = tc.wave_splits(programs, n_tiles, slots, most)
    assert 1 <= splits <= max(1, min(most, n_tiles))
    assert (splits - 1) * per_split < n_tiles <= splits * per_split

    def fill(s):
        return programs * s / (triton.cdiv(programs * s, slots) * slots)

    # Every effective split count the search could reach, from the same rounding.
    reachable = {triton.cdiv(n_tiles, triton.cdiv(n_tiles, w)) for w in range(1, most + 1)}
    reachable = {s for s in reachable if s <= max(1, min(most, n_tiles))}
    good = sorted(s for s in reachable if fill(s) >= 0.95)
    if good:
        assert splits == good[0]  # the fewest splits that fill 95 % of the waves
    else:
        assert fill(splits) == max(fill(s) for s in reachable)


@needs_triton
def test_forward_grid_is_whole_waves(monkeypatch):
    monkeypatch.setattr(clt, "sm_count", lambda device: 132)
    cfg = clt.BlockConfig()
    # bf16 at B = 1024, D = 512, C = 1M, with u (training): 16 row blocks, 1 D group.
    splits, per_split = clt._n_splits(1024, 1_000_000, 1, True, 2, torch.device("cuda"), cfg)
    programs = 16 * splits
    assert programs / (triton.cdiv(programs, 132) * 132) >= 0.95
    assert splits * 1024 * 512 * 4 <= 1_000_000 * 512 * 2  # u partials no larger than W
    with clt.block_config(n_splits=5):  # an explicit count is kept
        assert clt._n_splits(1024, 1_000_000, 1, True, 2, None, clt._configs.current)[0] == 5


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),  # rows
    st.integers(1, 6),  # classes: few, so that labels repeat
    st.integers(1, 5),  # D
    st.integers(0, 2**31 - 1),
)
def test_deterministic_column_add_matches_index_add(B, C, D, seed):
    """The target column's gradient on CUDA goes through add_columns_deterministic_
    (index_put_ with accumulate=True, a sort-based kernel there); called directly here on
    CPU, it must equal index_add_ in float64 with repeated labels, write in place (also
    through a transposed view) and return its output."""
    from pml_extras.ops.class_common import add_columns_deterministic_

    g = torch.Generator().manual_seed(seed)
    out = torch.randn(D, C, dtype=torch.float64, generator=g)
    index = torch.randint(0, C, (B,), generator=g)
    src = torch.randn(D, B, dtype=torch.float64, generator=g)
    ref = out.clone().index_add_(1, index, src)
    got = out.clone()
    assert add_columns_deterministic_(got, index, src) is got
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    view = out.t().clone().t()  # column-major storage, as a transposed W would be
    add_columns_deterministic_(view, index, src)
    torch.testing.assert_close(view, ref, rtol=1e-12, atol=1e-12)


def test_target_column_add_is_index_add_on_cpu():
    """On CPU add_columns_ keeps index_add_ (bit-identical values: the behaviour
    snapshot); the deterministic variant agrees in bf16 to its rounding."""
    from pml_extras.ops.class_common import add_columns_, add_columns_deterministic_

    g = torch.Generator().manual_seed(0)
    out = torch.randn(7, 3, generator=g).bfloat16()
    index = torch.tensor([0, 2, 2, 0, 1, 2, 2, 2])
    src = torch.randn(7, 8, generator=g).bfloat16()
    assert torch.equal(add_columns_(out.clone(), index, src), out.clone().index_add_(1, index, src))
    exact = out.double().index_add_(1, index, src.double())
    det = add_columns_deterministic_(out.clone(), index, src)
    assert det.dtype == torch.bfloat16
    torch.testing.assert_close(det.double(), exact, rtol=2e-2, atol=2e-2)


@needs_triton
def test_launch_device_on_cpu_is_a_noop_context():
    ctx = tc.launch_device(torch.zeros(1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == -1
    with ctx:
        pass


@interpreted
class TestInterpretedGpuPath:
    """Issue 10's GPU-only lines under the interpreter: TF32 switches, device context,
    fp16 backward rescaling, autocast operands, cos = +-1."""

    @pytest.mark.parametrize("api", ["fp32_precision", "allow_tf32"])
    def test_fp32_launches_under_tf32_settings(self, api):
        B, D, C, cfg = SHAPES["splits"]
        case = make_case(B, D, C, torch.float32, "circle", cfg["block_c"], seed=11)
        matmul = torch.backends.cuda.matmul
        old = matmul.fp32_precision
        try:
            if api == "fp32_precision":
                matmul.fp32_precision = "tf32"
            else:
                matmul.allow_tf32 = True
            assert tc.tf32_enabled()
            with clt.block_config(**cfg):
                check_all(*case[:4], "circle", *case[4:], torch.float32)
        finally:
            matmul.fp32_precision = old
        assert not tc.tf32_enabled()

    def test_every_launch_runs_under_the_tensors_device(self, monkeypatch):
        from pml_extras.ops import pair_circle_triton as pct
        from pml_extras.ops.pair_circle import all_pairs_circle_loss

        seen = []
        real = tc.launch_device

        def spy(t):
            seen.append(t.device)
            return real(t)

        monkeypatch.setattr(clt, "launch_device", spy)
        monkeypatch.setattr(pct, "launch_device", spy)
        B, D, C, cfg = SHAPES["splits"]
        x, W, t, rp, gl, gc = make_case(B, D, C, torch.float32, "scaled", cfg["block_c"])
        with clt.block_config(**cfg):
            lse, cos_y, state = clt.forward(x, W, t, rp, "scaled", 4.0, 0.0, need_state=True)
            clt.backward(x, W, t, rp, "scaled", 4.0, 0.0, lse, gl, gc, state=state)
        assert len(seen) == 3  # inverse norms, forward, grad W
        emb = x.clone().requires_grad_()
        losses = all_pairs_circle_loss(emb, emb, t, t, self_compare=True, impl="triton")
        losses.sum().backward()
        assert len(seen) == 6  # pair forward, row side, column side
        assert all(d == x.device for d in seen)

    @pytest.mark.parametrize("w_dtype", [torch.float16, torch.float32], ids=["W16", "W32"])
    @pytest.mark.parametrize("glse_scale", [1.0, 1e-9], ids=["unit", "tiny_upstream"])
    def test_fp16_zero_and_tiny_proxies_at_d512(self, glse_scale, w_dtype):
        """fp16 operands, D = 512, gamma = 256, one zero proxy column and one of norm 1e-4
        (1/||w|| up to 1e6: the old u kernel's e * dz / ||w|| overflowed fp16); tiny
        upstream gradients (a mean over a huge batch) must not flush G to zero. Against
        the PyTorch path on the same operands."""
        B, D, C = 3, 512, 5
        g = torch.Generator().manual_seed(12)
        W = torch.randn(D, C, generator=g)
        W[:, 2] = 0.0
        W[:, 4] *= 1e-4 / W[:, 4].norm()
        x = torch.randn(B, D, generator=g)
        x[1] = W[:, 4] / W[:, 4].norm() * 3.0  # cos = 1 with the tiny proxy
        x, W = x.half(), W.to(w_dtype)
        t = torch.tensor([0, 1, -1])
        rp = torch.zeros(B)
        gl = (torch.rand(B, generator=g) + 0.5) * glse_scale
        gc = torch.randn(B, generator=g) * glse_scale
        with clt.block_config(block_m=4, block_c=8, block_d=64):
            lse, cos_y, st = clt.forward(x, W, t, rp, "circle", 256.0, 0.25, need_state=True)
            gx, gw = clt.backward(x, W, t, rp, "circle", 256.0, 0.25, lse, gl, gc, state=st)
        r_lse, r_cos = class_lse._forward_torch(x, W, t, rp, "circle", 256.0, 0.25, 2)
        r_gx, r_gw = class_lse._backward_torch(x, W, t, rp, "circle", 256.0, 0.25, 2, r_lse, gl, gc)
        if w_dtype == torch.float16:
            # A zero proxy's true gradient is (grad of w_hat) / 1e-6: beyond fp16 in any
            # implementation, so its column is left out in fp16.
            gw, r_gw = gw[:, [0, 1, 3, 4]], r_gw[:, [0, 1, 3, 4]]
        for got, want in ((lse, r_lse), (cos_y, r_cos), (gx, r_gx), (gw, r_gw)):
            assert torch.isfinite(got).all() and torch.isfinite(want).all()
        assert rel_err(lse, r_lse) < 1e-5 and rel_err(cos_y, r_cos) < 1e-5
        assert rel_err(gx, r_gx) < 2e-2
        assert rel_err(gw, r_gw) < 2e-2
        if w_dtype == torch.float32:  # (1e-9-sized gradients are below fp16's own range)
            assert (gw.abs().sum(0) > 0).all()  # nothing flushed to zero

    def test_exact_unit_cosines_agree_between_implementations(self):
        """Rows that are scaled copies of proxies, gamma = 256: the cosine is 1 exactly, and
        rounding puts the computed one on either side of it (asserted below: some land
        above 1, on negatives and on targets). Both implementations must match the
        straight-through oracle there. (At exactly +-1 an entry's gradient is radial and
        the normalisation removes it, so a rounding-decided mask changes it by ~ulp only:
        the clamp mask is gone for determinism, and this test cannot see it come back.)"""
        B, D, C = 12, 16, 9
        g = torch.Generator().manual_seed(19)
        W = torch.randn(D, C, generator=g)
        scales = torch.rand(B, generator=g) * 3 + 0.1
        cols = torch.arange(B) % C
        x = (W[:, cols] * scales).t().contiguous()
        t = (cols + 1) % C  # the exact cos = 1 column is a negative of its row...
        t[::3] = cols[::3]  # ...or its target (the target term's gradient)
        op, acc, x_op, x_hat, inv_x = class_lse.operands(x, W)
        raw, _, _ = class_lse._chunk_cosines(x_op.to(acc), x_hat, inv_x, W, op, acc)
        is_target = torch.arange(C)[None, :] == t[:, None]
        # The boundary is really crossed by rounding, on negatives and on targets.
        assert ((raw > 1) & ~is_target).any() and ((raw > 1) & is_target).any()
        x, t = torch.cat([x, -x[:2]]), torch.cat([t, t[:2]])  # and two rows at cos = -1
        B = B + 2
        rp = torch.zeros(B)
        gl, gc = torch.ones(B), torch.ones(B)
        for kind in ("circle", "scaled"):
            with clt.block_config(block_m=4, block_c=4, block_d=8):
                lse, cos_y, st = clt.forward(x, W, t, rp, kind, 256.0, 0.25, need_state=True)
                gx, gw = clt.backward(x, W, t, rp, kind, 256.0, 0.25, lse, gl, gc, state=st)
            r_lse, _ = class_lse._forward_torch(x, W, t, rp, kind, 256.0, 0.25, 4)
            r_gx, r_gw = class_lse._backward_torch(x, W, t, rp, kind, 256.0, 0.25, 4, r_lse, gl, gc)
            o_lse, o_cos, o_gx, o_gw = dense_oracle(x, W, t, rp, kind, 256.0, 0.25, gl, gc)
            assert rel_err(lse, o_lse) < 1e-5 and rel_err(cos_y, o_cos) < 1e-5
            for got in ((gx, gw), (r_gx, r_gw)):
                assert rel_err(got[0], o_gx) < 1e-4 and rel_err(got[1], o_gw) < 1e-4

    def test_cpu_autocast_gives_bf16_operands(self):
        """Under torch.autocast (CPU, bf16) fp32 inputs run with bf16 operands in both
        implementations; gradients come back in float32 (the inputs' dtype)."""
        B, D, C, cfg = SHAPES["splits"]
        x, W, t, rp, gl, gc = make_case(B, D, C, torch.float32, "curricular", cfg["block_c"], 14)
        p0, p1 = PARAMS["curricular"]
        out = {}
        for impl in ("torch", "triton"):
            xi, Wi = x.clone().requires_grad_(), W.clone().requires_grad_()
            with clt.block_config(**cfg), torch.autocast("cpu", dtype=torch.bfloat16):
                assert class_lse.operand_dtype(xi, Wi) == torch.bfloat16
                lse, cos_y = class_lse.class_logsumexp(
                    xi, Wi, t, "curricular", p0, p1, row_param=rp, impl=impl
                )
            (torch.where(torch.isfinite(lse), lse, 0) * gl + cos_y * gc).sum().backward()
            assert lse.dtype == torch.float32 and xi.grad.dtype == Wi.grad.dtype == torch.float32
            out[impl] = (lse.detach(), cos_y, xi.grad, Wi.grad)
        o = dense_oracle(x.bfloat16(), W.bfloat16(), t, rp, "curricular", p0, p1, gl, gc)
        for ours, ref, oracle in zip(out["triton"], out["torch"], o):
            assert rel_err(ours, ref) < 1e-2 and rel_err(ours, oracle) < 2e-2
