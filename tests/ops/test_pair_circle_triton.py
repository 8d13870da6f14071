"""Fused Triton kernels of the pair-level Circle loss (pml_extras/ops/pair_circle_triton.py).

As in test_class_lse_triton.py, the ``TestInterpreted*`` classes run in the
``TRITON_INTERPRET=1`` child process started by that module's ``test_interpreter_suite``
and are skipped here. To run them directly:

    TRITON_INTERPRET=1 python -m pytest tests/ops/test_pair_circle_triton.py -k Interpreted

Oracles: the PyTorch blockwise path (``impl="torch"``) on the same operand values, PML's
``CircleLoss`` and a float64 per-anchor loop (tests/helpers/reference.py). Block sizes are tiny
(4-8) so that every launch has several row blocks, column tiles, splits and D groups,
with padding in each.
"""

from __future__ import annotations

import os

if os.environ.get("PML_EXTRAS_TRITON_INTERPRET_CHILD") == "1":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import reference  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _sm90 import compile_for_sm90, nvidia_backend_or_skip  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pml_extras.ops import pair_circle  # noqa: E402
from pml_extras.ops.tolerances import PAIR_AUTOCAST_LOSS, PAIR_KERNEL  # noqa: E402

try:
    import triton  # noqa: E402, F401

    from pml_extras.ops import pair_circle_triton as pct  # noqa: E402
except ImportError:  # pragma: no cover - triton is a test dependency on Linux
    pct = None

F64 = torch.float64
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(pct is None, reason="triton is not installed")
interpreted = pytest.mark.skipif(
    not INTERPRET or pct is None,
    reason="interpreter tests run in a TRITON_INTERPRET=1 child process "
    "(test_class_lse_triton.py::test_interpreter_suite)",
)

SMALL = dict(fwd_block_m=8, fwd_block_n=4, block_m=4, block_n=8, block_n_pointer=4, block_d=4)
# name -> (B, N or None for self-comparison, D, number of classes, block config overrides)
SHAPES = {
    "self": (13, None, 10, 3, SMALL),
    "ref": (9, 21, 7, 4, SMALL),  # a reference set of another size, D not a power of two
    "dgroups": (11, None, 16, 3, dict(SMALL, d_group=8, d_group_fp32=8)),
    "splits": (6, 41, 5, 5, dict(SMALL, n_splits=3)),
    "one_row": (1, 5, 3, 2, SMALL),
    # D = 16: 16-byte rows in every dtype, so the backward loads its tiles by TMA
    "tma": (14, 19, 16, 3, SMALL),
}
# Per operand dtype: (loss rtol, gradient tolerance relative to the largest entry)
TOL = PAIR_KERNEL


def make_case(B, N, D, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1)
    labels = torch.randint(0, classes, (B,), generator=g)
    if N is None:
        labels[0] = classes  # a row whose only "positive" would be itself
        return x, x, labels, labels
    y = F.normalize(torch.randn(N, D, generator=g), dim=1)
    ref_labels = torch.randint(0, classes, (N,), generator=g)
    ref_labels[: min(N, B)] = labels[: min(N, B)]  # every early row has a positive
    return x, y, labels, ref_labels


def run(x, y, labels, ref_labels, impl, operand_dtype=None, m=0.25, gamma=64.0, seed=1):
    """(per-row losses, grad x, grad y) for a random upstream gradient; with operand_dtype
    set, the inputs are rounded to it first so the PyTorch path sees the same values."""
    same = y is x
    if operand_dtype is not None:
        x = x.to(operand_dtype).to(torch.float32)
        y = x if same else y.to(operand_dtype).to(torch.float32)
    x = x.clone().requires_grad_()
    y = x if same else y.clone().requires_grad_()
    losses = pair_circle.all_pairs_circle_loss(
        x,
        y,
        labels,
        ref_labels,
        m=m,
        gamma=gamma,
        self_compare=same,
        impl=impl,
        operand_dtype=operand_dtype,
    )
    upstream = torch.randn(losses.shape, generator=torch.Generator().manual_seed(seed))
    (losses * upstream).sum().backward()
    return losses.detach(), x.grad, (None if same else y.grad)


def assert_close_grads(got, want, tol):
    if want is None:
        assert got is None
        return
    scale = want.abs().max().clamp_min(1e-30)
    err = (got - want).abs().max() / scale
    assert err <= tol, f"gradient error {float(err):.3g} (relative to max) > {tol}"


@interpreted
class TestInterpretedPairCircle:
    def test_runs_under_interpreter(self):
        assert pct.INTERPRETED

    @pytest.mark.parametrize("shape", list(SHAPES))
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    def test_matches_torch_path(self, shape, dtype):
        B, N, D, classes, cfg = SHAPES[shape]
        x, y, labels, ref_labels = make_case(B, N, D, classes)
        want = run(x, y, labels, ref_labels, "torch", operand_dtype=dtype)
        with pct.block_config(**cfg):
            got = run(x, y, labels, ref_labels, "triton", operand_dtype=dtype)
        rtol, gtol = TOL[dtype]
        torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=1e-5)
        assert_close_grads(got[1], want[1], gtol)
        assert_close_grads(got[2], want[2], gtol)
        assert (want[0] > 0).any()  # the case has rows with a loss

    @settings(max_examples=12, deadline=None)
    @given(
        B=st.integers(1, 12),
        N=st.one_of(st.none(), st.integers(1, 12)),
        D=st.integers(1, 9),
        classes=st.integers(1, 4),
        m=st.floats(0.0, 0.5),
        gamma=st.sampled_from([1.0, 32.0, 256.0]),
        tiles=st.sampled_from([(4, 4, 4), (8, 4, 2), (4, 8, 8)]),
        seed=st.integers(0, 1000),
    )
    def test_property_matches_torch_path(self, B, N, D, classes, m, gamma, tiles, seed):
        """Any sizes, margins and tilings: the kernels equal the PyTorch path."""
        x, y, labels, ref_labels = make_case(B, N, D, classes, seed=seed)
        want = run(x, y, labels, ref_labels, "torch", m=m, gamma=gamma)
        fwd_m, bwd_n, bd = tiles
        cfg = dict(fwd_block_m=fwd_m, block_n=bwd_n, block_n_pointer=bwd_n, block_d=bd, block_m=4)
        with pct.block_config(**cfg):
            got = run(x, y, labels, ref_labels, "triton", m=m, gamma=gamma)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert_close_grads(got[1], want[1], 1e-5)
        assert_close_grads(got[2], want[2], 1e-5)

    @pytest.mark.parametrize("d,want_tma", [(16, True), (8, True), (10, False), (16, False)])
    def test_backward_tile_loads_tma_or_pointers(self, monkeypatch, d, want_tma):
        """The backward loads its tiles by TMA descriptors exactly when the path is resident
        and the rows are 16-byte multiples (bf16 D = 8, 16; not 10; D groups are never
        TMA: the last case splits D = 16 into groups of 8); both agree with the PyTorch
        path, and the TMA path streams ``block_n`` rows per step, the other
        ``block_n_pointer``."""
        x, y, labels, ref_labels = make_case(9, 13, d, 3, seed=d)
        seen = []
        real = pct._bwd_kernel

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.append((kwargs["TMA"], kwargs["BLOCK_I"], args[2] is not None))
                    return real[grid](*args, **kwargs)

                return launch

        monkeypatch.setattr(pct, "_bwd_kernel", Spy())
        cfg = dict(SMALL, d_group=16 if want_tma or d != 16 else 8)
        want = run(x, y, labels, ref_labels, "torch", operand_dtype=torch.bfloat16)
        with pct.block_config(**cfg):
            got = run(x, y, labels, ref_labels, "triton", operand_dtype=torch.bfloat16)
        block = SMALL["block_n"] if want_tma else SMALL["block_n_pointer"]
        assert seen == [(want_tma, block, want_tma)] * 2  # row side, column side
        rtol, gtol = TOL[torch.bfloat16]
        torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=1e-5)
        assert_close_grads(got[1], want[1], gtol)
        assert_close_grads(got[2], want[2], gtol)

    def test_matches_float64_reference(self):
        x, y, labels, ref_labels = make_case(10, 17, 6, 3, seed=4)
        with pct.block_config(**SMALL):
            got = run(x, y, labels, ref_labels, "triton", m=0.4, gamma=80.0)[0]
        positive = labels[:, None] == ref_labels[None, :]
        want = reference.circle_from_similarities(x.double() @ y.double().T, positive, 0.4, 80.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)

    def test_degenerate_rows_and_batches(self):
        x = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), dim=1)
        one_class = torch.zeros(6, dtype=torch.long)  # no negatives anywhere
        distinct = torch.arange(6)  # no positives anywhere
        with pct.block_config(**SMALL):
            for labels in (one_class, distinct):
                losses, gx, _ = run(x, x, labels, labels, "triton")
                assert torch.equal(losses, torch.zeros(6))
                assert torch.equal(gx, torch.zeros_like(gx))
            empty = torch.empty(0, 4)
            losses = pair_circle.all_pairs_circle_loss(
                empty, x, torch.empty(0, dtype=torch.long), distinct, impl="triton"
            )
            assert losses.shape == (0,)

    def test_finite_at_extreme_similarities(self):
        # Identical and opposite embeddings: s = +-1 exactly, gamma = 256 (face setting).
        v = F.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(3)), dim=1)
        x = torch.cat([v, v, -v, -v, v]).repeat(3, 1)
        labels = torch.tensor([0, 0, 1, 1, 1]).repeat(3)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            with pct.block_config(**SMALL):
                losses, gx, _ = run(x, x, labels, labels, "triton", dtype, m=0.25, gamma=256.0)
            assert torch.isfinite(losses).all() and torch.isfinite(gx).all()
            assert (losses > 0).any()

    @pytest.mark.parametrize("same", [True, False])
    def test_dense_mined_path(self, same):
        x, y, labels, ref_labels = make_case(12, None if same else 15, 6, 3, seed=5)
        gen = torch.Generator().manual_seed(6)
        num_cols = y.shape[0]
        a1 = torch.randint(0, 12, (60,), generator=gen)
        p = torch.randint(0, num_cols, (60,), generator=gen)
        a2 = torch.randint(0, 12, (60,), generator=gen)
        n = torch.randint(0, num_cols, (60,), generator=gen)
        keep_n = ~((a2[:, None] == a1[None, :]) & (n[:, None] == p[None, :])).any(1)
        a2, n = a2[keep_n], n[keep_n]  # no pair both positive and negative

        def mined(impl):
            xx = x.clone().requires_grad_()
            yy = xx if same else y.clone().requires_grad_()
            out = pair_circle.mined_pairs_circle_loss(
                xx, yy, a1, p, a2, n, m=0.25, gamma=64.0, path="dense", impl=impl
            )
            out.sum().backward()
            return out.detach(), xx.grad, (None if same else yy.grad)

        want = mined("torch")
        with pct.block_config(**SMALL):
            got = mined("triton")
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        assert_close_grads(got[1], want[1], 1e-5)
        assert_close_grads(got[2], want[2], 1e-5)
        assert (want[0] > 0).any()

    def test_module_under_cpu_autocast_has_bf16_operands(self, monkeypatch):
        """Issue 21: fp32 embeddings under torch.autocast(bfloat16) reach the kernels as
        bf16 operands (as the class losses' do), and the loss still matches float64 math:
        within the float32-accumulation tolerance on the bf16-rounded unit rows, and
        within the bf16 tolerance on the unrounded ones."""
        from pml_extras.losses import CircleLoss

        seen = []
        real = pct.forward
        monkeypatch.setattr(pct, "forward", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
        gen = torch.Generator().manual_seed(8)
        emb = torch.randn(20, 16, generator=gen)
        labels = torch.randint(0, 4, (20,), generator=gen)
        loss_fn = CircleLoss(m=0.25, gamma=64, impl="triton")
        with pct.block_config(**SMALL), torch.autocast("cpu", dtype=torch.bfloat16):
            losses = loss_fn.compute_loss(emb, labels, None, emb, labels)["loss"]["losses"]
        assert seen == [torch.bfloat16]
        x = F.normalize(emb.double(), dim=1)
        off = ~torch.eye(20, dtype=torch.bool)  # self-pairs are neither positive nor negative
        positive = (labels[:, None] == labels[None, :])[off].view(20, 19)
        xb = x.float().bfloat16().double()
        rounded = reference.circle_from_similarities(
            (xb @ xb.T)[off].view(20, 19), positive, 0.25, 64.0
        )
        exact = reference.circle_from_similarities(
            (x @ x.T)[off].view(20, 19), positive, 0.25, 64.0
        )
        err = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())  # noqa: E731
        # bf16 operands, float32 accumulation: the float64 loss of the bf16-rounded rows,
        # to the float32 bound (float32 operands would be 9e-4 away, as from the exact loss).
        assert err(losses, rounded) <= PAIR_KERNEL[torch.float32][1]
        assert err(losses, exact) <= PAIR_AUTOCAST_LOSS

    def test_module_matches_pml(self):
        from pytorch_metric_learning import losses as pml_losses
        from pytorch_metric_learning import miners

        from pml_extras.losses import CircleLoss

        gen = torch.Generator().manual_seed(7)
        emb = torch.randn(24, 8, generator=gen)
        labels = torch.randint(0, 4, (24,), generator=gen)
        for miner in (None, miners.MultiSimilarityMiner(epsilon=1.0)):  # dense mining
            results = []
            for loss_fn in (
                CircleLoss(m=0.25, gamma=64, impl="triton"),
                pml_losses.CircleLoss(m=0.25, gamma=64),
            ):
                e = emb.clone().requires_grad_()
                tuples = miner(e, labels) if miner is not None else None
                with pct.block_config(**SMALL):
                    loss = loss_fn(e, labels, tuples)
                loss.backward()
                results.append((loss.detach(), e.grad))
            (ours, g_ours), (pml, g_pml) = results
            torch.testing.assert_close(ours, pml, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g_ours, g_pml, rtol=1e-4, atol=1e-7)


@needs_triton
def test_block_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        pct._check_config(pct.BlockConfig(block_n=12))
    with pytest.raises(ValueError, match="n_splits"):
        pct._check_config(pct.BlockConfig(n_splits=0))
    if not pct.INTERPRETED:
        with pytest.raises(ValueError, match=">= 16"):
            pct._check_config(pct.BlockConfig(block_m=8))


@needs_triton
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_self_check_covers_the_tma_and_pointer_paths(monkeypatch, device):
    """The kernel self-check runs both ways the backward loads its tiles: its edge problem
    (D = 261: rows of 522 bf16 bytes) by pointers, its training problem (D = 512 on a GPU,
    64 under the interpreter) by TMA, in bf16 and fp16 (float32 at D = 512 uses D groups:
    never TMA)."""
    from pml_extras.ops import _triton_common, kernel_check

    monkeypatch.setattr(_triton_common, "sm_count", lambda device: 132)  # no GPU needed
    edge_d = kernel_check._pair_inputs(torch.device("cpu"))[0].shape[1]
    train_d = kernel_check.production_shapes(torch.device(device))["pair"][1]
    cfg = pct.BlockConfig()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        fp32 = dtype == torch.float32
        paths = []
        for d in (edge_d, train_d):
            x = torch.zeros(8, d, dtype=dtype)  # the check's operands: fresh, contiguous
            resident = pct._d_layout(d, cfg, fp32)[2] == 1
            paths.append(pct.tile_constexprs(d, cfg, fp32, pct._use_tma(x, x, resident))[1])
        assert not paths[0]["TMA"] and paths[0]["BLOCK_I"] == cfg.block_n_pointer
        want = not (fp32 and device == "cuda")
        assert paths[1]["TMA"] == want and paths[1]["BLOCK_I"] == (
            cfg.block_n if want else cfg.block_n_pointer
        )


def test_impl_resolution_and_errors():
    x = F.normalize(torch.randn(4, 3), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="impl must be one of"):
        pair_circle.all_pairs_circle_loss(x, x, labels, labels, impl="cuda")
    # "auto" keeps float64 and the undetached weights on the PyTorch path, even on CUDA.
    dev = x.device
    assert pair_circle.resolve_operand_dtype("auto", x.double(), x.double(), None, True) is None
    assert pair_circle.resolve_operand_dtype("auto", x, x, None, False) is None
    if dev.type == "cpu" and not INTERPRET:
        assert pair_circle.resolve_operand_dtype("auto", x, x, None, True) is None
        with pytest.raises(RuntimeError, match="triton"):
            pair_circle.all_pairs_circle_loss(x, x, labels, labels, impl="triton")
    if pct is not None and (INTERPRET or CUDA):
        with pytest.raises(TypeError, match="float64"):
            pair_circle.resolve_operand_dtype("triton", x.double(), x.double(), None, True)
        with pytest.raises(ValueError, match="detach_weights"):
            pair_circle.resolve_operand_dtype("triton", x, x, None, False)


def test_pair_operand_policy_is_the_class_one(monkeypatch):
    """Issue 21: one operand policy for both families. Outside autocast the pair kernels'
    dtype is what the two embedding sets promote to (as before); under
    torch.autocast(bfloat16) fp32 embeddings give bf16 operands, as the class losses'
    do, and the CircleLoss module hands that dtype to the op (it took the promoted
    embedding dtype, float32, before)."""
    from pml_extras.losses import CircleLoss
    from pml_extras.losses import circle_loss as module
    from pml_extras.ops import class_lse

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    x, W = torch.randn(6, 8), torch.randn(8, 5)
    pod = pair_circle.pair_operand_dtype
    for a, b in [(f32, f32), (bf16, bf16), (f16, f16), (bf16, f32), (bf16, f16), (f32, F64)]:
        assert pod(x.to(a), x.to(b)) == torch.promote_types(a, b)
    for autocast in (bf16, f16):
        with torch.autocast("cpu", dtype=autocast):
            for dt in (f32, bf16, f16):
                assert pod(x.to(dt), x.to(dt)) == autocast == class_lse.operand_dtype(x.to(dt), W)
            assert pod(x.double(), x.double()) == F64 == class_lse.operand_dtype(x.double(), W)
    seen = []
    for name in ("all_pairs_circle_loss", "mined_pairs_circle_loss"):
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs["operand_dtype"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    emb = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(12) % 3
    pairs = (torch.tensor([0, 1]), torch.tensor([3, 4]), torch.tensor([0, 1]), torch.tensor([1, 2]))
    with torch.autocast("cpu", dtype=bf16):
        CircleLoss(impl="torch")(emb, labels)
        CircleLoss(impl="torch")(emb, labels, pairs)
    CircleLoss(impl="torch")(emb, labels)
    assert seen == [bf16, bf16, f32]


def test_circle_loss_rejects_unknown_impl():
    from pml_extras.losses import CircleLoss

    with pytest.raises(ValueError, match="impl must be one of"):
        CircleLoss(impl="fast")


@needs_triton
@pytest.mark.skipif(INTERPRET, reason="compiles real kernels; not under the interpreter")
@pytest.mark.parametrize("dtype,d,mode", [("bf16", 512, 0), ("fp32", 512, 1)])
def test_kernels_compile_for_sm90(dtype, d, mode):
    """Triton -> PTX -> cubin for sm_90 with the default tiles (B = N = 16384 launch):
    catches what the interpreter accepts but the GPU compiler rejects."""
    nvidia_backend_or_skip()
    import triton.language as tl

    cfg = pct.BlockConfig()
    fwd, bwd = pct.tile_constexprs(d, cfg, dtype == "fp32")
    op = {"bf16": tl.bfloat16, "fp32": tl.float32}[dtype]
    consts = dict(
        SELF=mode == 0,
        MODE=mode,
        DOT_DTYPE=op,
        PRECISION="ieee" if dtype == "fp32" else None,
    )
    ptr = {"X": f"*{dtype}", "Y": f"*{dtype}", "LAB": "*i64", "REF": "*i64"}
    ptr.update(POS="*u8", NEG="*u8")
    for name in ("OUT", "LSE_P", "LSE_N", "G", "GRAD"):
        ptr[name] = "*fp32"
    if bwd["TMA"]:  # bf16 at D = 512: host-made descriptors of the held / streamed tiles
        ptr["AD"] = f"tensordesc<{dtype}[{bwd['BLOCK_O']}, {bwd['D_GROUP']}]>"
        ptr["BD"] = f"tensordesc<{dtype}[{bwd['BLOCK_I']}, {bwd['D_GROUP']}]>"
    else:  # the launcher passes None
        consts.update(AD=None, BD=None)
    launches = [
        (pct._fwd_kernel, fwd),
        (pct._bwd_kernel, dict(bwd, COLUMN_SIDE=False)),
        (pct._bwd_kernel, dict(bwd, COLUMN_SIDE=True)),
    ]
    for kernel, tiles in launches:
        compile_for_sm90(
            kernel,
            ptr,
            dict(consts, **tiles),
            ("m", "gamma"),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


@interpreted
class TestInterpretedCompile:
    """Under torch.compile the Triton path opts out (it runs eagerly) instead of failing:
    traced, dynamo would step into the launchers (and here into the interpreter)."""

    @pytest.mark.parametrize("which", ["pair", "class"])
    def test_compiled_equals_eager(self, which):
        import torch._dynamo

        from pml_extras.losses import CircleLoss, SparseCircleLoss
        from pml_extras.ops import class_lse_triton as clt

        def make():
            if which == "pair":
                return CircleLoss(m=0.25, gamma=32.0, impl="triton")
            torch.manual_seed(3)
            return SparseCircleLoss(11, 16, impl="triton")

        gen = torch.Generator().manual_seed(8)
        emb = torch.randn(24, 16, generator=gen)
        labels = torch.randint(0, 5, (24,), generator=gen)
        torch._dynamo.reset()
        out = []
        for compiled in (False, True):
            loss_fn = make()
            call = torch.compile(loss_fn, backend="aot_eager") if compiled else loss_fn
            e = emb.clone().requires_grad_()
            with pct.block_config(**SMALL), clt.block_config(block_m=4, block_c=4, block_d=4):
                loss = call(e, labels)
            loss.backward()
            out.append((loss.detach(), e.grad))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-6, atol=1e-7)
