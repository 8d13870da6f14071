"""Registers, spills and wgmma use of the fused kernels for an H100 (sm_90a), compiled on
CPU (Triton -> PTX, then ptxas -v; no GPU needed), at the production specialisation
(D = 512, large aligned tensors, default tiles). Fails when a bf16 variant spills more
than its recorded budget: 0 everywhere except the forward's two known spills below.

Run ``python -m pytest -s tests/gpu/test_sm90_spills.py`` to see the report (one line per
variant); docs/kernels/cost_model.md quotes it, and pml_extras/ops/cost_model/ptxas_figures.py's
PTXAS_SM90 holds the figures the model's occupancy uses."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
from _sm90 import compile_for_sm90, local_memory_sites, nvidia_backend_or_skip, wgmma_overlap

try:
    import triton  # noqa: F401

    from pml_extras.ops import class_lse_triton as clt
    from pml_extras.ops import pair_circle_triton as pct
except ImportError:  # pragma: no cover - triton is a test dependency on Linux
    clt = pct = None

pytestmark = [
    pytest.mark.skipif(clt is None, reason="triton is not installed"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1",
        reason="compiles real kernels; not under the interpreter",
    ),
]

# Spill bytes (stores + loads) each bf16 variant may have. The class forward (resident:
# x block and W tiles loaded once, a 64 x 512 float32 u accumulator in registers) fits
# with bf16 W; with fp32 W (autocast) the tile's conversion costs 44 + 44 bytes. The
# K-loop forward (D split over programs, or fwd_resident=False) fits with bf16 W and
# spills 216 + 216 bytes with fp32 W (the 512 x 32 float32 W tile it loads for u). Any
# other spill fails.
SPILL_BUDGET = {
    ("class_fwd", "fp32"): 88,
    ("class_fwd_kloop", "fp32"): 432,
}


def ptxas_report(compiled) -> dict:
    """Registers, spill bytes, shared memory and wgmma / mma.sync counts of a kernel
    compiled for sm_90a, from ptxas -v on its PTX (the ptxas Triton itself uses)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
             "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(
        int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    )
    return {
        "registers": regs,
        "spill_bytes": stores + loads,
        "shared": compiled.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        "bf16_casts": bf16_casts(ptx),
    }


def bf16_casts(ptx: str) -> dict:
    """Opcodes (with counts) of the PTX's float32 -> bfloat16 conversions, e.g.
    ``cvt.rn.bf16x2.f32``: the rounding the GPU applies where the kernels round to the
    operand dtype (the interpreter is made to round alike: ops/_interpreter_rounding.py)."""
    found: dict = {}
    for line in ptx.splitlines():
        op = (line.split() or [""])[0]
        if op.startswith("cvt.") and op.endswith(".f32") and ".bf16" in op:
            found[op] = found.get(op, 0) + 1
    return found


def _class_variants():
    import triton.language as tl

    cfg = clt.BlockConfig()
    block_d, d_group, _ = clt._d_layout(512, cfg, False)
    for w in ("bf16", "fp32"):  # bf16 W, and fp32 W under autocast
        common = dict(
            KIND=1,  # curricular: the transform with the most live state
            P1_PTR=True,
            OP_DTYPE=tl.bfloat16,
            DOT_DTYPE=tl.bfloat16,
            PRECISION=None,
            BLOCK_C=cfg.block_c,
            BLOCK_D=block_d,
            D_GROUP=d_group,
        )
        ptrs = dict(X="*bf16", W=f"*{w}", GW=f"*{w}", TGT="*i64")
        for name in ("INV", "RX", "RP", "P1", "M_OUT", "L_OUT", "U_OUT", "LSE", "GLSE"):
            ptrs[name] = "*fp32"
        resident = cfg.fwd_resident and d_group >= 512
        fwd = dict(common, NEED_U=True, BLOCK_M=cfg.block_m, RESIDENT=resident, P_SIDE=resident)
        bwd = dict(
            common,
            RESCALE=False,
            BLOCK_M=clt._bwd_block_m(cfg),
            BLOCK_C=clt._bwd_block_c(cfg, tl.bfloat16),
            RESIDENT=d_group >= 512,
        )
        # The no-grad forward, and the K-loop forward (D split over programs, or
        # BlockConfig(fwd_resident=False)) at the same tiles.
        nograd = dict(fwd, NEED_U=False, RESIDENT=d_group >= 512, P_SIDE=False)
        kloop = dict(fwd, RESIDENT=False, P_SIDE=False)
        for name, kernel, consts in (
            ("class_fwd", clt._fwd_kernel, fwd),
            ("class_bwd", clt._bwd_w_kernel, bwd),
            ("class_fwd_nograd", clt._fwd_kernel, nograd),
            ("class_fwd_kloop", clt._fwd_kernel, kloop),
        ):
            yield pytest.param(
                name, w, kernel, ptrs, consts, ("p0", "p1_value"), cfg, id=f"{name}-W{w}"
            )


def _pair_variants():
    import triton.language as tl

    cfg = pct.BlockConfig()
    fwd, bwd = pct.tile_constexprs(512, cfg, False)  # what the launchers pass at D = 512
    # The backward's tiles come by TMA at D = 512 (bf16 rows of 1024 bytes, H100).
    consts = dict(SELF=True, MODE=0, DOT_DTYPE=tl.bfloat16, PRECISION=None, TMA=True)
    ptrs = {"X": "*bf16", "Y": "*bf16", "LAB": "*i64", "REF": "*i64", "POS": "*u8"}
    ptrs["NEG"] = "*u8"
    ptrs["AD"] = f"tensordesc<bf16[{cfg.block_m}, {bwd['D_GROUP']}]>"
    ptrs["BD"] = f"tensordesc<bf16[{cfg.block_n}, {bwd['D_GROUP']}]>"
    for name in ("OUT", "LSE_P", "LSE_N", "G", "GRAD"):
        ptrs[name] = "*fp32"
    for name, kernel, tiles in (
        ("pair_fwd", pct._fwd_kernel, fwd),
        ("pair_bwd_row", pct._bwd_kernel, dict(bwd, COLUMN_SIDE=False)),
        ("pair_bwd_column", pct._bwd_kernel, dict(bwd, COLUMN_SIDE=True)),
    ):
        yield pytest.param(
            name, "bf16", kernel, ptrs, dict(consts, **tiles), ("m", "gamma"), cfg, id=name
        )


def _pair_fallback_variants():
    """The pair backward's other bf16 paths: pointer loads (no TMA: rows that are not
    16-byte multiples, GPUs before Hopper; 32 rows streamed) and D groups (D = 1024)."""
    import triton.language as tl

    cfg = pct.BlockConfig()
    ptrs = {"X": "*bf16", "Y": "*bf16", "LAB": "*i64", "REF": "*i64", "POS": "*u8"}
    ptrs["NEG"] = "*u8"
    for name in ("OUT", "LSE_P", "LSE_N", "G", "GRAD"):
        ptrs[name] = "*fp32"
    consts = dict(SELF=True, MODE=0, DOT_DTYPE=tl.bfloat16, PRECISION=None, AD=None, BD=None)
    for d, label in ((512, "pointer"), (1024, "dgroups")):
        _, bwd = pct.tile_constexprs(d, cfg, False, tma=False)
        for side in ("row", "column"):
            tiles = dict(bwd, COLUMN_SIDE=side == "column")
            yield pytest.param(
                f"pair_bwd_{side}_{label}", "bf16", pct._bwd_kernel, ptrs,
                dict(consts, **tiles), ("m", "gamma"), cfg, id=f"pair_bwd_{side}_{label}",
            )  # fmt: skip


def _variants():
    if clt is None:
        return []
    return list(_class_variants()) + list(_pair_variants()) + list(_pair_fallback_variants())


@pytest.mark.parametrize("name,w,kernel,ptrs,consts,floats,cfg", _variants())
def test_bf16_kernels_do_not_spill(name, w, kernel, ptrs, consts, floats, cfg):
    """bf16 operands at D = 512: report registers / spills / wgmma, fail on a spill over
    the variant's budget, and check that the matmuls run on wgmma (tensor cores)."""
    nvidia_backend_or_skip()
    compiled = compile_for_sm90(
        kernel,
        ptrs,
        consts,
        floats,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        unit_strides=("stride_xd", "stride_wc", "stride_gc"),
    )
    r = ptxas_report(compiled)
    print(
        f"\n{name} (bf16 operands, W {w}): {r['registers']} registers, "
        f"{r['spill_bytes']} spill bytes, {r['shared']} B shared, "
        f"{r['wgmma']} wgmma, {r['mma_sync']} mma.sync"
    )
    budget = SPILL_BUDGET.get((name, w), 0)
    assert r["spill_bytes"] <= budget, (
        f"{name} with W {w} spills {r['spill_bytes']} bytes (budget {budget}): "
        f"{r['registers']} registers"
    )
    assert r["wgmma"] > 0, f"{name}: no wgmma instruction, the matmuls left the tensor cores"
    # Every rounding to bf16 is to nearest even (cvt.rn), as torch's and the interpreter's.
    assert all(op.startswith("cvt.rn.") for op in r["bf16_casts"]), r["bf16_casts"]


def test_bf16_casts_reads_the_rounding():
    ptx = "\n".join(
        [
            "\tcvt.rn.bf16x2.f32 \t%r1, %f1, %f2;",
            "    cvt.rn.bf16.f32 %rs1, %f3;",
            "    cvt.rz.bf16.f32 %rs2, %f4;",
            "    cvt.f32.bf16 %f5, %rs3;",  # a widening: not a rounding
            "    cvt.u64.u32 %rd1, %r2;",
        ]
    )
    assert bf16_casts(ptx) == {"cvt.rn.bf16x2.f32": 1, "cvt.rn.bf16.f32": 1, "cvt.rz.bf16.f32": 1}


def test_wgmma_overlap_reads_the_wait_groups():
    """The PTX reading behind the cost model's ``overlap``: work between a wgmma commit and
    a ``wait_group 0`` is in flight; after the wait, or with one group allowed to stay
    open while the next one is waited for, it is counted as such."""
    ptx = "\n".join(
        [
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};",
            "wgmma.commit_group.sync.aligned;",
            "ex2.approx.f32 %r1, %r2;",  # in flight
            "wgmma.wait_group.sync.aligned 1;",  # the group may still be open
            "fma.rn.f32 %r3, %r1, %r1, %r1;",  # in flight
            "wgmma.wait_group.sync.aligned 0;",
            "ex2.approx.f32 %r4, %r3;",  # after the wait
            "mul.f32 %r5, %r4, %r4;",
        ]
    )
    r = wgmma_overlap(ptx)
    assert r == {"ex2": 2, "ex2_in_flight": 1, "f32": 2, "f32_in_flight": 1, "max_wait": 1}
    assert wgmma_overlap(ptx.replace("sync.aligned 1;", "sync.aligned 0;"))["f32_in_flight"] == 0


def test_class_overlap_in_the_model_is_what_the_ptx_does():
    """The cost model's ``overlap`` for the class kernels as built (CURRENT_CLASS) must be
    backed by the compiled PTX (bf16, D = 512, production specialisation): overlap > 0
    only if some softmax exponential is issued while a wgmma group is in flight, and 0
    when none is (every dot waited for with ``wait_group 0`` before the elementwise work;
    a ``wait_group 1`` inside the logits' K-loop pipelines the K steps, not the softmax)."""
    nvidia_backend_or_skip()
    from pml_extras.ops import cost_model as cm

    for param in _class_variants():
        name, w, kernel, ptrs, consts, floats, cfg = param.values
        compiled = compile_for_sm90(
            kernel, ptrs, consts, floats, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            unit_strides=("stride_xd", "stride_wc", "stride_gc"),
        )  # fmt: skip
        # Where the spills sit (SASS): inside the class loop they cost every tile. A
        # variant ptxas reports spill-free must have no local-memory instruction.
        sites = local_memory_sites(compiled)
        spills = ptxas_report(compiled)["spill_bytes"]
        print(f"\n{name} (W {w}): {spills} spill bytes, {sites}")
        assert (sites["local"] == 0) == (spills == 0), (name, w, spills, sites)
        if w != "bf16" or name not in ("class_fwd", "class_bwd"):
            continue
        r = wgmma_overlap(compiled.asm["ptx"])
        print(f"{name}: {r}")
        assert r["ex2"] > 0, f"{name}: no exponential found in the PTX: the reading is broken"
        overlapped = r["ex2_in_flight"] > 0
        assert overlapped == (cm.CURRENT_CLASS.overlap > 0), (
            f"{name}: the model says overlap {cm.CURRENT_CLASS.overlap} for design "
            f"{cm.CURRENT_CLASS.name!r}, the PTX has {r['ex2_in_flight']} of {r['ex2']} "
            "exponentials under an open wgmma group"
        )


# The class tiles beyond the defaults (forward 64 x 32, bf16 backward 64 x 64), as the
# kernels compile them today: (name, kernel, tile constexprs, num_stages). Two stages of
# a 128-class W tile (or a 128-row x block) next to the resident operand pass the 227 KB
# of shared memory, so those compile single-buffered: the tile then goes through
# registers, next to the 128-register accumulator. The backward's 64 x 64 with one stage
# (its x block through registers) and 32 x 64 (its logits on mma.sync) spill too.
_LARGER_TILES = (
    ("class_fwd 64x64", "fwd", dict(BLOCK_M=64, BLOCK_C=64), 2),
    ("class_fwd 64x128", "fwd", dict(BLOCK_M=64, BLOCK_C=128), 1),
    ("class_bwd 64x64", "bwd", dict(BLOCK_M=64, BLOCK_C=64), 1),
    ("class_bwd 128x64", "bwd", dict(BLOCK_M=128, BLOCK_C=64), 1),
    ("class_bwd 64x128", "bwd", dict(BLOCK_M=64, BLOCK_C=128), 1),
    ("class_bwd 32x64", "bwd", dict(BLOCK_M=32, BLOCK_C=64), 2),
)


@pytest.mark.skipif(
    os.environ.get("PML_EXTRAS_COMPILE_ALL") != "1",
    reason="~1 min of compilation; set PML_EXTRAS_COMPILE_ALL=1",
)
def test_larger_class_tiles_still_spill():
    """The figures behind docs/kernels/cost_model.md's "what Triton 3.9 builds": every
    larger tile of the class kernels (bf16 operands and W, D = 512) spills, which is why
    the defaults stay at 64 x 32 (forward) and 64 x 64 (bf16 backward, two stages). Fails
    when one stops spilling: then it is buildable, and the design (BlockConfig, the
    model's CURRENT_CLASS) should move."""
    nvidia_backend_or_skip()
    variants = {name: param.values for name, param in _variant_names()}
    fwd, bwd = variants["class_fwd-Wbf16"], variants["class_bwd-Wbf16"]
    for label, which, tiles, stages in _LARGER_TILES:
        _, _, kernel, ptrs, consts, floats, cfg = fwd if which == "fwd" else bwd
        compiled = compile_for_sm90(
            kernel, ptrs, dict(consts, **tiles), floats, num_warps=cfg.num_warps,
            num_stages=stages, unit_strides=("stride_xd", "stride_wc", "stride_gc"),
        )  # fmt: skip
        r = ptxas_report(compiled)
        print(
            f"\n{label} ({stages} stage(s)): {r['registers']} registers, {r['spill_bytes']} "
            f"spill bytes, {r['shared']} B shared, {r['wgmma']} wgmma"
        )
        assert r["spill_bytes"] > 0, f"{label} compiles without spills now: revisit the tiles"


def _variant_names():
    for param in _class_variants():
        yield param.id, param


def wgmma_waits(ptx: str) -> list:
    """The pending-group counts N of every ``wgmma.wait_group.sync.aligned N`` in ``ptx``."""
    return [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]


def test_wgmma_waits_are_read_from_ptx():
    ptx = "wgmma.wait_group.sync.aligned 0;\n  wgmma.wait_group.sync.aligned  1;\nwgmma.fence"
    assert wgmma_waits(ptx) == [0, 1]
    assert wgmma_waits("mma.sync.aligned.m16n8k16") == []


@pytest.mark.parametrize(
    "name,w,kernel,ptrs,consts,floats,cfg", list(_pair_variants()) if pct is not None else []
)
def test_pair_overlap_in_the_cost_model_is_what_the_ptx_allows(
    name, w, kernel, ptrs, consts, floats, cfg
):
    """Issue 21: the cost model's ``overlap`` for the built pair kernels must be justified
    by the PTX. Softmax work can only run under a wgmma if some wait leaves groups in
    flight (``wgmma.wait_group.sync.aligned N`` with N > 0); a kernel whose every wait is
    ``0`` gets overlap 0 in the model, and overlap > 0 needs such a wait."""
    nvidia_backend_or_skip()
    from pml_extras.ops import cost_model as cm

    compiled = compile_for_sm90(
        kernel, ptrs, consts, floats, num_warps=cfg.num_warps, num_stages=cfg.num_stages
    )
    waits = wgmma_waits(compiled.asm["ptx"])
    print(f"\n{name}: wgmma.wait_group pending counts {sorted(set(waits))}")
    assert waits, f"{name}: no wgmma.wait_group (the dots left the tensor cores?)"
    overlap = cm.CURRENT_PAIR.overlap
    if max(waits) == 0:
        assert overlap == 0.0, f"{name}: only wait_group 0 in the PTX, but overlap {overlap}"
    else:
        assert overlap > 0.0, f"{name}: waits {sorted(set(waits))} allow overlap; model says 0"
