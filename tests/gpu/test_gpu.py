"""The fused Triton path against float64 references: on a GPU, and in CI on CPU.

On a GPU machine run

    python -m pytest -q tests/gpu/test_gpu.py tests/ops/test_class_lse_triton.py -m "gpu or not gpu"

(``benchmarks/gpu_checks.sh`` does that and the speed benchmark in one go): the compiled
kernels at odd and medium shapes, half dtypes through real tensor cores, the memory
bound, and device-side safety (bad labels must raise a clear error before any kernel
runs).

Without a GPU, the same tests (fixtures, case builders, tolerance tables, the tests
themselves) run on CPU with the kernels under ``TRITON_INTERPRET=1``, in the child
process of ``tests/ops/test_class_lse_triton.py::test_interpreter_suite``, on small shapes:
only the device differs. In a plain CPU process they are skipped (the interpreter must
be chosen before triton is imported). The exceptions, which need CUDA itself, say why in
their skip reason: the peak-memory bounds (CPU has no peak-allocation counter),
inductor's Triton code generation, and launches on a second GPU.

The references are the float64 loops and dense forms of ``tests/helpers/reference.py``, fed the
*same* (already rounded) input values, so the tolerance only covers the kernels' float32
accumulation and the rounding of their outputs to the input dtype.
"""

from __future__ import annotations

import math
import os

import pytest
import reference as ref
import torch
import torch.nn.functional as F

from pml_extras.ops.tolerances import GPU_GRAD

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (CUDA or INTERPRET),
        reason="needs a CUDA device, or TRITON_INTERPRET=1 on CPU (test_interpreter_suite "
        "runs this module in its interpreter child)",
    ),
]
DEV = torch.device("cuda" if CUDA else "cpu")
# Every loss and op below runs the fused kernels: impl="triton" ("auto" picks them on
# CUDA, but never on CPU, where the interpreter stands in for the GPU).
IMPL = "triton"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA itself (see the module docstring)")

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, D, C): odd sizes, D not a multiple of any tile, C below and above one class tile.
# On CPU the interpreter runs each program in Python: small shapes, same oddities (and
# D large enough for C that the losses keep the paper's scale and PML's proxy init).
SHAPES = (
    [(5, 16, 3), (41, 128, 401), (7, 100, 1271), (300, 512, 5003)]
    if CUDA
    else [(5, 16, 3), (7, 20, 67)]
)
PARAMS = {"circle": (256.0, 0.25), "curricular": (64.0, 0.3), "scaled": (64.0, 0.0)}
# Gradients come back rounded to the input dtype (8 bits of mantissa for bf16).
GRAD_TOL = GPU_GRAD


def rel_err(a, b) -> float:
    a, b = a.detach().to(F64).cpu(), b.detach().to(F64).cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _no_tf32():
    """The references are exact; TF32 would cost ~1e-3 on its own. (Set through whichever
    of torch's two TF32 APIs exists, and restored after.)"""
    from pml_extras.ops._triton_common import fp32_matmul_precision

    with fp32_matmul_precision("ieee"):
        yield


def unit_rows(x):
    """x / ||x|| inside autograd: the op normalises the rows it is given, so must the
    float64 references (which take their x as given)."""
    return x / x.norm(dim=1, keepdim=True)


def _case(B, D, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(D, C, generator=g) * (0.2 + 2 * torch.rand(C, generator=g))).to(dtype)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[: min(B, 3)] = torch.tensor([0, C - 1, C // 2])[: min(B, 3)]
    return x, W, labels


# ------------------------------------------------------------------------- the op


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", list(PARAMS))
def test_op_triton_matches_float64_dense(kind, shape, dtype):
    from pml_extras.ops.class_lse import class_logsumexp

    B, D, C = shape
    x, W, target = _case(B, D, C, dtype)
    target[1::4] = -1  # rows with no target among these columns (the sharded layout)
    g = torch.Generator().manual_seed(1)
    row_param = torch.rand(B, generator=g) - 0.5
    grad_lse, grad_cos = torch.randn(B, generator=g), torch.randn(B, generator=g)
    p0, p1 = PARAMS[kind]

    xc = x.to(DEV, copy=True).requires_grad_()
    Wc = W.to(DEV, copy=True).requires_grad_()
    lse, cos_y = class_logsumexp(
        xc, Wc, target.to(DEV), kind, p0, p1, row_param=row_param.to(DEV), impl=IMPL
    )
    (lse * grad_lse.to(DEV) + cos_y * grad_cos.to(DEV)).sum().backward()

    x64 = x.to(F64).requires_grad_()
    W64 = W.to(F64).requires_grad_()
    r_lse, r_cos = ref.dense_class_logsumexp(unit_rows(x64), W64, target, kind, p0, p1, row_param)
    (r_lse * grad_lse.to(F64) + r_cos * grad_cos.to(F64)).sum().backward()

    assert lse.dtype == torch.float32 and cos_y.dtype == torch.float32
    assert rel_err(lse, r_lse) < 1e-5
    assert (cos_y.cpu().double() - r_cos.detach()).abs().max() < 1e-5
    assert xc.grad.dtype == dtype and Wc.grad.dtype == dtype
    assert rel_err(xc.grad, x64.grad) < GRAD_TOL[dtype]
    assert rel_err(Wc.grad, W64.grad) < GRAD_TOL[dtype]


@pytest.mark.parametrize("need", ["x_only", "w_only"])
def test_op_triton_partial_gradients(need):
    """Frozen proxies (linear probing) or frozen embeddings: only one gradient is asked for."""
    from pml_extras.ops.class_lse import class_logsumexp

    x, W, target = _case(*SHAPES[1], torch.float32)
    xc, Wc = x.to(DEV, copy=True), W.to(DEV, copy=True)
    (xc if need == "x_only" else Wc).requires_grad_()
    lse, _ = class_logsumexp(xc, Wc, target.to(DEV), "circle", 256.0, 0.25, impl=IMPL)
    lse.sum().backward()
    x64 = x.to(F64).requires_grad_()
    W64 = W.to(F64).requires_grad_()
    r_lse, _ = ref.dense_class_logsumexp(unit_rows(x64), W64, target, "circle", 256.0, 0.25)
    r_lse.sum().backward()
    got, want = (xc.grad, x64.grad) if need == "x_only" else (Wc.grad, W64.grad)
    assert rel_err(got, want) < 1e-4
    assert (Wc.grad if need == "x_only" else xc.grad) is None


# ------------------------------------------------------------------------- the losses


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(41, 64, 401), (7, 100, 1271)], ids=["41x401", "7x1271"])
def test_sparse_circle_cuda_matches_reference(shape, dtype):
    from pml_extras.losses import SparseCircleLoss

    B, D, C = shape if CUDA else (shape[0], 32, 37)
    x, W, labels = _case(B, D, C, dtype, seed=2)
    loss_fn = SparseCircleLoss(C, D, m=0.25, gamma=256.0, impl=IMPL).to(DEV)
    with torch.no_grad():
        loss_fn.W.copy_(W.float())
    xc = x.to(DEV, copy=True).requires_grad_()
    loss = loss_fn(xc, labels.to(DEV))
    loss.backward()

    x64 = x.to(F64).requires_grad_()
    W64 = W.to(F64).requires_grad_()
    expected = ref.class_circle_loss(x64, W64, labels, 0.25, 256.0).mean()
    expected.backward()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-4)
    assert rel_err(xc.grad, x64.grad) < GRAD_TOL[dtype]
    # W is a float32 parameter, but its gradient's matmul takes the operand dtype (G rounded
    # to it), so half embeddings bring their tolerance.
    assert rel_err(loss_fn.W.grad, W64.grad) < GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_curricular_cuda_tracks_reference_over_steps(dtype):
    """Loss, gradients and t after several SGD steps, against the float64 reference."""
    from pml_extras.losses import CurricularFaceLoss

    B, D, C = (64, 96, 1031) if CUDA else (9, 32, 37)
    x, W, _ = _case(B, D, C, torch.float32, seed=3)
    loss_fn = CurricularFaceLoss(C, D, margin=0.5, scale=64.0, impl=IMPL).to(DEV)
    with torch.no_grad():
        loss_fn.W.copy_(W)
    reference = ref.CurricularFaceReference(W, margin=0.5, scale=64.0, momentum=0.01)
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        emb = torch.randn(B, D, generator=g).to(dtype)
        labels = torch.randint(0, C, (B,), generator=g)
        opt.zero_grad()
        loss = loss_fn(emb.to(DEV), labels.to(DEV))
        loss.backward()
        opt.step()
        expected = reference.loss(emb.to(F64), labels)
        expected.backward()
        reference.sgd_step(0.5)
        # bf16 embeddings: bf16 operands, so W (float32, moved by SGD) is rounded to bf16
        # where it is read, while the reference keeps it exact (~s * 2^-9 in the logits).
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        assert math.isclose(float(loss), float(expected), rel_tol=tol)
        assert math.isclose(float(loss_fn.t), reference.t, rel_tol=tol / 10, abs_tol=1e-3 * tol)
    assert rel_err(loss_fn.W.detach(), reference.W.detach()) < tol / 10


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", ["ArcFaceLoss", "CosFaceLoss"])
def test_margin_losses_cuda_match_pml_in_float64(which, dtype):
    import pytorch_metric_learning.losses as pml_losses

    import pml_extras.losses as our_losses

    B, D, C = (41, 100, 1271) if CUDA else (7, 32, 37)
    x, W, labels = _case(B, D, C, dtype, seed=9)
    ours = getattr(our_losses, which)(C, D, impl=IMPL).to(DEV)
    theirs = getattr(pml_losses, which)(C, D).double()
    with torch.no_grad():
        ours.W.copy_(W.float())
        theirs.W.copy_(W.double())
    xc = x.to(DEV, copy=True).requires_grad_()
    loss = ours(xc, labels.to(DEV))
    loss.backward()
    x64 = x.to(F64).requires_grad_()
    expected = theirs(x64, labels)
    expected.backward()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-4)
    assert rel_err(xc.grad, x64.grad) < GRAD_TOL[dtype]
    assert rel_err(ours.W.grad, theirs.W.grad) < GRAD_TOL[dtype]  # G in the operand dtype


def test_center_losses_cuda_match_cpu():
    from pml_extras.losses import CenterLoss, StandaloneCenterLoss

    x, _, labels = _case(41, 32, 7, torch.float32, seed=5)
    for cls in (CenterLoss, StandaloneCenterLoss):
        cpu = cls(num_classes=7, embedding_size=32)
        gpu = cls(num_classes=7, embedding_size=32).to(DEV)
        gpu.load_state_dict(cpu.state_dict())
        xc = x.clone().requires_grad_()
        xg = x.to(DEV, copy=True).requires_grad_()
        lc, lg = cpu(xc, labels), gpu(xg, labels.to(DEV))
        lc.backward()
        lg.backward()
        assert math.isclose(float(lg), float(lc), rel_tol=1e-5), cls.__name__
        assert rel_err(xg.grad, xc.grad) < 1e-5, cls.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_miner", [False, True], ids=["all_pairs", "miner"])
def test_pair_circle_cuda_matches_pml(with_miner, dtype):
    from pytorch_metric_learning.losses import CircleLoss as PMLCircleLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    from pml_extras.losses import CircleLoss

    g = torch.Generator().manual_seed(6)
    B, D = (401, 64) if CUDA else (23, 12)
    emb = torch.randn(B, D, generator=g).to(dtype).to(DEV)
    labels = torch.randint(0, 7 if not CUDA else 37, (B,), generator=g).to(DEV)
    indices = MultiSimilarityMiner(0.1)(emb.float(), labels) if with_miner else None
    ours = CircleLoss(m=0.25, gamma=80, impl=IMPL)(emb, labels, indices)
    theirs = PMLCircleLoss(m=0.25, gamma=80)(emb.double(), labels, indices)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert math.isclose(float(ours), float(theirs), rel_tol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    # On CUDA "self" (D = 512) takes the backward's TMA path in bf16 and "ref" (D = 100:
    # 200-byte rows) its pointer-load path; memcheck (benchmarks/gpu_checks.sh) runs "self".
    [(1271, None, 512), (401, 1271, 100)] if CUDA else [(13, None, 10), (7, 11, 20)],
    ids=["self", "ref"],
)
def test_pair_circle_triton_matches_torch_path(shape, dtype):
    """The fused pair kernels against the PyTorch blockwise path on the same operand
    values (per-row losses and both gradients), at odd sizes with padded tiles."""
    from pml_extras.ops.pair_circle import all_pairs_circle_loss

    B, N, D = shape
    g = torch.Generator().manual_seed(9)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype).float().to(DEV)
    labels = torch.randint(0, 50 if CUDA else 4, (B,), generator=g).to(DEV)
    if N is None:
        y, ref_labels = x, labels
    else:
        y = F.normalize(torch.randn(N, D, generator=g), dim=1).to(dtype).float().to(DEV)
        ref_labels = torch.randint(0, 50 if CUDA else 4, (N,), generator=g).to(DEV)
    upstream = torch.rand(B, generator=g).to(DEV)
    out = {}
    for impl in ("torch", "triton"):
        xi = x.clone().requires_grad_()
        yi = xi if N is None else y.clone().requires_grad_()
        losses = all_pairs_circle_loss(
            xi,
            yi,
            labels,
            ref_labels,
            m=0.25,
            gamma=256,
            self_compare=N is None,
            impl=impl,
            operand_dtype=dtype,
        )
        (losses * upstream).sum().backward()
        out[impl] = (losses.detach(), xi.grad, None if N is None else yi.grad)
    assert rel_err(out["triton"][0], out["torch"][0]) < 1e-5
    for got, want in zip(out["triton"][1:], out["torch"][1:]):
        if want is not None:
            assert rel_err(got, want) < GRAD_TOL[dtype]


def extra_peak_memory(step, params) -> int:
    """Peak CUDA memory of ``step()`` above what is allocated before it, after one warm-up
    call (Triton compilation, cuBLAS workspaces); ``params`` get their .grad cleared."""
    step()
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@needs_cuda
def test_pair_circle_memory_is_linear_in_batch():
    """B = 16384, D = 512 bf16: PML's CircleLoss needs ~14 GB; ours must stay within a
    few B x D float32 buffers (no B x B tensor: that alone would be 1 GB)."""
    from pml_extras.losses import CircleLoss

    B, D = 16384, 512
    emb = torch.randn(B, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, B // 4, (B,), device="cuda")
    loss_fn = CircleLoss(m=0.25, gamma=256)
    extra = extra_peak_memory(lambda: loss_fn(emb, labels).backward(), [emb])
    budget = 16 * B * D * 4  # 512 MiB: a handful of float32 (B, D) buffers and partials
    assert extra <= budget, (extra, budget)


# ----------------------------------------------------------------------- memory and safety


@needs_cuda
@pytest.mark.parametrize("which", ["SparseCircleLoss", "CurricularFaceLoss", "ArcFaceLoss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_memory_is_bounded_by_the_gradients(which, dtype):
    """The issue's bound: extra peak memory <= 1.5 x (dW + inputs); a B x C float32 block
    at these sizes alone would be 400 MB."""
    import pml_extras.losses as our_losses

    B, D, C = 1024, 512, 100_000
    loss_fn = getattr(our_losses, which)(C, D).to(device="cuda", dtype=dtype)
    emb = torch.randn(B, D, device="cuda", dtype=dtype, requires_grad=True)
    labels = torch.randint(0, C, (B,), device="cuda")
    extra = extra_peak_memory(lambda: loss_fn(emb, labels).backward(), [emb, loss_fn.W])
    grad_w = loss_fn.W.numel() * loss_fn.W.element_size()
    inputs = 2 * emb.numel() * emb.element_size()  # the embeddings and their gradient
    budget = 1.5 * (grad_w + inputs)
    assert extra <= budget, (extra, budget)


def test_out_of_range_labels_raise_before_any_kernel():
    from pml_extras.losses import CurricularFaceLoss, SparseCircleLoss

    for cls in (SparseCircleLoss, CurricularFaceLoss):
        loss_fn = cls(10, 8, impl=IMPL).to(DEV)
        emb = torch.randn(4, 8, device=DEV)
        with pytest.raises(ValueError, match="10"):
            loss_fn(emb, torch.tensor([0, 1, 10, 2], device=DEV))
        with pytest.raises(ValueError, match="-1"):
            loss_fn(emb, torch.tensor([0, -1, 3, 2], device=DEV))
        # The context must still be usable: no device-side assert happened.
        assert float(loss_fn(emb, torch.tensor([0, 1, 9, 2], device=DEV))) >= 0


@pytest.mark.parametrize("which", ["circle", "curricular"])
def test_extreme_cosines_stay_finite_in_half_precision(which):
    """Embeddings equal to their proxy (cos = 1) or its negation (cos = -1), gamma = 256."""
    from pml_extras.losses import CurricularFaceLoss, SparseCircleLoss

    C, D = (300, 64) if CUDA else (120, 48)
    cls = SparseCircleLoss if which == "circle" else CurricularFaceLoss
    loss_fn = cls(C, D, impl=IMPL).to(DEV)
    labels = torch.arange(16, device=DEV) * 7
    proxies = loss_fn.W.detach().t()[labels]
    for dtype in (torch.float16, torch.bfloat16):
        emb = torch.cat([proxies[:8], -proxies[8:]]).to(dtype).requires_grad_()
        loss = loss_fn(emb, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
        assert torch.isfinite(loss_fn.W.grad).all()
        loss_fn.W.grad = None


@pytest.mark.skipif(
    not CUDA,
    reason="inductor's CUDA code generation needs CUDA (on CPU it compiles C++ for minutes; "
    "tests/losses/test_compile.py covers the CPU backends)",
)
def test_compile_with_inductor_on_cuda():
    from pml_extras.losses import CurricularFaceLoss, SparseCircleLoss

    torch._dynamo.reset()
    x, W, labels = _case(128, 64, 3001, torch.float32, seed=8)
    for cls in (SparseCircleLoss, CurricularFaceLoss):
        eager = cls(3001, 64).cuda()
        with torch.no_grad():
            eager.W.copy_(W)
        compiled_fn = cls(3001, 64).cuda()
        compiled_fn.load_state_dict(eager.state_dict())
        compiled = torch.compile(compiled_fn)
        xe, xc = x.cuda().requires_grad_(), x.cuda().requires_grad_()
        le, lc = eager(xe, labels.cuda()), compiled(xc, labels.cuda())
        le.backward()
        lc.backward()
        assert math.isclose(float(lc), float(le), rel_tol=1e-5), cls.__name__
        assert rel_err(xc.grad, xe.grad) < 1e-5
        assert rel_err(compiled_fn.W.grad, eager.W.grad) < 1e-5


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs two GPUs (on CPU the launch context is checked by "
    "test_class_lse_triton.py::TestInterpretedGpuPath::test_every_launch_runs_under_the_"
    "tensors_device)",
)
def test_launches_follow_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: every kernel must launch on cuda:1."""
    from pml_extras.losses import CircleLoss, SparseCircleLoss

    x, W, labels = _case(41, 64, 401, torch.bfloat16, seed=10)
    out = {}
    for dev in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):
            loss_fn = SparseCircleLoss(401, 64, impl=IMPL).to(dev)
            with torch.no_grad():
                loss_fn.W.copy_(W.float())
            xd = x.to(dev).requires_grad_()
            loss = loss_fn(xd, labels.to(dev)) + CircleLoss(impl=IMPL)(xd, labels.to(dev))
            loss.backward()
            torch.cuda.synchronize(dev)
            out[dev] = (loss.detach().cpu(), xd.grad.cpu(), loss_fn.W.grad.cpu())
    for a, b in zip(out["cuda:0"], out["cuda:1"]):
        assert rel_err(a, b) < 1e-6
