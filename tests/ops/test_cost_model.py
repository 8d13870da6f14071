"""The cost model (the package pml_extras/ops/cost_model/): its arithmetic against a hand count, its
properties, the table in docs/kernels/cost_model.md, and the benchmark hook that prints
its predictions (benchmarks/speed_bench/predicted.py). Everything here is CPU arithmetic;
the model's times are predictions, never measured here."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_extras.ops import cost_model as cm
from pml_extras.ops.cost_model.class_kernels import hybrid_launches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_forward_matches_a_hand_count():
    """Design v1's class forward at B = 128, C = 64, D = 64, bf16, on the H100 SXM.

    Tiles 64 x 32, so 2 row blocks x 2 class tiles = 4 (row block, class tile) steps and
    8192 logits. Splits: the u partials may not exceed W (64 * 2 bytes // (128 * 4) = 0,
    so at most 1 split): 1 split, 2 programs.
    Each step loads through L2: the x block 64 * 64 * 2 = 8192 B, the W tile twice
    (logits, u) 2 * 32 * 64 * 2 = 8192 B, 1/||w|| 32 * 4 = 128 B: 16512 B; 4 steps:
    66048 B. Partials (u, max, sum; float32): 1 * 128 * (64 + 2) * 4 = 33792 B, written
    and counted once in L2 and once in HBM. L2 = 99840 B.
    HBM: W 8192 + x 16384 + 1/||w|| 256 + partials 33792 = 58624 B.
    FLOPs: logits and u, 2 * 2 * 8192 * 64 = 2097152.
    Shared memory: staged tiles 4 * (8192 + 8192) = 65536 B; wgmma operand reads per
    step: logits 64 x 32 x 64 with two warpgroups side by side (n16 each), 4 k16 steps,
    each reading A 64 * 16 * 2 = 2048 B and B 16 * 16 * 2 = 512 B: 2 * 4 * 2560 = 20480;
    u 64 x 64 x 32 with A (the softmax weights) in registers, B 16 * 32 * 2 = 1024 B,
    2 k16 steps: 2 * 2 * 1024 = 4096. Total 65536 + 4 * 24576 = 163840 B.
    CUDA cores: 19 instructions and 1 exp per logit: 155648 and 8192.
    Occupancy: 255 registers (ptxas) -> 256 * 256 threads = the whole 65536-register
    file: 1 program per SM; 2 programs on 132 SMs: wave efficiency 2 / 132.
    Times: tensor 2097152 / 989.4e12 * 66; CUDA cores 155648 / (128 * 132 * 1.83e9) * 66
    (the exps take 8192 / (16 * 132 * 1.83e9) * 66, less); no overlap, so compute =
    CUDA + tensor; smem 163840 / (128 * 132 * 1.83e9) * 66 (below compute); L2
    99840 / 7e12; HBM 58624 / 3.35e12; time = compute + one launch of 3 us."""
    fwd = cm.class_kernels(128, 64, 64, "bf16", "bf16", cm.V1, cm.H100_SXM)[1]
    assert fwd.programs == 2
    assert fwd.l2 == 99840
    assert fwd.hbm == 58624
    assert fwd.flops == 2097152
    assert fwd.smem == 163840
    assert (fwd.alu, fwd.sfu) == (155648, 8192)
    p = cm.predict(fwd, cm.H100_SXM)
    assert p.blocks_per_sm == 1
    assert p.wave_efficiency == pytest.approx(2 / 132, rel=1e-12)
    t_tensor = 2097152 / 989.4e12 * 66
    t_alu = 155648 / (128 * 132 * 1.83e9) * 66
    assert p.t_tensor == pytest.approx(t_tensor, rel=1e-9)
    assert p.t_compute == pytest.approx(t_alu + t_tensor, rel=1e-9)
    assert p.t_smem == pytest.approx(163840 / (128 * 132 * 1.83e9) * 66, rel=1e-9)
    assert p.t_l2 == pytest.approx(99840 / 7e12, rel=1e-9)
    assert p.t_hbm == pytest.approx(58624 / 3.35e12, rel=1e-9)
    assert p.bound == "compute"
    assert p.time == pytest.approx(t_alu + t_tensor + 3e-6, rel=1e-9)


def test_floors_match_a_hand_count():
    """Class: 3 matmuls of 2 * 1024 * 1e6 * 512 FLOPs at 989.4 TFLOP/s (each above W's
    1.024 GB at 3.35 TB/s = 0.31 ms): 3.18 ms. Pair: 3 * 2 * 16384^2 * 512 FLOPs."""
    assert cm.class_floor(1024, 10**6, 512) == pytest.approx(
        3 * 2 * 1024 * 1e6 * 512 / 989.4e12, rel=1e-12
    )
    # A matmul that W's bytes bound instead: B = 8 rows of fp32 W on the H100's HBM.
    assert cm.class_floor(8, 10**6, 512, "bf16", "fp32") == pytest.approx(
        3 * 10**6 * 512 * 4 / 3.35e12, rel=1e-12
    )
    assert cm.pair_floor(16384, 512) == pytest.approx(3 * 2 * 16384**2 * 512 / 989.4e12)


def test_class_bound_matches_a_hand_count():
    """Any fused class design at B=1024, D=512, C=1M bf16 on the H100: four matmuls of
    2 * 1024 * 1e6 * 512 FLOPs at 989.4 TFLOP/s; the softmax's (19 + 22) ALU instructions
    per logit at 128 lanes * 132 SMs * 1.83 GHz (above its 2 exp2 per logit at 16 per SM
    per clock); the floor is three of the matmuls."""
    mm = 2 * 1024 * 1e6 * 512 / 989.4e12
    soft = 41 * 1024 * 1e6 / (128 * 132 * 1.83e9)
    assert soft > 2 * 1024 * 1e6 / (16 * 132 * 1.83e9)
    b = cm.class_bound(1024, 10**6, 512, "bf16", "bf16", cm.H100_SXM, target=1.5)
    assert b.matmuls_s == pytest.approx(4 * mm, rel=1e-12)
    assert b.softmax_s == pytest.approx(soft, rel=1e-12)
    assert b.floor_s == pytest.approx(3 * mm, rel=1e-12)
    assert b.hidden == pytest.approx(4 / 3, rel=1e-12)
    assert b.exposed == pytest.approx((4 * mm + soft) / (3 * mm), rel=1e-12)
    # 4 mm + (1 - o) soft = 1.5 * 3 mm  ->  o = 1 - 0.5 mm / soft
    assert b.overlap_needed == pytest.approx(1 - 0.5 * mm / soft, rel=1e-12)
    assert b.efficiency_needed == pytest.approx(4 / 4.5, rel=1e-12)
    # Below 4/3 the matmuls alone miss the target: no overlap can reach it.
    assert cm.class_bound(1024, 10**6, 512, target=1.3).overlap_needed is None
    # A loose target needs no overlap at all.
    assert cm.class_bound(1024, 10**6, 512, target=2.0).overlap_needed == 0.0
    text = cm.describe_bound(b)
    assert "1.33" in text and "1.76" in text and "61%" in text and "89%" in text


def test_mma_and_occupancy_hand_counts():
    # 64 x 32 x 512 bf16 with 8 warps: 2 warpgroups of n16, 32 k16 steps, 2560 B each.
    assert cm.mma_smem_bytes(64, 32, 512, 2, 8) == 2 * 32 * (2048 + 512)
    # 512 x 32 x 64 (x^T G): warpgroups along M, 4 m64 instructions each, 4 k16 steps.
    assert cm.mma_smem_bytes(512, 32, 64, 2, 8) == 2 * 4 * 4 * (2048 + 1024)
    # 32 rows: mma.sync, warps 2 along M and 4 along N, each loading its fragments.
    assert cm.mma_smem_bytes(32, 32, 512, 2, 8) == 32 * 512 * 2 * 4 + 512 * 32 * 2 * 2
    k = cm.KernelCost("k", 1, 8, 128, 0, 0.0, "bf16", 0.0, 0.0, 0.0, 0.0, 0.0)
    assert cm.blocks_per_sm(k, cm.H100_SXM) == 2  # 128 * 256 = half the register file
    import dataclasses

    with pytest.raises(ValueError, match="does not fit"):
        cm.blocks_per_sm(dataclasses.replace(k, smem_per_program=228 * 1024), cm.H100_SXM)


def test_duplicated_logits_hand_count():
    """A 64 x 32 logits tile computed by both warpgroups (Triton 3.9's [8, 1] warps for a
    dot feeding another dot in the same region; PTX of the resident forward with its
    softmax inline: 64 m64n16k16 per thread at K = 512), against v2-full as built (the
    softmax in a branch: one copy). At B = 128, C = 64, D = 64 (4 steps, 8192 logits):
    FLOPs 3 * 2 * 8192 * 64 (logits twice, u once) against 2 * 2 * 8192 * 64; the logits'
    operand reads per step are 2 warpgroups * 4 k16 steps * (A 64 * 16 * 2 + B 16 * 32 * 2
    = 3072 B) = 24576 B, against v1's split tile, 2 * 4 * (2048 + 512) = 20480 B; u's
    4096 B as in the v1 hand count."""
    import dataclasses

    dup = dataclasses.replace(cm.V2_FULL, logits_copies=2)
    twice = cm.class_kernels(128, 64, 64, "bf16", "bf16", dup, cm.H100_SXM)[1]
    once = cm.class_kernels(128, 64, 64, "bf16", "bf16", cm.V2_FULL, cm.H100_SXM)[1]
    assert twice.flops == 3 * 2 * 8192 * 64 and once.flops == 2 * 2 * 8192 * 64
    # staged: x once per program (2 programs x 8192 B), each W tile once (4 x 4096 B)
    staged = 2 * 8192 + 4 * 4096
    assert twice.smem == staged + 4 * (2 * 4 * 3072 + 4096)
    assert once.smem == staged + 4 * (20480 + 4096)
    assert cm.mma_smem_bytes(64, 32, 64, 2, 4) == 4 * 3072


def test_class_major_backward_matches_a_hand_count():
    """Design v2-cm's class backward at B = 128, C = 64, D = 64, bf16: 64 x 64 steps, so
    1 class tile (program) x 2 row blocks = 2 steps, 8192 logits.
    L2: the W tile once 64 * 64 * 2 = 8192 B, the x blocks 2 * 64 * 64 * 2 = 16384 B,
    grad W written 8192 B: 32768 B (the same bytes staged, less grad W: 24576 B).
    wgmma operand reads per step: the logits 64 x 64 x 64, two warpgroups of n32, 4 k16
    steps, A 64 * 16 * 2 + B 16 * 32 * 2 = 3072 B each: 2 * 4 * 3072 = 24576 B; G^T x
    (64 x 64 x 64, A from registers): 2 * 4 * 16 * 32 * 2 = 8192 B. G crosses shared
    memory in bf16, written once and read by both warpgroups: 3 * 64 * 64 * 2 = 24576 B.
    The Jacobian, once per program: its dot's B reads as G^T x's, 8192 B, and the
    diag(-1) tile, 64 * 64 * 2 = 8192 B; 2 * 64 * 64 * 64 FLOPs.
    Shared memory: 24576 + 2 * (24576 + 8192 + 24576) + 16384 = 155648 B.
    FLOPs: 2 * 2 * 8192 * 64 + 524288 = 2621440, none on mma.sync.
    HBM: W read and grad W written, 2 * 8192, and x once, 128 * 64 * 2: 32768 B."""
    bwd = cm.class_kernels(128, 64, 64, "bf16", "bf16", cm.V2_CM, cm.H100_SXM)[2]
    assert bwd.programs == 1
    assert bwd.l2 == 32768
    assert bwd.smem == 155648
    assert (bwd.flops, bwd.flops_mma_sync) == (2621440, 0.0)
    assert bwd.hbm == 32768
    assert cm.mma_smem_bytes(64, 64, 64, 2, 8, True) == 2 * 4 * 16 * 32 * 2


def test_class_major_backward_cuts_shared_memory_traffic():
    """Issue 21, the backward at the target (B = 1024, D = 512, C = 1M, bf16 and fp32 W):
    the 64 x 64 class-major steps as built move 46 % fewer shared-memory bytes than
    v2-full (90.2 GB against 166.9 GB with bf16 W), and the model predicts the backward
    faster (PREDICTIONS, not measurements)."""
    for w in ("bf16", "fp32"):
        full = cm.class_kernels(1024, 10**6, 512, "bf16", w, cm.V2_FULL)[2]
        cm_ = cm.class_kernels(1024, 10**6, 512, "bf16", w, cm.V2_CM)[2]
        assert cm_.smem < 0.55 * full.smem
        assert cm.predict(cm_, cm.H100_SXM).time < cm.predict(full, cm.H100_SXM).time
        assert cm_.l2 < full.l2  # each x block walks the classes in half as many tiles


def _sum(kernels, field):
    return sum(getattr(k, field) for k in kernels)


_DESIGNS = st.sampled_from([cm.V1, cm.V2, cm.V2_FULL, cm.V2_CM, cm.V3])
_FIELDS = ("flops", "flops_mma_sync", "l2", "smem", "alu", "sfu")


@settings(max_examples=40, deadline=None)
@given(
    design=_DESIGNS,
    batch=st.integers(1, 4096),
    classes=st.integers(1, 2_000_000),
    more=st.integers(1, 2_000_000),
    dim=st.sampled_from([64, 128, 256, 512]),
    w=st.sampled_from(["bf16", "fp32"]),
)
def test_class_model_grows_with_classes(design, batch, classes, more, dim, w):
    """More classes never cost less: FLOPs, bytes, CUDA-core work, the backward's
    predicted time (one program per class tile) and the floor. (The forward's time may
    drop at small C: more classes allow more class splits, i.e. more parallel programs,
    as in the launcher.)"""
    small = cm.class_kernels(batch, classes, dim, "bf16", w, design)
    big = cm.class_kernels(batch, classes + more, dim, "bf16", w, design)
    for field in _FIELDS:
        assert _sum(big, field) >= _sum(small, field), field
    t_big, t_small = (cm.predict(k[2], cm.H100_SXM).time for k in (big, small))
    assert t_big >= t_small * (1 - 1e-12)  # equal grids give equal times up to rounding
    assert cm.class_floor(batch, classes + more, dim) >= cm.class_floor(batch, classes, dim)


@settings(max_examples=40, deadline=None)
@given(
    design=_DESIGNS,
    rows=st.integers(1, 64),
    more=st.integers(1, 64),
    classes=st.integers(1, 2_000_000),
    dims=st.lists(st.sampled_from([16, 64, 128, 256, 512, 1024]), min_size=2, max_size=2),
)
def test_class_model_grows_with_batch_and_dim(design, rows, more, classes, dims):
    """More rows (whole 32-row blocks) or a larger D never cost less work; with D the
    grid is unchanged, so the predicted time cannot drop either."""
    batch, bigger = 32 * rows, 32 * (rows + more)
    d0, d1 = sorted(dims)
    base = cm.class_kernels(batch, classes, d0, "bf16", "bf16", design)
    for other in (
        cm.class_kernels(bigger, classes, d0, "bf16", "bf16", design),
        cm.class_kernels(batch, classes, d1, "bf16", "bf16", design),
    ):
        for field in ("flops", "flops_mma_sync", "alu", "sfu", "smem"):
            assert _sum(other, field) >= _sum(base, field), field
    wide = cm.class_kernels(batch, classes, d1, "bf16", "bf16", design)
    assert cm.total(wide, cm.H100_SXM) >= cm.total(base, cm.H100_SXM) * (1 - 1e-12)


@settings(max_examples=30, deadline=None)
@given(
    design=_DESIGNS,
    tiles=st.integers(1, 20_000),
    factor=st.integers(2, 8),
    w=st.sampled_from(["bf16", "fp32"]),
)
def test_class_backward_bytes_scale_with_classes(design, tiles, factor, w):
    """The backward's grid is one program per class tile: at whole tiles, its L2, HBM,
    shared-memory bytes and FLOPs are exactly proportional to C."""
    classes = 64 * tiles
    one = cm.class_kernels(1024, classes, 512, "bf16", w, design)[2]
    k = cm.class_kernels(1024, factor * classes, 512, "bf16", w, design)[2]
    for field in ("l2", "smem", "flops", "flops_mma_sync"):
        assert getattr(k, field) == pytest.approx(factor * getattr(one, field), rel=1e-12)
    # HBM: W read twice and grad W written once scale; the x block read once does not.
    x_bytes = 1024 * 512 * 2
    assert k.hbm - x_bytes == pytest.approx(factor * (one.hbm - x_bytes), rel=1e-12)
    assert k.programs == factor * one.programs


@settings(max_examples=30, deadline=None)
@given(
    design=st.sampled_from([cm.PAIR_V1, cm.PAIR_V2, cm.PAIR_V2_BUILT]),
    blocks=st.integers(1, 256),
    dim=st.sampled_from([64, 128, 512]),
)
def test_pair_forward_bytes_scale_with_batch_squared(design, blocks, dim):
    """All pairs: at whole 128-row blocks the forward's work and L2 bytes are
    proportional to B^2 for v1 (both tiles reloaded per step); for v2 the streamed
    column tiles are (B^2) and the resident row blocks (B) once each."""
    batch = 128 * blocks
    one = cm.pair_kernels(batch, dim, "bf16", design)[0]
    two = cm.pair_kernels(2 * batch, dim, "bf16", design)[0]
    assert two.flops == pytest.approx(4 * one.flops, rel=1e-12)
    resident = batch * dim * 2  # the row blocks, loaded once per program
    if design.resident:
        assert two.l2 - 2 * resident == pytest.approx(4 * (one.l2 - resident), rel=1e-12)
    else:
        assert two.l2 == pytest.approx(4 * one.l2, rel=1e-12)
    assert cm.total(cm.pair_kernels(2 * batch, dim), cm.H100_SXM) > cm.total(
        cm.pair_kernels(batch, dim), cm.H100_SXM
    )


def test_loading_scheme_is_what_reduces_l2():
    """At the issue's C = 1M case, v1 moves ~150 GB through L2 (the issue's own estimate
    is ~145 GB) and the resident backward cuts the backward's share by more than half."""
    v1 = cm.class_kernels(1024, 10**6, 512, "bf16", "bf16", cm.V1)
    v2 = cm.class_kernels(1024, 10**6, 512, "bf16", "bf16", cm.V2)
    assert 140e9 < _sum(v1, "l2") < 160e9
    assert v2[2].l2 < 0.5 * v1[2].l2
    assert v2[1].l2 == v1[1].l2  # the forward is unchanged in v2
    # autocast: fp32 W doubles W's bytes, so v1 moves more (the issue: ~190 GB).
    auto = cm.class_kernels(1024, 10**6, 512, "bf16", "fp32", cm.V1)
    assert 180e9 < _sum(auto, "l2") < 220e9


def test_current_designs_match_the_kernels_block_configs():
    """The designs the benchmark labels as current use the kernels' default tiles."""
    pytest.importorskip("triton")
    from pml_extras.ops import class_lse_triton as clt
    from pml_extras.ops import pair_circle_triton as pct

    cfg = clt.BlockConfig()
    cur = cm.CURRENT_CLASS
    assert (cur.block_m, cur.block_c, cur.num_warps) == (cfg.block_m, cfg.block_c, cfg.num_warps)
    import triton.language as tl

    # The backward's tiles for bf16 operands (the model's case), class-major as built.
    assert (cur.bwd_block_m, cur.bwd_block_c) == (
        clt._bwd_block_m(cfg),
        clt._bwd_block_c(cfg, tl.bfloat16),
    )
    assert cur.bwd_class_major
    # Its occupancy comes from ptxas figures of these kernels, with no spill in the
    # backward (tests/gpu/test_sm90_spills.py compiles them).
    for w in ("bf16", "fp32"):
        regs, spills, smem = cm.PTXAS_SM90[("class_bwd", cur.name, "bf16", w)]
        assert spills == 0 and regs <= 255 and 0 < smem <= 227 * 1024
        assert ("class_fwd", cur.name, "bf16", w) in cm.PTXAS_SM90
    # Resident backward whenever all of D = 512 fits one group (bf16).
    assert cur.bwd_resident == (clt._d_layout(512, cfg, False)[2] == 1)
    assert cur.fwd_resident == cfg.fwd_resident
    pcfg, pair = pct.BlockConfig(), cm.CURRENT_PAIR
    assert (pair.fwd_block_m, pair.fwd_block_n, pair.block_m, pair.block_n) == (
        pcfg.fwd_block_m,
        pcfg.fwd_block_n,
        pcfg.block_m,
        pcfg.block_n,
    )
    assert pair.num_warps == pcfg.num_warps and pair.resident


def test_current_pair_design_is_what_the_launchers_run():
    """Issue 21: CURRENT_PAIR is the built v2, with the tiles the launchers pass at the
    target case (bf16, D = 512): the row block resident in the forward; in the backward
    the held block resident, 64-row tiles streamed by TMA on both sides (rows-oriented),
    and no overlap (tests/gpu/test_sm90_spills.py ties that to the PTX)."""
    pytest.importorskip("triton")
    from pml_extras.ops import pair_circle_triton as pct

    pair, cfg = cm.CURRENT_PAIR, pct.BlockConfig()
    assert pair is cm.PAIR_V2_BUILT and pair in cm.PAIR_DESIGNS
    fwd, bwd = pct.tile_constexprs(512, cfg, False, tma=True)
    assert fwd["RESIDENT"] and bwd["RESIDENT"] and bwd["TMA"] and pair.resident
    assert (pair.fwd_block_m, pair.fwd_block_n) == (fwd["BLOCK_M"], fwd["BLOCK_N"])
    assert (pair.block_m, pair.block_n) == (bwd["BLOCK_O"], bwd["BLOCK_I"])
    assert pair.rows_oriented and pair.num_warps == cfg.num_warps and pair.overlap == 0.0
    for kernel in ("pair_fwd", "pair_bwd_row", "pair_bwd_column"):  # measured, not assumed
        assert (kernel, pair.name, "bf16", "bf16") in cm.PTXAS_SM90


def test_pair_v2_backward_matches_a_hand_count():
    """The built v2's row-side backward at B = N = 128, D = 64, bf16, on the H100 SXM.

    Held 64-row blocks, 64-row streamed tiles: 2 held blocks x 2 tiles = 4 steps and
    16384 pairs. Splits: about 2 x 132 programs but at most 4 per block, and at most the 2
    tiles: 2 splits, 4 programs, each writing a (128, 64) float32 partial: 65536 B each.
    L2: the held blocks once 2 * 64 * 64 * 2 = 16384 B, each streamed tile once for both
    dots 4 * 64 * 64 * 2 = 32768 B, the partials written and read 2 * 65536: 180224 B.
    HBM: x 128 * 64 * 2 = 16384 plus the partials 131072 = 147456 B.
    FLOPs: s and the accumulation, 2 * 2 * 16384 * 64 = 4194304.
    Shared memory per step: s (64 x 64 x 64, two warpgroups of n32, 4 k16 steps, each
    reading A 64 * 16 * 2 = 2048 B and B 16 * 32 * 2 = 1024 B): 2 * 4 * 3072 = 24576;
    acc += w @ tile (64 x 64 x 64, A in registers, B 16 * 32 * 2 = 1024 B): 2 * 4 * 1024 =
    8192; w's layout conversion written and read 2 * 64 * 64 * 2 = 16384. Total 49152
    per step, 196608 for 4, plus the 49152 B staged by the loads: 245760 B.
    CUDA cores: 20 instructions and 1 exp per pair: 327680 and 16384.
    The column side, the same dots with the roles swapped, costs the same at N = B."""
    row, col = cm.pair_kernels(128, 64, "bf16", cm.PAIR_V2_BUILT)[1:]
    assert row.programs == 4
    assert row.l2 == 180224
    assert row.hbm == 147456
    assert row.flops == 4194304
    assert row.smem == 245760
    assert (row.alu, row.sfu) == (327680, 16384)
    for field in ("programs", "l2", "hbm", "flops", "smem", "alu", "sfu"):
        assert getattr(col, field) == getattr(row, field), field
    # v1's column side (x^T (g w), D rows of A from shared memory) costs more.
    v1_row, v1_col = cm.pair_kernels(128, 64, "bf16", cm.PAIR_V1)[1:]
    assert v1_col.smem > v1_row.smem


def test_built_pair_design_meets_the_target_on_the_model():
    """Issue 21's target, as the model predicts it (a PREDICTION, not a measurement): the
    built pair kernels at B = 16384, D = 512, bf16 within 3x of the matmul floor on the
    H100 and H200, and v1 far above it."""
    for hw in (cm.H100_SXM, cm.H200):
        floor = cm.pair_floor(16384, 512, "bf16", hw)
        built = cm.total(cm.pair_kernels(16384, 512, "bf16", cm.PAIR_V2_BUILT, hw), hw)
        v1 = cm.total(cm.pair_kernels(16384, 512, "bf16", cm.PAIR_V1, hw), hw)
        assert built / floor <= 3.0 < v1 / floor


def test_docs_table_is_the_models_output():
    """docs/kernels/cost_model.md quotes the model; a model change must update it."""
    with open(os.path.join(ROOT, "docs", "kernels", "cost_model.md")) as f:
        doc = f.read()
    assert cm.table() in doc


def test_module_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "-m", "pml_extras.ops.cost_model"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    ).stdout
    assert cm.table() in out
    assert re.search(r"class forward \(logsumexp \+ u\)\s+[\d.]+ ms", out)


def test_benchmark_prints_predictions_beside_measurements():
    """benchmarks/speed_bench/predicted.py: one line per setup and mode, the predictions
    labelled as such; on a GPU the measured provider and floor times with their ratio."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from speed_bench.predicted import predicted_lines, prediction
    finally:
        sys.path.pop(0)

    def row(provider, level, dtype, time_ms, C=10**6, B=1024):
        return dict(level=level, B=B, D=512, C=C, dtype=dtype, mode="fwd+bwd",
                    provider=provider, time_ms=time_ms)  # fmt: skip

    rows = [
        row("floor", "class", "bf16", 4.0),
        row("sparse_circle_triton", "class", "bf16", 10.0),
        row("floor", "pair", "bf16", 1.0, C=None, B=16384),
        row("pair_circle_all", "pair", "bf16", 5.0, C=None, B=16384),
        row("floor", "class", "fp64", 1.0),  # no prediction for float64
    ]
    lines = predicted_lines(rows, measured_on_gpu=True)
    assert len(lines) == 2
    t, f = prediction("class", 1024, 512, 10**6, "bf16", "fwd+bwd", cm.H100_SXM)
    assert f == cm.class_floor(1024, 10**6, 512)
    assert f"H100 {t * 1e3:.3f} ms vs floor {f * 1e3:.3f} ms (x{t / f:.2f})" in lines[0]
    assert "PREDICTED" in lines[0] and f"design {cm.CURRENT_CLASS.name}" in lines[0]
    assert "MEASURED: floor 4.00 ms, sparse_circle_triton 10.00 ms (x2.50)" in lines[0]
    assert "MEASURED: floor 1.00 ms, pair_circle_all 5.00 ms (x5.00)" in lines[1]
    assert all("MEASURED" not in x for x in predicted_lines(rows, measured_on_gpu=False))
    t_fwd, f_fwd = prediction("class", 1024, 512, 10**6, "bf16", "fwd", cm.H100_SXM)
    assert f_fwd == pytest.approx(f / 3) and t_fwd < t
    assert math.isfinite(t_fwd)
    # The hybrid, measured in the same run against the same floor: its as-built prediction
    # and its measurement on the class line (fwd+bwd only: the model does not split it).
    rows.append(row("sparse_circle_hybrid", "class", "bf16", 12.0))
    lines = predicted_lines(rows, measured_on_gpu=True)
    th, fh = prediction("class", 1024, 512, 10**6, "bf16", "fwd+bwd", cm.H100_SXM, hybrid=True)
    want = cm.total(cm.hybrid_class_kernels(1024, 10**6, 512, "bf16", "bf16", as_built=True),
                    cm.H100_SXM)  # fmt: skip
    assert th == pytest.approx(want) and fh == f and th != t
    assert f"hybrid as built: H100 {th * 1e3:.3f} ms (x{th / fh:.2f})" in lines[0]
    assert "sparse_circle_hybrid 12.00 ms (x3.00)" in lines[0]
    assert prediction("class", 1024, 512, 10**6, "bf16", "fwd", cm.H100_SXM, hybrid=True) is None
    assert prediction("pair", 16384, 512, None, "bf16", "fwd+bwd", cm.H100_SXM, hybrid=True) is None


# ------------------------------------------------------------ the hybrid as built


def _count_hybrid_launches(op, w_dtype, classes, chunk=64, batch=5, dim=8):
    """(forward, backward) launches ``class_lse_hybrid`` makes, counted on CPU without
    running a kernel: every aten op outside the stand-ins below that is not a view or an
    allocation is one CUDA launch; each library matmul (``_mm32``: one ``torch.mm`` on
    CUDA) and each Triton launch (``_run``, and ``inverse_norms``) counts one and is not
    run (the values do not steer the code: only shapes do)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    pytest.importorskip("triton")
    from pml_extras.ops import class_lse_hybrid as hyb

    count = [0]
    inside = [False]

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not inside[0] and not func.is_view and not name.startswith("empty"):
                count[0] += 1
            return func(*args, **(kwargs or {}))

    def stand_in(result):
        def call(*args, **kwargs):
            count[0] += 1
            inside[0] = True
            try:
                return result(*args, **kwargs)
            finally:
                inside[0] = False

        return call

    patch = pytest.MonkeyPatch()
    patch.setattr(hyb, "_run", stand_in(lambda *a, **k: None))
    patch.setattr(hyb, "_mm32", stand_in(lambda a, b: torch.zeros(a.shape[0], b.shape[1])))
    patch.setattr(hyb, "inverse_norms", stand_in(lambda w, op_dtype: torch.ones(w.shape[1])))
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    x = torch.randn(batch, dim, dtype=dt[op] if w_dtype == op else torch.float32)
    w = torch.randn(dim, classes, dtype=dt[w_dtype])
    target, row_param = torch.randint(0, classes, (batch,)), torch.zeros(batch)
    args = (x, w, target, row_param, "circle", 32.0, 0.25)
    try:
        with Counter():
            lse, _ = hyb.forward(*args, op_dtype=dt[op], chunk=chunk)
            fwd, count[0] = count[0], 0
            hyb.backward(*args, lse, torch.ones(batch), torch.ones(batch), op_dtype=dt[op],
                         chunk=chunk)  # fmt: skip
    finally:
        patch.undo()
    return fwd, count[0]


@pytest.mark.parametrize(
    "op,w_dtype", [("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16")]
)
def test_hybrid_launch_counts_are_the_codes(op, w_dtype):
    """The model's launches per chunk (and per call) of the hybrid as built
    (cost_model.hybrid_launches) are those class_lse_hybrid makes: counted at 1, 2 and 3
    chunks (the last one partial), the per-chunk part is the difference."""
    one, two, three = (_count_hybrid_launches(op, w_dtype, c) for c in (64, 128, 150))
    fwd, bwd, per_call = hybrid_launches(op, w_dtype)
    assert (two[0] - one[0], two[1] - one[1]) == (fwd, bwd)
    assert (three[0] - two[0], three[1] - two[1]) == (fwd, bwd)
    assert one[0] + one[1] - fwd - bwd == per_call
    # The model charges them: launches of the as-built kernels at 3 chunks.
    kernels = cm.hybrid_class_kernels(5, 150, 8, op, w_dtype, chunk=64, as_built=True)
    assert sum(k.launches for k in kernels) == 3 * (fwd + bwd) + per_call


def test_hybrid_as_built_is_at_least_the_lean_design():
    """The as-built hybrid's prediction is never below the lean design's (it does what
    the lean one does and more), and its lean part is what the issue's hybrid names: six
    launches per chunk."""
    for hw in (cm.H100_SXM, cm.H200):
        for c, w in ((100_000, "bf16"), (10**6, "bf16"), (10**6, "fp32")):
            lean = cm.hybrid_class_kernels(1024, c, 512, "bf16", w, hw=hw)
            built = cm.hybrid_class_kernels(1024, c, 512, "bf16", w, hw=hw, as_built=True)
            assert cm.total(built, hw) > cm.total(lean, hw)
            assert sum(k.launches for k in lean) == 6 * math.ceil(c / 8192)


def test_hybrid_chunk_rule_is_the_codes():
    """The model's chunk width (cost_model.hybrid_chunk) is class_lse_hybrid's default:
    8192 classes up to B = 1024, then the float32 raw products held at 32 MB (8M / B)."""
    pytest.importorskip("triton")
    from pml_extras.ops import class_lse_hybrid as hyb
    from pml_extras.ops.cost_model.class_kernels import hybrid_chunk

    for batch in (0, 1, 1000, 1024, 1025, 4096, 16384, 10**6):
        assert hybrid_chunk(batch) == hyb.default_chunk(batch)
    assert hybrid_chunk(1024) == 8192 and hybrid_chunk(16384) == 512
    assert hybrid_chunk(10**6) == 256
