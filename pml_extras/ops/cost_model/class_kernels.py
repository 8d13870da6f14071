"""The class logsumexp kernels (``class_lse_triton``) and the cuBLAS hybrid, as launches
for the roofline, and the class matmul floor."""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

from .ptxas_figures import ptxas
from .roofline import (
    ALU_PER_LOGIT_CLASS_BWD,
    ALU_PER_LOGIT_CLASS_FWD,
    DTYPE_BYTES,
    H100_SXM,
    Hardware,
    KernelCost,
    mma_smem_bytes,
)


@dataclasses.dataclass(frozen=True)
class ClassDesign:
    """Tile sizes and loading scheme of the class logsumexp kernels (see class_lse_triton).

    ``fwd_resident`` False: the forward's logits K-loop reloads the x block (BLOCK_D
    columns at a time) for every class tile and u's dot reads the W tile a second time.
    True: the x block is loaded once per program and each W tile once for both dots.
    ``bwd_resident`` False: the backward's logits K-loop reloads its W tile for every row
    block and the x block is loaded twice (logits, x^T G). True: the W tile is loaded
    once per program and each x block once for both dots."""

    name: str = "v1"
    block_m: int = 64
    block_c: int = 32
    bwd_block_m: int = 64
    bwd_block_c: int = 32
    num_warps: int = 8
    fwd_resident: bool = False
    bwd_resident: bool = False
    overlap: float = 0.0
    # 1/||w|| applied to the softmax weights instead of the W tile, so the tile goes from
    # global memory straight to shared memory, staged once (no register copy).
    p_side_scale: bool = False
    # 1/||w|| computed from the W tile the forward holds (no separate pass over W).
    fused_norms: bool = False
    # Warpgroups computing the same forward logits tile. Triton 3.9 gives a dot whose
    # result feeds another dot in the same region warps [num_warps, 1] (all along M); a
    # 64-row tile with 8 warps is then computed by both warpgroups (PTX of the resident
    # forward at 64 x 32 x 512 with the softmax inline: 64 m64n16k16 per thread, the
    # whole tile each; 232 B of spills). The K-loop logits of v1 / v2 sit in an inner
    # loop and the built v2-full's softmax in a branch: both get [4, 2], one copy.
    logits_copies: int = 1
    # The backward accumulates (x^T G)^T = G^T x (BLOCK_C x D): G^T is wgmma's A operand
    # from registers, after crossing shared memory once in the operand dtype (written
    # once, read by every warpgroup: PTX stmatrix / ldmatrix); the Jacobian is one more
    # dot per program, diag(-1) @ W^T, with the W tile the program holds (no reload).
    bwd_class_major: bool = False


# Today's kernels at d00838b (main).
V1 = ClassDesign()
# The kernels as built (the default BlockConfig): the backward keeps its W tile and
# loads each 32-row x block once; the forward is v1's. overlap = 0 is what the PTX does:
# no exponential (and no float32 ALU work) is issued while a wgmma group is in flight,
# every dot is waited for with wait_group 0 before the softmax that reads it (the one
# wait_group 1 pipelines the logits' K steps); tests/gpu/test_sm90_spills.py
# (test_class_overlap_in_the_model_is_what_the_ptx_does) checks it.
V2 = ClassDesign(name="v2", bwd_block_m=32, bwd_resident=True)
# v2 with 64-row backward steps (a step of this branch, then v2-full): both
# backward dots on wgmma, the logits' columns split over the two warpgroups (PTX: 32
# m64n16k16 per thread per 64 x 32 x 512 step, 16 m64n32k16 for x^T G), x double-buffered
# by cp.async, 255 registers and no spills. Triton 3.9 only gives the logits dot that
# layout with the softmax in a branch of its own (see class_lse_triton_bwd); without it,
# the tile is computed by both warpgroups and spills 464 B.
V2_BWD64 = ClassDesign(name="v2-bwd64", bwd_block_m=64, bwd_resident=True)
# The previous default (v2-cm's forward): v2-bwd64 with the forward's x block
# resident as well and each W tile loaded once for both of its dots (1/||w|| on the P
# side), all of the softmax in a branch of its own (see class_lse_triton_fwd): the
# logits dot splits its columns over the two warpgroups (logits_copies 1). 243
# registers, no spills (bf16 W; 88 B with fp32 W). overlap = 0: as in v2, no exponential
# is issued under an open wgmma group (tests/gpu/test_sm90_spills.py checks it).
V2_FULL = ClassDesign(
    name="v2-full",
    bwd_block_m=64,
    fwd_resident=True,
    bwd_resident=True,
    p_side_scale=True,
)
# The kernels as built now (the default BlockConfig): v2-full with 64 x 64 backward
# steps for bf16 operands, class-major (bwd_class_major; class_lse_triton_bwd): 255
# registers, no spills with bf16 and fp32 W, 40 wgmma per thread and no mma.sync
# (tests/gpu/test_sm90_spills.py). Its G^T x dot reads only x from shared memory and the
# 64-class steps halve the row-block walks per class: the backward's shared-memory
# traffic falls by 46 % (90 GB against 167 GB at C = 1M, bf16 W) and its L2 traffic by
# 47 %; the forward is v2-full's. overlap = 0: the PTX issues no exponential under an
# open wgmma group (the G^T x group stays open across the next step's loads and logits,
# then wait_group 0 before the softmax).
V2_CM = ClassDesign(
    name="v2-cm",
    bwd_block_m=64,
    bwd_block_c=64,
    fwd_resident=True,
    bwd_resident=True,
    p_side_scale=True,
    bwd_class_major=True,
)
# Not built: what the model says a fused design needs for the 1.5x target. 128-class
# forward tiles (its W tile, 128 KB, single-buffered in shared memory next to the 64 KB
# x block), 64 x 64 backward steps, 1/||w|| on the P side, and half the softmax hidden
# under the matmuls. What Triton 3.9 makes of each part (sm_90a, bf16, D = 512; figures
# in PTXAS_SM90 and docs/kernels/cost_model.md):
# * the forward's tiles spill: 64 x 64 120 B, 64 x 128 (one stage: two do not fit)
#   1072 B. The 64 x 512 float32 accumulator (u, or x^T G at 64 classes) takes 128 of
#   the 255 registers, and a single-buffered tile goes through registers (no cp.async)
#   on its way to shared memory. The 64 x 64 backward is built (v2-cm, class-major; as
#   a D x 64 accumulator it spilled 1992 B), its larger tiles spill (128 x 64, one
#   stage, 1208 B);
# * a 64-row logits tile feeding a second dot in the same region is computed by both
#   warpgroups (see logits_copies); the built kernels move the softmax into a branch to
#   avoid it. The transposed forward (S^T = W^T x^T, 128 classes along M) avoids it too
#   but spills 2240 B (an experiment, not kept);
# * the overlap: tl.range(..., warp_specialize=True) compiles to the same PTX on sm_90
#   (the option is Blackwell-only in 3.9), and issuing the next tile's logits before this
#   tile's softmax by hand (both tried on the v2 forward) keeps wait_group 0 before the
#   softmax (0 of 10 exponentials in flight) and doubles the forward's spills (80 B).
V3 = ClassDesign(
    name="v3 (hypothetical)",
    block_c=128,
    bwd_block_c=64,
    fwd_resident=True,
    bwd_resident=True,
    overlap=0.5,
    p_side_scale=True,
    fused_norms=True,
)
# The design the kernels in class_lse_triton implement now (tests/ops/test_cost_model.py
# checks its tiles against class_lse_triton.BlockConfig).
CURRENT_CLASS = V2_CM


def wave_splits(per_split: int, n_tiles: int, slots: int, most: int) -> Tuple[int, int]:
    """(splits, tiles per split) filling whole waves, as ``_triton_common.wave_splits``:
    the fewest splits whose waves are >= 95 % full, else the fullest."""
    per_split, slots = max(1, per_split), max(1, slots)
    best = (-1.0, 1, max(1, n_tiles))
    for want in range(1, max(1, min(most, n_tiles)) + 1):
        tiles = math.ceil(n_tiles / want)
        splits = math.ceil(n_tiles / tiles)
        programs = per_split * splits
        fill = programs / (math.ceil(programs / slots) * slots)
        if fill >= 0.95:
            return splits, tiles
        if fill > best[0]:
            best = (fill, splits, tiles)
    return best[1], best[2]


def _splits(batch: int, classes: int, bm: int, bc: int, w_bytes: int, hw: Hardware) -> int:
    """Class splits of the forward, as ``class_lse_triton._n_splits`` (one program per
    SM, up to 4 waves, u's partials no larger than W)."""
    rb, tiles = math.ceil(batch / bm), math.ceil(classes / bc)
    most = 4 * math.ceil(hw.sms / rb)
    most = min(most, max(1, (classes * w_bytes) // (batch * 4)))
    return wave_splits(rb, tiles, hw.sms, most)[0]


def class_kernels(
    batch: int,
    classes: int,
    dim: int,
    op: str = "bf16",
    w_dtype: Optional[str] = None,
    design: ClassDesign = V1,
    hw: Hardware = H100_SXM,
) -> List[KernelCost]:
    """The launches of one training step (forward with u, backward for W) of
    :func:`pml_extras.ops.class_lse.class_logsumexp` on the Triton path."""
    w_dtype = w_dtype or op
    e, ew = DTYPE_BYTES[op], DTYPE_BYTES[w_dtype]
    bm, bc, nw = design.block_m, design.block_c, design.num_warps
    rb = math.ceil(batch / bm)
    tiles = math.ceil(classes / bc)
    pairs = rb * tiles  # (row block, class tile) steps of the forward
    # Work on padded tiles: masked rows and columns still go through the tensor cores
    # and the CUDA cores (bytes are not padded: masked lanes load nothing).
    logits = rb * bm * tiles * bc
    x_bytes, w_bytes = batch * dim * e, classes * dim * ew
    splits = _splits(batch, classes, bm, bc, ew, hw)
    # Forward ---------------------------------------------------------------------------
    if design.fwd_resident:
        fwd_l2 = rb * splits * bm * dim * e + pairs * bc * (dim * ew + 4)
        w_staged = 1 if design.p_side_scale else 2
        staged = rb * splits * bm * dim * e + pairs * w_staged * bc * dim * ew
    else:
        fwd_l2 = pairs * (bm * dim * e + 2 * bc * dim * ew + 4 * bc)
        staged = pairs * (bm * dim * e + 2 * bc * dim * ew)
    partials = splits * batch * (dim + 2) * 4  # u and (max, sum) partials, float32
    copies = design.logits_copies
    if copies > 1:  # each copy is one warpgroup (4 warps) reading its operands for the tile
        logits_mma = copies * mma_smem_bytes(bm, bc, dim, e, 4)
    else:
        logits_mma = mma_smem_bytes(bm, bc, dim, e, nw)
    fwd_mma = logits_mma + mma_smem_bytes(bm, dim, bc, e, nw, True)
    regs, _, smem = ptxas("class_fwd", design.name, op, w_dtype)
    fwd = KernelCost(
        name="class forward (logsumexp + u)",
        programs=rb * splits,
        num_warps=nw,
        regs_per_thread=regs,
        smem_per_program=smem,
        flops=(copies + 1) * 2.0 * logits * dim,
        dot_dtype=op,
        hbm=w_bytes + x_bytes + classes * 4 + partials,
        l2=fwd_l2 + partials,
        smem=staged + pairs * fwd_mma,
        alu=logits * ALU_PER_LOGIT_CLASS_FWD,
        sfu=logits,
        overlap=design.overlap,
    )
    # Backward (grad W; grad x = grad_lse * u needs no kernel) ---------------------------
    bbm, bbc = design.bwd_block_m, design.bwd_block_c
    brb, btiles = math.ceil(batch / bbm), math.ceil(classes / bbc)
    steps = brb * btiles
    if design.bwd_resident:
        bwd_l2 = btiles * bbc * dim * ew + steps * bbm * dim * e
        staged = btiles * bbc * dim * ew + steps * bbm * dim * e
    else:
        bwd_l2 = btiles * bbc * dim * ew + steps * (2 * bbm * dim * e + bbc * dim * ew)
        staged = btiles * bbc * dim * ew + steps * (2 * bbm * dim * e + bbc * dim * ew)
    bwd_l2 += classes * dim * ew  # grad W written once
    logits = brb * bbm * btiles * bbc
    jacobian_flops, jacobian_mma = 0.0, 0
    if design.bwd_class_major:
        # G^T x: A (G^T) from registers; G crosses shared memory in the operand dtype,
        # written once and read by each warpgroup (one per 4 warps).
        bwd_mma = mma_smem_bytes(bbm, bbc, dim, e, nw) + mma_smem_bytes(bbc, dim, bbm, e, nw, True)
        g_tile = bbm * bbc * e * (1 + max(1, nw // 4))
        # The Jacobian, diag(-1) @ W^T chained into the accumulator, once per program.
        jacobian_flops = btiles * 2.0 * bbc * bbc * dim
        jacobian_mma = btiles * (mma_smem_bytes(bbc, dim, bbc, e, nw, True) + bbc * bbc * e)
    else:
        bwd_mma = mma_smem_bytes(bbm, bbc, dim, e, nw) + mma_smem_bytes(dim, bbc, bbm, e, nw)
        g_tile = bbm * bbc * e  # G stored to shared memory as the B operand of x^T G
    # The logits dot of a tile under 64 rows runs as mma.sync (x^T G has D rows: wgmma;
    # class-major, BLOCK_C rows: the model's designs keep them at 64).
    bwd_sync = 2.0 * logits * dim if bbm < 64 else 0.0
    regs, _, smem = ptxas("class_bwd", design.name, op, w_dtype)
    bwd = KernelCost(
        name="class backward (grad W)",
        programs=btiles,
        num_warps=nw,
        regs_per_thread=regs,
        smem_per_program=smem,
        flops=2 * 2.0 * logits * dim - bwd_sync + jacobian_flops,
        flops_mma_sync=bwd_sync,
        dot_dtype=op,
        hbm=2 * w_bytes + x_bytes,
        l2=bwd_l2,
        smem=staged + steps * (bwd_mma + g_tile) + jacobian_mma,
        alu=logits * ALU_PER_LOGIT_CLASS_BWD,
        sfu=logits,
        overlap=design.overlap,
    )
    # 1/||w|| (a C-sized pass over W, forward and backward share it); the split combine
    # and the target column's gradient are small PyTorch ops: counted as launches.
    norms = KernelCost(
        name="inverse norms of W",
        programs=math.ceil(classes / 256),
        num_warps=4,
        regs_per_thread=64,
        smem_per_program=0,
        flops=0.0,
        dot_dtype=op,
        hbm=w_bytes + classes * 4,
        l2=w_bytes + classes * 4,
        smem=0.0,
        alu=2.0 * math.ceil(classes / 256) * 256 * dim,
        sfu=0.0,
        launches=12,  # + ~11 small PyTorch launches (combine, target column, projection)
    )
    if design.fused_norms:  # each forward program squares its W tiles (ALU only)
        fwd = dataclasses.replace(fwd, alu=fwd.alu + 2.0 * rb * classes * dim)
        small = dataclasses.replace(
            norms, name="small PyTorch ops", launches=11, hbm=0.0, l2=0.0, alu=0.0
        )
        return [small, fwd, bwd]
    return [norms, fwd, bwd]


def class_floor(batch, classes, dim, op="bf16", w_dtype=None, hw=H100_SXM) -> float:
    """Seconds of the 3 B*C*D matmuls fwd+bwd cannot avoid (x W, G W^T, x^T G), each at
    max(FLOPs / tensor peak, its operands' DRAM bytes / HBM bandwidth)."""
    ew = DTYPE_BYTES[w_dtype or op]
    flops = 2.0 * batch * classes * dim / (hw.tensor_tflops[op] * 1e12)
    w_io = classes * dim * ew / (hw.hbm_tbps * 1e12)  # W read, or grad W written
    return 3 * max(flops, w_io)


# ------------------------------------------------------------------ the hybrid (model only)

# cuBLAS reaches about this fraction of the tensor peak on these shapes (an assumption,
# not measured here: K = D = 512 is short for a GEMM).
CUBLAS_FRACTION = 0.8


def hybrid_chunk(batch: int) -> int:
    """Classes per chunk of ``class_lse_hybrid`` (its ``default_chunk``): 8192 up to
    B = 1024, then 8M / B (the float32 raw products stay at 32 MB, in L2), at least 256."""
    return max(256, min(8192, (1 << 23) // max(batch, 1)))


def hybrid_launches(op: str = "bf16", w_dtype: Optional[str] = None) -> Tuple[int, int, int]:
    """(forward launches per chunk, backward launches per chunk, launches per call) of
    ``class_lse_hybrid`` as built; tests/ops/test_cost_model.py counts them in the code.

    Hand count, per chunk. Forward: the matmul raw = x W_c (1) and the epilogue, which
    folds the chunk into each row's running (max, sum) in place (1): 2. Backward: raw
    again (1), the epilogue writing G / ||w|| and G / ||x|| rounded to the operands (1),
    grad x_hat += (G / ||w||) W_c^T as a matmul and an add (2), grad w_hat = x^T (G / ||x||)
    (1), the radial projection into grad W's slice (1): 6. Both passes: one cast of W's
    chunk where W is stored in another dtype than the operands (+1 each). float16
    operands keep the PyTorch path's scaled rounding in PyTorch (``_half_glue``): G and
    G / ||x|| each scaled by their row / column maximum and rounded (abs, amax, clamp,
    divide, round, widen: 6 each, +1 narrowing each for the matmul), W_hat built and
    rounded (3), G / ||x|| (1), the two matmuls (2), the two scalings of the products
    back (2) and the add (1): 23 in place of the lean two matmuls and add, +20.
    Per call (forward + backward), not hand-derived but counted by the test: the inverse
    norms of W (a kernel each pass), the operands (x rounded, its norms, each pass), the
    running pair's setup and the final log, the target cosine (forward) and its gradient
    (backward: index_select, normalisation, index_add), the projection of grad x_hat:
    75 to 83 small launches."""
    w_dtype = w_dtype or op
    cast = 1 if w_dtype != op else 0
    fwd, bwd = 2 + cast, 6 + cast
    if op == "fp16":
        bwd += 20
    # 16-bit operands round x (1 launch per pass) and cast grad x back (1) where float32
    # ones do not; a cast W adds its rounding to the target column's gradient (2).
    per_call = 75 + (6 if op != "fp32" else 0) + 2 * cast
    return fwd, bwd, per_call


def hybrid_class_kernels(
    batch: int,
    classes: int,
    dim: int,
    op: str = "bf16",
    w_dtype: Optional[str] = None,
    chunk: Optional[int] = None,
    hw: Hardware = H100_SXM,
    as_built: bool = False,
) -> List[KernelCost]:
    """The alternative the issue names: per chunk of ``chunk`` classes, cuBLAS matmuls
    (float32 logits S = x W_c, in L2 when B * chunk * 4 bytes fits: 32 MB at B = 1024)
    and one fused Triton epilogue per pass over S.

    ``as_built`` False (the lean design): forward S, epilogue (max, sum-exp); backward S
    again, epilogue (G, rounded to the operand dtype, and the radial term), grad W_c =
    x^T G, grad x += G W_c^T: six launches per chunk, W read as it is stored.

    ``as_built`` True: ``class_lse_hybrid`` as it is (:func:`hybrid_launches`): the lean
    launches plus, per chunk, the add of grad x's matmul into the accumulator, the radial
    projection as a kernel of its own (it reads grad w_hat back, float32, and W's chunk),
    the epilogue writing two rounded operands (G / ||w||, G / ||x||), a cast of W's chunk
    per pass where W is stored wider (float32 W under autocast: the matmuls then read the
    16-bit copy), float16's PyTorch glue, and per call the inverse norms of W (one pass
    over W each way) and the small PyTorch ops."""
    w_dtype = w_dtype or op
    chunk = chunk or hybrid_chunk(batch)
    e, ew = DTYPE_BYTES[op], DTYPE_BYTES[w_dtype]
    n = math.ceil(classes / chunk)
    bc = batch * classes
    mm = 2.0 * bc * dim / CUBLAS_FRACTION
    w_bytes = classes * dim * ew

    def k(name, flops=0.0, l2=0.0, hbm=0.0, alu=0.0, sfu=0.0, launches=n, programs=None):
        return KernelCost(name, programs or 8 * hw.sms, 4, 128, 0, flops, op, hbm, l2, l2, alu,
                          sfu, launches=launches)  # fmt: skip

    if not as_built:
        return [
            k("hybrid: S = x W (fwd)", mm, 4.0 * bc + w_bytes, w_bytes),
            k("hybrid: epilogue (fwd)", l2=4.0 * bc, alu=ALU_PER_LOGIT_CLASS_FWD * bc, sfu=bc),
            k("hybrid: S = x W (bwd)", mm, 4.0 * bc + w_bytes, w_bytes),
            k(
                "hybrid: epilogue (bwd)",
                l2=(4.0 + e) * bc,
                alu=ALU_PER_LOGIT_CLASS_BWD * bc,
                sfu=bc,
            ),  # fmt: skip
            k("hybrid: grad W = x^T G", mm, e * bc + w_bytes, w_bytes),
            k("hybrid: grad x += G W^T", mm, e * bc + w_bytes, w_bytes),
        ]
    fwd_launches, bwd_launches, per_call = hybrid_launches(op, w_dtype)
    cast = w_dtype != op
    w_op = classes * dim * e  # W's chunks as the matmuls read them
    # The matmuls read W from HBM when they read it as stored; after a cast they read the
    # 16-bit copy the cast just wrote (in L2). The cast reads W from HBM.
    w_hbm = 0.0 if cast else w_bytes
    x_reads = n * batch * dim * e  # x (or x^T) once per matmul per chunk, from L2
    acc_x = n * batch * dim * 4  # one (B, D) float32 grad x partial per chunk
    out = []
    if cast:
        out.append(k("hybrid: W chunk cast (fwd)", l2=w_bytes + w_op, hbm=w_bytes))
    out += [
        k("hybrid: S = x W (fwd)", mm, 4.0 * bc + w_op + x_reads, w_hbm),
        # The epilogue also reads and writes the (B,) running (max, sum) per chunk.
        k("hybrid: epilogue (fwd)", l2=4.0 * bc + 16.0 * n * batch,
          alu=ALU_PER_LOGIT_CLASS_FWD * bc, sfu=bc, programs=math.ceil(batch / 2)),  # 2-row blocks
    ]  # fmt: skip
    if cast:
        out.append(k("hybrid: W chunk cast (bwd)", l2=w_bytes + w_op, hbm=w_bytes))
    g_bytes = 2.0 * e * bc  # G / ||w|| and G / ||x||, both in the operand dtype
    out += [
        k("hybrid: S = x W (bwd)", mm, 4.0 * bc + w_op + x_reads, w_hbm),
        # ALU: the backward count has one rounding; the second operand adds a scale and
        # a rounding per logit (2).
        k("hybrid: epilogue (bwd)", l2=4.0 * bc + g_bytes,
          alu=(ALU_PER_LOGIT_CLASS_BWD + 2) * bc, sfu=bc),
        k("hybrid: grad x part = (G/||w||) W^T", mm, e * bc + w_op + acc_x),
        k("hybrid: grad x += part", l2=3.0 * acc_x),
        k("hybrid: grad w_hat = x^T (G/||x||)", mm, e * bc + x_reads + 4.0 * classes * dim),
        # Two passes over D: grad w_hat (float32) and W twice, grad W written once. W's
        # chunk is taken from HBM again (the chunk's S, two G operands and grad w_hat,
        # 80 MB at B = 1024, D = 512 in bf16, have passed through the 50 MB L2 since the
        # matmuls read it); grad W goes to HBM. 16 columns per program.
        k("hybrid: radial projection", l2=8.0 * classes * dim + 3.0 * w_bytes,
          hbm=2.0 * w_bytes, alu=6.0 * classes * dim, programs=math.ceil(chunk / 16)),
    ]  # fmt: skip
    if op == "fp16":  # _half_glue: ~10 passes over the float32 (B, chunk) G, W_hat built
        out.append(
            k(
                "hybrid: float16 PyTorch glue",
                l2=40.0 * bc + 4.0 * w_op,
                alu=12.0 * bc,
                launches=20 * n,
            )  # fmt: skip
        )
    out.append(
        k("hybrid: inverse norms + small PyTorch ops", l2=2.0 * w_bytes + 8.0 * classes,
          hbm=2.0 * w_bytes, launches=per_call, programs=math.ceil(classes / 256))
    )  # fmt: skip
    return out
