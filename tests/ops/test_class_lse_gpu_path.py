"""The class kernels' GPU path, run in CI without a GPU: compiled for sm_90a with ptxas,
impl="triton" against impl="torch" through the loss modules (a GPU, or the interpreter
child of test_class_lse_triton.py::test_interpreter_suite), the TF32 settings, whole-wave
grids, the deterministic target column and the launches' device (issue 10).

    TRITON_INTERPRET=1 python -m pytest tests/ops/test_class_lse_gpu_path.py -k Interpreted
"""

from __future__ import annotations

import os

_CHILD = "PML_EXTRAS_TRITON_INTERPRET_CHILD"
if os.environ.get(_CHILD) == "1":
    # Before anything imports triton (the parent also sets it in the child's environment).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _sm90 import compile_for_sm90, nvidia_backend_or_skip  # noqa: E402
from class_triton_cases import (  # noqa: E402
    CUDA,
    INTERPRET,
    KINDS,
    PARAMS,
    SHAPES,
    check_all,
    clt,
    dense_oracle,
    fp32_matmul_precision,
    interpreted,
    make_case,
    needs_triton,
    rel_err,
    tc,
    triton,
)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pml_extras.ops import class_lse, precision  # noqa: E402

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
                # The launcher's tile: 64 classes for bf16 operands, block_c otherwise.
                BLOCK_C=clt._bwd_block_c(cfg, op),
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
