"""CUDA-only checks: the fused Triton path against float64 references, on a real GPU.

Everything here is skipped without a CUDA device (CI has none). On a GPU machine run

    python -m pytest -q tests/test_gpu.py tests/test_class_lse_triton.py -m "gpu or not gpu"

(``benchmarks/gpu_checks.sh`` does that and the speed benchmark in one go). The CPU suite
already proves the kernels' arithmetic under ``TRITON_INTERPRET=1`` on tiny shapes; these
tests add what only a GPU shows: the compiled kernels at odd and medium shapes, half
dtypes through real tensor cores, the memory bound, and device-side safety (bad labels
must raise a clear error before any kernel runs).

The references are the float64 loops and dense forms of ``tests/reference.py``, fed the
*same* (already rounded) input values, so the tolerance only covers the kernels' float32
accumulation and the rounding of their outputs to the input dtype.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, D, C): odd sizes, D not a multiple of any tile, C below and above one class tile.
SHAPES = [(5, 16, 3), (41, 128, 401), (7, 100, 1271), (300, 512, 5003)]
PARAMS = {"circle": (256.0, 0.25), "curricular": (64.0, 0.3), "scaled": (64.0, 0.0)}
# Gradients come back rounded to the input dtype (8 bits of mantissa for bf16).
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def rel_err(a, b) -> float:
    a, b = a.detach().to(F64).cpu(), b.detach().to(F64).cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _no_tf32():
    """The references are exact; TF32 would cost ~1e-3 on its own."""
    with torch.backends.cuda.matmul.flags(allow_tf32=False):
        yield


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

    xc = x.cuda().requires_grad_()
    Wc = W.cuda().requires_grad_()
    lse, cos_y = class_logsumexp(
        xc, Wc, target.cuda(), kind, p0, p1, row_param=row_param.cuda(), impl="triton"
    )
    (lse * grad_lse.cuda() + cos_y * grad_cos.cuda()).sum().backward()

    x64 = x.to(F64).requires_grad_()
    W64 = W.to(F64).requires_grad_()
    r_lse, r_cos = ref.dense_class_logsumexp(x64, W64, target, kind, p0, p1, row_param)
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

    x, W, target = _case(41, 128, 401, torch.float32)
    xc, Wc = x.cuda(), W.cuda()
    (xc if need == "x_only" else Wc).requires_grad_()
    lse, _ = class_logsumexp(xc, Wc, target.cuda(), "circle", 256.0, 0.25, impl="triton")
    lse.sum().backward()
    x64 = x.to(F64).requires_grad_()
    W64 = W.to(F64).requires_grad_()
    r_lse, _ = ref.dense_class_logsumexp(x64, W64, target, "circle", 256.0, 0.25)
    r_lse.sum().backward()
    got, want = (xc.grad, x64.grad) if need == "x_only" else (Wc.grad, W64.grad)
    assert rel_err(got, want) < 1e-4
    assert (Wc.grad if need == "x_only" else xc.grad) is None


# ------------------------------------------------------------------------- the losses


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(41, 64, 401), (7, 100, 1271)], ids=["41x401", "7x1271"])
def test_sparse_circle_cuda_matches_reference(shape, dtype):
    from pml_extras.losses import SparseCircleLoss

    B, D, C = shape
    x, W, labels = _case(B, D, C, dtype, seed=2)
    loss_fn = SparseCircleLoss(C, D, m=0.25, gamma=256.0).cuda()
    with torch.no_grad():
        loss_fn.W.copy_(W.float())
    xc = x.cuda().requires_grad_()
    loss = loss_fn(xc, labels.cuda())
    loss.backward()

    x64 = x.to(F64).requires_grad_()
    W64 = W.to(F64).requires_grad_()
    expected = ref.class_circle_loss(x64, W64, labels, 0.25, 256.0).mean()
    expected.backward()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-4)
    assert rel_err(xc.grad, x64.grad) < GRAD_TOL[dtype]
    assert rel_err(loss_fn.W.grad, W64.grad) < 1e-4  # W is a float32 parameter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_curricular_cuda_tracks_reference_over_steps(dtype):
    """Loss, gradients and t after several SGD steps, against the float64 reference."""
    from pml_extras.losses import CurricularFaceLoss

    B, D, C = 64, 96, 1031
    x, W, _ = _case(B, D, C, torch.float32, seed=3)
    loss_fn = CurricularFaceLoss(C, D, margin=0.5, scale=64.0).cuda()
    with torch.no_grad():
        loss_fn.W.copy_(W)
    reference = ref.CurricularFaceReference(W, margin=0.5, scale=64.0, momentum=0.01)
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        emb = torch.randn(B, D, generator=g).to(dtype)
        labels = torch.randint(0, C, (B,), generator=g)
        opt.zero_grad()
        loss = loss_fn(emb.cuda(), labels.cuda())
        loss.backward()
        opt.step()
        expected = reference.loss(emb.to(F64), labels)
        expected.backward()
        reference.sgd_step(0.5)
        assert math.isclose(float(loss), float(expected), rel_tol=1e-4)
        assert math.isclose(float(loss_fn.t), reference.t, rel_tol=1e-5, abs_tol=1e-7)
    assert rel_err(loss_fn.W.detach(), reference.W.detach()) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", ["ArcFaceLoss", "CosFaceLoss"])
def test_margin_losses_cuda_match_pml_in_float64(which, dtype):
    import pytorch_metric_learning.losses as pml_losses

    import pml_extras.losses as our_losses

    B, D, C = 41, 100, 1271
    x, W, labels = _case(B, D, C, dtype, seed=9)
    ours = getattr(our_losses, which)(C, D).cuda()
    theirs = getattr(pml_losses, which)(C, D).double()
    with torch.no_grad():
        ours.W.copy_(W.float())
        theirs.W.copy_(W.double())
    xc = x.cuda().requires_grad_()
    loss = ours(xc, labels.cuda())
    loss.backward()
    x64 = x.to(F64).requires_grad_()
    expected = theirs(x64, labels)
    expected.backward()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-4)
    assert rel_err(xc.grad, x64.grad) < GRAD_TOL[dtype]
    assert rel_err(ours.W.grad, theirs.W.grad) < 1e-4


def test_center_losses_cuda_match_cpu():
    from pml_extras.losses import CenterLoss, StandaloneCenterLoss

    x, _, labels = _case(41, 32, 7, torch.float32, seed=5)
    for cls in (CenterLoss, StandaloneCenterLoss):
        cpu = cls(num_classes=7, embedding_size=32)
        gpu = cls(num_classes=7, embedding_size=32).cuda()
        gpu.load_state_dict(cpu.state_dict())
        xc = x.clone().requires_grad_()
        xg = x.cuda().requires_grad_()
        lc, lg = cpu(xc, labels), gpu(xg, labels.cuda())
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
    emb = torch.randn(401, 64, generator=g).to(dtype).cuda()
    labels = torch.randint(0, 37, (401,), generator=g).cuda()
    indices = MultiSimilarityMiner(0.1)(emb.float(), labels) if with_miner else None
    ours = CircleLoss(m=0.25, gamma=80)(emb, labels, indices)
    theirs = PMLCircleLoss(m=0.25, gamma=80)(emb.double(), labels, indices)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert math.isclose(float(ours), float(theirs), rel_tol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1271, None, 100), (401, 1271, 512)], ids=["self", "ref"])
def test_pair_circle_triton_matches_torch_path(shape, dtype):
    """The fused pair kernels against the PyTorch blockwise path on the same operand
    values (per-row losses and both gradients), at odd sizes with padded tiles."""
    from pml_extras.ops.pair_circle import all_pairs_circle_loss

    B, N, D = shape
    g = torch.Generator().manual_seed(9)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype).float().cuda()
    labels = torch.randint(0, 50, (B,), generator=g).cuda()
    if N is None:
        y, ref_labels = x, labels
    else:
        y = F.normalize(torch.randn(N, D, generator=g), dim=1).to(dtype).float().cuda()
        ref_labels = torch.randint(0, 50, (N,), generator=g).cuda()
    upstream = torch.rand(B, generator=g).cuda()
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
        loss_fn = cls(10, 8).cuda()
        emb = torch.randn(4, 8, device="cuda")
        with pytest.raises(ValueError, match="10"):
            loss_fn(emb, torch.tensor([0, 1, 10, 2], device="cuda"))
        with pytest.raises(ValueError, match="-1"):
            loss_fn(emb, torch.tensor([0, -1, 3, 2], device="cuda"))
        # The context must still be usable: no device-side assert happened.
        assert float(loss_fn(emb, torch.tensor([0, 1, 9, 2], device="cuda"))) >= 0


@pytest.mark.parametrize("which", ["circle", "curricular"])
def test_extreme_cosines_stay_finite_in_half_precision(which):
    """Embeddings equal to their proxy (cos = 1) or its negation (cos = -1), gamma = 256."""
    from pml_extras.losses import CurricularFaceLoss, SparseCircleLoss

    C, D = 300, 64
    loss_fn = (SparseCircleLoss(C, D) if which == "circle" else CurricularFaceLoss(C, D)).cuda()
    labels = torch.arange(16, device="cuda") * 7
    proxies = loss_fn.W.detach().t()[labels]
    for dtype in (torch.float16, torch.bfloat16):
        emb = torch.cat([proxies[:8], -proxies[8:]]).to(dtype).requires_grad_()
        loss = loss_fn(emb, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
        assert torch.isfinite(loss_fn.W.grad).all()
        loss_fn.W.grad = None


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
