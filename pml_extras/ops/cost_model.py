"""A roofline cost model of the fused Triton kernels (class logsumexp, pair Circle).

Every time this module returns is a PREDICTION from published peak figures and the
assumptions below, not a measurement. It exists so that a kernel design can be judged
before a GPU is available, and so that a benchmark run can print the prediction beside
the measured time and the matmul floor.

A leaf module: it imports nothing from the package (the block sizes are passed in, and
``class_design`` / ``pair_design`` hold today's defaults as plain numbers).

The model
---------
Each kernel launch is described by a :class:`KernelCost`: its grid, the threads, registers
and shared memory of one program (registers and spills from ptxas, see
:data:`PTXAS_SM90`), and totals over the launch of

* ``flops``: tensor-core FLOPs (2 per multiply-add) of its ``tl.dot`` calls;
* ``hbm``: bytes that must come from / go to DRAM (each operand once per pass, the
  outputs and partial sums): concurrent programs walk the same class / column tiles, so a
  tile read by several row blocks is fetched from DRAM once and then hit in L2;
* ``l2``: bytes the programs load from (or store to) global memory, i.e. through L2;
* ``smem``: bytes through shared memory: tiles staged there by the loads (written once)
  plus the operand reads of every wgmma instruction (see :func:`mma_smem_bytes`);
* ``alu`` / ``sfu``: float32 CUDA-core instructions and exp2 (MUFU) calls of the
  elementwise work on the logit tiles (per-element counts: ``ALU_PER_*`` below).

On a :class:`Hardware`, :func:`predict` turns these into times:

* compute: ``t_tensor = flops / tensor peak``, ``t_cuda = max(alu / fp32 rate, sfu /
  MUFU rate)``; ``t_compute = max(t_tensor, t_cuda) + (1 - overlap) * min(t_tensor,
  t_cuda)``. ``overlap`` is the explicit assumption of how much of the softmax work hides
  under the matmuls: 0 for a kernel that waits for each wgmma (``wait_group 0``) before
  its softmax, as today's do; FA3-style ping-pong scheduling would approach 1.
* memory: ``t_smem``, ``t_l2``, ``t_hbm`` = bytes / bandwidth of that level; the
  per-SM levels (tensor, CUDA cores, shared memory) are divided by the wave efficiency
  (a last wave that is only partly full leaves SMs idle).
* kernel time = ``max(t_compute, t_smem, t_l2, t_hbm)`` (loads are asynchronous and
  pipelined, ``num_stages >= 2``, so memory overlaps compute fully) + a launch overhead.

The matmul floor (:func:`class_floor`, :func:`pair_floor`) is the matmuls fwd+bwd cannot
avoid, each at ``max(FLOPs / tensor peak, its unavoidable DRAM bytes / HBM bandwidth)``:
3 B*C*D matmuls for the class loss (x W, G W^T, x^T G), 3 B*N*D for the pair loss. A
design's ratio to it is what the targets are stated in (class <= 1.5x, pair <= 3x).

Hardware figures (:data:`H100_SXM`, :data:`H200`)
-------------------------------------------------
From NVIDIA's H100 Tensor Core GPU datasheet and H200 product brief (SXM forms):
989.4 dense bf16/fp16 tensor TFLOP/s (1979 with sparsity), 494.7 TF32, 66.9 FP32
(FMA) TFLOP/s; HBM3 3.35 TB/s (H100 SXM), HBM3e 4.8 TB/s (H200); 50 MB L2 (both: the
same GH100 die, 132 SMs enabled). From the Hopper tuning guide / CUDA programming guide
(compute capability 9.0): 228 KB shared memory per SM (227 KB per block), 65536 32-bit
registers per SM, at most 255 per thread, 2048 threads and 32 blocks per SM. The clock
1.83 GHz is the one the tensor peak implies (132 SMs x 4096 dense bf16 FLOP/clk).
Shared memory: 128 bytes/clock/SM (32 banks x 4 bytes). L2 bandwidth is not published;
microbenchmarks of H100 put it at about 5.5-7 TB/s for data spread over both partitions
(Chips and Cheese, "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023); 7.0 TB/s is
used, and :func:`predict` takes another value for a sensitivity check. CUDA cores: 128
fp32 lanes per SM per clock; MUFU (exp2): 16 per SM per clock. Launch overhead: 4 us per
kernel (the gap between dependent kernels on one stream, the host keeping ahead).

Least certain inputs, in order: L2 bandwidth (+-30 %), the shared-memory term (whether
every wgmma re-reads both operands from shared memory at 128 B/clk), and ``overlap``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, List, Optional, Tuple

GB = 1e9
KB = 1024


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Peak figures of one GPU (sources in the module docstring)."""

    name: str
    sms: int
    clock_ghz: float
    tensor_tflops: Dict[str, float]  # dense, by operand dtype
    hbm_tbps: float
    l2_tbps: float  # an estimate (not published)
    l2_bytes: int
    smem_per_sm: int
    smem_per_block: int
    regs_per_sm: int
    max_regs_per_thread: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    smem_bytes_per_clk: int  # per SM
    fp32_lanes: int  # per SM per clock
    sfu_per_clk: int  # per SM per clock (exp2)
    launch_us: float

    def rate(self, per_sm_per_clk: float) -> float:
        """Whole-GPU rate (per second) of a per-SM, per-clock throughput."""
        return per_sm_per_clk * self.sms * self.clock_ghz * 1e9


_TENSOR = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
H100_SXM = Hardware(
    name="H100 SXM",
    sms=132,
    clock_ghz=1.83,
    tensor_tflops=_TENSOR,
    hbm_tbps=3.35,
    l2_tbps=7.0,
    l2_bytes=50 * 1024 * KB,
    smem_per_sm=228 * KB,
    smem_per_block=227 * KB,
    regs_per_sm=65536,
    max_regs_per_thread=255,
    max_threads_per_sm=2048,
    max_blocks_per_sm=32,
    smem_bytes_per_clk=128,
    fp32_lanes=128,
    sfu_per_clk=16,
    launch_us=3.0,
)
H200 = dataclasses.replace(H100_SXM, name="H200", hbm_tbps=4.8)
GPUS = {"h100": H100_SXM, "h200": H200}

# Elementwise instructions per logit (a hand count of the kernel bodies; one fp32
# instruction each for: scaling by 1/||x|| and 1/||w|| (2), clamp (2), the transform
# (circle: add, max, mul, sub, mul: 5), target / padding mask (compare x2, and, select: 4),
# row max (1), subtract the max and scale by log2 e (2), row sum (1), times dz (1),
# rounding to the operand dtype (1) -> 19 forward; the backward adds x grad_lse, the
# radial term's multiply-add and sum, x 1/||x|| (4) and drops the row max -> 22.
ALU_PER_LOGIT_CLASS_FWD = 19
ALU_PER_LOGIT_CLASS_BWD = 22
# Pair: similarity to u (select), weight (add, max, mul), z (sub, mul), two masks from
# labels (compare x2, and x2), two sets' max / select / subtract / sum (8) -> 17, plus the
# backward's two set weights (select, mul dz, cvt: 3) -> 20; one exp per set per pair
# in the forward, one per pair in the backward.
ALU_PER_PAIR_FWD = 17
ALU_PER_PAIR_BWD = 20

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4}
# A dot whose tile has fewer than 64 rows cannot use wgmma (m64 per warpgroup): Triton
# emits Ampere-style mma.sync, whose throughput on Hopper is taken as 60 % of the wgmma
# peak (an assumption; not measured here).
MMA_SYNC_FRACTION = 0.6


# ------------------------------------------------------------------ kernel description


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """Totals of one kernel launch (see the module docstring for each field)."""

    name: str
    programs: int
    num_warps: int
    regs_per_thread: int
    smem_per_program: int
    flops: float  # on wgmma
    dot_dtype: str
    hbm: float
    l2: float
    smem: float
    alu: float
    sfu: float
    overlap: float = 0.0
    launches: int = 1
    flops_mma_sync: float = 0.0  # dots under 64 rows: mma.sync at MMA_SYNC_FRACTION


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Predicted time of one kernel (seconds) and its terms."""

    kernel: KernelCost
    hardware: str
    blocks_per_sm: int
    wave_efficiency: float
    t_tensor: float
    t_cuda: float
    t_compute: float
    t_smem: float
    t_l2: float
    t_hbm: float
    t_launch: float
    time: float
    bound: str


def blocks_per_sm(k: KernelCost, hw: Hardware) -> int:
    """Occupancy: concurrent programs per SM from registers, shared memory and threads."""
    threads = 32 * k.num_warps
    # Registers are allocated per warp in units of 256 (8 per thread).
    regs = 8 * math.ceil(max(k.regs_per_thread, 1) / 8) * threads
    by_regs = hw.regs_per_sm // regs
    by_smem = hw.smem_per_sm // max(k.smem_per_program, 1) if k.smem_per_program else 99
    by_threads = hw.max_threads_per_sm // threads
    n = min(by_regs, by_smem, by_threads, hw.max_blocks_per_sm)
    if n < 1 or k.smem_per_program > hw.smem_per_block:
        raise ValueError(f"{k.name}: one program does not fit an SM of the {hw.name}")
    return n


def predict(k: KernelCost, hw: Hardware, l2_tbps: Optional[float] = None) -> Prediction:
    """The roofline time of ``k`` on ``hw`` (see the module docstring)."""
    per_sm = blocks_per_sm(k, hw)
    slots = per_sm * hw.sms
    waves = max(1, math.ceil(k.programs / slots))
    eff = k.programs / (waves * slots)
    peak = hw.tensor_tflops[k.dot_dtype] * 1e12
    t_tensor = (k.flops + k.flops_mma_sync / MMA_SYNC_FRACTION) / peak / eff
    t_alu = k.alu / hw.rate(hw.fp32_lanes) / eff
    t_sfu = k.sfu / hw.rate(hw.sfu_per_clk) / eff
    t_cuda = max(t_alu, t_sfu)
    t_compute = max(t_tensor, t_cuda) + (1.0 - k.overlap) * min(t_tensor, t_cuda)
    t_smem = k.smem / hw.rate(hw.smem_bytes_per_clk) / eff
    t_l2 = k.l2 / ((l2_tbps or hw.l2_tbps) * 1e12)
    t_hbm = k.hbm / (hw.hbm_tbps * 1e12)
    terms = {"compute": t_compute, "smem": t_smem, "l2": t_l2, "hbm": t_hbm}
    bound = max(terms, key=terms.get)
    t_launch = k.launches * hw.launch_us * 1e-6
    return Prediction(
        k, hw.name, per_sm, eff, t_tensor, t_cuda, t_compute, t_smem, t_l2, t_hbm,
        t_launch, terms[bound] + t_launch, bound,
    )  # fmt: skip


def mma_smem_bytes(
    m: int, n: int, k: int, elem: int, num_warps: int, a_in_registers: bool = False
) -> int:
    """Shared-memory bytes the wgmma instructions of one (m x k) @ (k x n) ``tl.dot`` read.

    Triton puts warpgroups (4 warps) along M first, one per 64 rows, and the rest along N
    (a 64-row tile with 8 warps: two warpgroups of n/2 columns each). Every
    m64 x n_wg x k16 instruction reads its A slice (64 x 16) and its B slice (16 x n_wg)
    from shared memory (A from registers when ``a_in_registers``). Under 64 rows the dot
    runs as mma.sync (see the code)."""
    if m < 64:
        # mma.sync: every warp loads its own A (rows x k) and B (k x cols) fragments with
        # ldmatrix; warps go along M first (16 rows each), the rest along N.
        warps_m = max(1, min(num_warps, m // 16))
        warps_n = max(1, num_warps // warps_m)
        a = 0 if a_in_registers else m * k * elem * warps_n
        return a + k * n * elem * warps_m
    groups = max(1, num_warps // 4)
    along_m = max(1, min(groups, m // 64))
    along_n = max(1, groups // along_m)
    m_wg, n_wg = max(m // along_m, 64), max(n // along_n, 8)
    per_instruction = (0 if a_in_registers else 64 * 16 * elem) + 16 * n_wg * elem
    instructions = (m_wg // 64) * math.ceil(k / 16)
    return groups * instructions * per_instruction


# ------------------------------------------------------------------ ptxas figures

# Registers per thread, spill bytes (stores + loads) and Triton's shared memory per
# program, from ptxas 13.4 -v for sm_90a (triton 3.9, compiled on CPU, no GPU:
# ``python -m pytest -s tests/gpu/test_sm90_spills.py`` prints them for today's kernels).
# Keys: (kernel, design, operand dtype, W dtype). Spills are reported, not costed.
PTXAS_SM90: Dict[Tuple[str, str, str, str], Tuple[int, int, int]] = {
    # v1: the kernels at d00838b (64 x 32 tiles, 8 warps, 2 stages, D = 512, circle)
    ("class_fwd", "v1", "bf16", "bf16"): (255, 0, 131072),
    ("class_bwd", "v1", "bf16", "bf16"): (255, 68, 69632),
    # v2 (this branch; tests/gpu/test_sm90_spills.py, curricular transform): the forward is
    # v1's; the backward 32 x 32 with its W tile resident
    ("class_fwd", "v2", "bf16", "bf16"): (255, 40, 131072),
    ("class_fwd", "v2", "bf16", "fp32"): (255, 472, 131072),
    ("class_bwd", "v2", "bf16", "bf16"): (183, 0, 68352),
    ("class_bwd", "v2", "bf16", "fp32"): (254, 0, 68352),
    # v2-full: the forward with its x block resident as well spills
    ("class_fwd", "v2-full", "bf16", "bf16"): (255, 816, 131328),
    ("class_bwd", "v2-full", "bf16", "bf16"): (183, 0, 68352),
    # pair kernels as they are (bf16, self-comparison with labels)
    ("pair_fwd", "v1", "bf16", "bf16"): (137, 0, 49152),
    ("pair_bwd_row", "v1", "bf16", "bf16"): (233, 0, 131072),
    ("pair_bwd_column", "v1", "bf16", "bf16"): (201, 0, 69632),
}


def ptxas(kernel: str, design: str, op: str, w: str) -> Tuple[int, int, int]:
    """(registers, spill bytes, shared memory) of a kernel variant; unknown variants
    are assumed to use 255 registers and the shared memory their tiles need."""
    return PTXAS_SM90.get((kernel, design, op, w), (255, 0, 0))


# ------------------------------------------------------------------ the class kernels


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


# Today's kernels at d00838b (main).
V1 = ClassDesign()
# This branch: the backward keeps its W tile and loads each 32-row x block once.
V2 = ClassDesign(name="v2", bwd_block_m=32, bwd_resident=True)
# Both sides resident (spills in Triton 3.9 at D = 512: 816 bytes stored + loaded in the
# forward, see
# PTXAS_SM90): what the model says the loading scheme alone would buy.
V2_FULL = ClassDesign(name="v2-full", bwd_block_m=32, fwd_resident=True, bwd_resident=True)
# Not built: what the model says a fused design needs for the 1.5x target. 128-class
# forward tiles (its W tile, 128 KB, single-buffered in shared memory next to the 64 KB
# x block), 64 x 64 backward steps, 1/||w|| on the P side, and half the softmax hidden
# under the matmuls (warp specialisation / ping-pong, beyond what Triton 3.9 schedules).
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
CURRENT_CLASS = V2


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
    fwd_mma = mma_smem_bytes(bm, bc, dim, e, nw) + mma_smem_bytes(bm, dim, bc, e, nw, True)
    regs, _, smem = ptxas("class_fwd", design.name, op, w_dtype)
    fwd = KernelCost(
        name="class forward (logsumexp + u)",
        programs=rb * splits,
        num_warps=nw,
        regs_per_thread=regs,
        smem_per_program=smem,
        flops=2 * 2.0 * logits * dim,
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
    bwd_mma = mma_smem_bytes(bbm, bbc, dim, e, nw) + mma_smem_bytes(dim, bbc, bbm, e, nw)
    # The logits dot of a tile under 64 rows runs as mma.sync (x^T G has D rows: wgmma).
    logits = brb * bbm * btiles * bbc
    bwd_sync = 2.0 * logits * dim if bbm < 64 else 0.0
    g_tile = bbm * bbc * e  # G stored to shared memory as the B operand of x^T G
    regs, _, smem = ptxas("class_bwd", design.name, op, w_dtype)
    bwd = KernelCost(
        name="class backward (grad W)",
        programs=btiles,
        num_warps=nw,
        regs_per_thread=regs,
        smem_per_program=smem,
        flops=2 * 2.0 * logits * dim - bwd_sync,
        flops_mma_sync=bwd_sync,
        dot_dtype=op,
        hbm=2 * w_bytes + x_bytes,
        l2=bwd_l2,
        smem=staged + steps * (bwd_mma + g_tile),
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


def hybrid_class_kernels(
    batch: int,
    classes: int,
    dim: int,
    op: str = "bf16",
    w_dtype: Optional[str] = None,
    chunk: int = 8192,
    hw: Hardware = H100_SXM,
    as_built: bool = False,
) -> List[KernelCost]:
    """The alternative the issue names: per chunk of ``chunk`` classes, cuBLAS matmuls
    (float32 logits S = x W_c, in L2 when B * chunk * 4 bytes fits: 32 MB at B = 1024)
    and one fused Triton epilogue per pass over S. Forward: S, epilogue (max, sum-exp).
    Backward: S again, epilogue (G, rounded to the operand dtype, and the radial term),
    grad W_c = x^T G, grad x += G W_c^T. Not built: the model ranks it below a fused
    design (the logits and G cross L2 as float32 / 16-bit tensors, and each chunk costs
    six launches).

    ``as_built``: add the PyTorch glue of ``class_lse_hybrid`` as it is (a functional
    version, not a tuned one): per chunk about 15 launches in the forward and 30 in the
    backward (W chunk rounding, its norms and W_hat, G's roundings and scalings, the
    radial projection), about 10 passes over the W chunk and 6 over the float32
    (B, chunk) G tensor, all through L2 (chunks of W also from HBM)."""
    w_dtype = w_dtype or op
    e, ew = DTYPE_BYTES[op], DTYPE_BYTES[w_dtype]
    n = math.ceil(classes / chunk)
    bc = batch * classes
    mm = 2.0 * bc * dim / CUBLAS_FRACTION
    w_bytes = classes * dim * ew

    def k(name, flops=0.0, l2=0.0, hbm=0.0, alu=0.0, sfu=0.0):
        return KernelCost(name, 8 * hw.sms, 4, 128, 0, flops, op, hbm, l2, l2, alu, sfu,
                          launches=n)  # fmt: skip

    return [
        k("hybrid: S = x W (fwd)", mm, 4.0 * bc + w_bytes, w_bytes),
        k("hybrid: epilogue (fwd)", l2=4.0 * bc, alu=ALU_PER_LOGIT_CLASS_FWD * bc, sfu=bc),
        k("hybrid: S = x W (bwd)", mm, 4.0 * bc + w_bytes, w_bytes),
        k("hybrid: epilogue (bwd)", l2=(4.0 + e) * bc, alu=ALU_PER_LOGIT_CLASS_BWD * bc, sfu=bc),
        k("hybrid: grad W = x^T G", mm, e * bc + w_bytes, w_bytes),
        k("hybrid: grad x += G W^T", mm, e * bc + w_bytes, w_bytes),
    ] + (
        [
            dataclasses.replace(
                k(
                    "hybrid: PyTorch glue (as built)",
                    l2=10.0 * w_bytes + 24.0 * bc,
                    hbm=10.0 * w_bytes,
                    alu=12.0 * bc,
                ),
                launches=44 * n,
            )  # fmt: skip
        ]
        if as_built
        else []
    )


# ------------------------------------------------------------------ the pair kernels


@dataclasses.dataclass(frozen=True)
class PairDesign:
    """Tiles of the pair Circle kernels (see pair_circle_triton); ``resident`` as in
    :class:`ClassDesign` (the row block stays loaded while column tiles stream by, and a
    column tile is loaded once for both of a backward step's dots)."""

    name: str = "v1"
    fwd_block_m: int = 128
    fwd_block_n: int = 64
    block_m: int = 64
    block_n: int = 32
    num_warps: int = 8
    resident: bool = False
    overlap: float = 0.0


PAIR_V1 = PairDesign()
# Not built: every tile loaded once per use (the row block resident while column tiles
# stream by; a streamed tile loaded once for both of a backward step's dots), 64 x 64
# backward tiles, half the softmax hidden under the matmuls.
PAIR_V2 = PairDesign(name="v2 (hypothetical)", block_n=64, resident=True, overlap=0.5)
CURRENT_PAIR = PAIR_V1  # what pair_circle_triton implements now


def _pair_splits(n_outer: int, n_inner: int, programs: int) -> int:
    """Splits of the inner loop, as ``pair_circle_triton._splits``: about ``programs``
    programs in all (two per SM; the backward at most 4 splits), whole tiles per split."""
    want = max(1, min(math.ceil(programs / max(n_outer, 1)), n_inner))
    return math.ceil(n_inner / math.ceil(n_inner / want))


def pair_kernels(
    batch: int, dim: int, op: str = "bf16", design: PairDesign = PAIR_V1, hw=H100_SXM
) -> List[KernelCost]:
    """The launches of one all-pairs training step (self-comparison, N = B): forward,
    row-side and column-side backward."""
    e, nw = DTYPE_BYTES[op], design.num_warps
    n = batch
    pairs = batch * n
    x_bytes = batch * dim * e
    out = []
    bm, bn = design.fwd_block_m, design.fwd_block_n
    rb, ct = math.ceil(batch / bm), math.ceil(n / bn)
    if design.resident:
        l2 = rb * bm * dim * e + rb * ct * bn * dim * e
    else:
        l2 = rb * ct * (bm + bn) * dim * e
    regs, _, smem = ptxas("pair_fwd", design.name, op, op)
    padded = rb * bm * ct * bn  # pairs on padded tiles (see class_kernels)
    out.append(
        KernelCost(
            name="pair forward",
            programs=rb * _pair_splits(rb, ct, 2 * hw.sms),
            num_warps=nw,
            regs_per_thread=regs,
            smem_per_program=smem,
            flops=2.0 * padded * dim,
            dot_dtype=op,
            hbm=x_bytes,
            l2=l2 + 8 * pairs / bn,  # + labels
            smem=l2 + rb * ct * mma_smem_bytes(bm, bn, dim, e, nw),
            alu=padded * ALU_PER_PAIR_FWD,
            sfu=2.0 * padded,
            overlap=design.overlap,
        )
    )
    bm, bn = design.block_m, design.block_n
    for side in ("row", "column"):
        outer, inner = (batch, bm) if side == "row" else (n, bn)
        other = bn if side == "row" else bm
        n_outer, n_inner = math.ceil(outer / inner), math.ceil(n / other)
        steps = n_outer * n_inner
        if design.resident:
            l2 = n_outer * inner * dim * e + steps * other * dim * e
        else:  # the logits reload both tiles; the second dot loads the streamed tile again
            l2 = steps * (bm + bn + other) * dim * e
        splits = _pair_splits(n_outer, n_inner, min(4 * n_outer, 2 * hw.sms))
        partial = splits * batch * dim * 4
        padded = n_outer * inner * n_inner * other
        mma = mma_smem_bytes(bm, bn, dim, e, nw)
        mma += (
            mma_smem_bytes(bm, dim, bn, e, nw, True)
            if side == "row"
            else mma_smem_bytes(dim, bn, bm, e, nw)
        )
        regs, _, smem = ptxas(f"pair_bwd_{side}", design.name, op, op)
        out.append(
            KernelCost(
                name=f"pair backward ({side} side)",
                programs=n_outer * splits,
                num_warps=nw,
                regs_per_thread=regs,
                smem_per_program=smem,
                flops=2 * 2.0 * padded * dim,
                dot_dtype=op,
                hbm=x_bytes + 2 * partial,
                l2=l2 + 2 * partial,
                smem=l2 + steps * (mma + bm * bn * e),
                alu=padded * ALU_PER_PAIR_BWD,
                sfu=float(padded),
                overlap=design.overlap,
            )
        )
    return out


def pair_floor(batch: int, dim: int, op: str = "bf16", hw=H100_SXM) -> float:
    """Seconds of the 3 B*B*D matmuls of the all-pairs loss fwd+bwd (x x^T, G x, G^T x)."""
    return 3 * 2.0 * batch * batch * dim / (hw.tensor_tflops[op] * 1e12)


# ------------------------------------------------------------------ summaries


def total(kernels: List[KernelCost], hw: Hardware, l2_tbps: Optional[float] = None) -> float:
    """Predicted seconds of a sequence of launches (they run one after another)."""
    return sum(predict(k, hw, l2_tbps).time for k in kernels)


def describe(kernels: List[KernelCost], hw: Hardware) -> str:
    """One line per kernel: predicted time, its terms, what bounds it."""
    lines = []
    for k in kernels:
        p = predict(k, hw)
        lines.append(
            f"  {k.name:<32} {p.time * 1e3:8.3f} ms  (tensor {p.t_tensor * 1e3:.3f}, "
            f"cuda {p.t_cuda * 1e3:.3f}, smem {p.t_smem * 1e3:.3f}, L2 {p.t_l2 * 1e3:.3f} "
            f"[{k.l2 / GB:.1f} GB], HBM {p.t_hbm * 1e3:.3f} [{k.hbm / GB:.2f} GB]; "
            f"{p.bound}-bound, {p.blocks_per_sm}/SM, waves {p.wave_efficiency:.2f})"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ the table

# The targets: (label, batch, classes, dim, operand dtype, W dtype).
CLASS_CASES = (
    ("B=1024 D=512 C=100k bf16", 1024, 100_000, 512, "bf16", "bf16"),
    ("B=1024 D=512 C=1M bf16", 1024, 1_000_000, 512, "bf16", "bf16"),
    ("B=1024 D=512 C=100k autocast (fp32 W)", 1024, 100_000, 512, "bf16", "fp32"),
    ("B=1024 D=512 C=1M autocast (fp32 W)", 1024, 1_000_000, 512, "bf16", "fp32"),
)
PAIR_CASES = (("B=16384 D=512 bf16", 16384, 512, "bf16"),)
CLASS_DESIGNS = (V1, V2, V2_FULL, V3)
PAIR_DESIGNS = (PAIR_V1, PAIR_V2)


def table() -> str:
    """Markdown table of the predictions (fwd+bwd) for the target cases: H100 / H200 time,
    floor and ratio, and the H100 ratio if shared memory did not limit (the least certain
    term). ``python -m pml_extras.ops.cost_model`` prints it; docs/kernels/cost_model.md
    holds a copy (tests/ops/test_cost_model.py checks that they agree)."""
    no_smem = dataclasses.replace(H100_SXM, smem_bytes_per_clk=1 << 30)
    rows = [
        "| kernels | design | case | H100 ms | H200 ms | floor H100 / H200 ms "
        "| ratio H100 | ratio H200 | H100 ratio, smem not limiting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(kind, design, label, kernels_on, floor_on):
        t = [total(kernels_on(hw=hw), hw) for hw in (H100_SXM, H200)]
        f = [floor_on(hw=hw) for hw in (H100_SXM, H200)]
        free = total(kernels_on(hw=no_smem), no_smem) / f[0]
        rows.append(
            f"| {kind} | {design.name} | {label} | {t[0] * 1e3:.2f} | {t[1] * 1e3:.2f} "
            f"| {f[0] * 1e3:.2f} / {f[1] * 1e3:.2f} | {t[0] / f[0]:.2f} | {t[1] / f[1]:.2f} "
            f"| {free:.2f} |"
        )

    for design in CLASS_DESIGNS:
        for label, b, c, d, op, w in CLASS_CASES:
            row(
                "class fwd+bwd",
                design,
                label,
                functools.partial(class_kernels, b, c, d, op, w, design),
                functools.partial(class_floor, b, c, d, op, w),
            )
    for name, built in (("hybrid (lean, not built)", False), ("hybrid (as built)", True)):
        for label, b, c, d, op, w in CLASS_CASES:
            row(
                "class fwd+bwd",
                ClassDesign(name=name),
                label,
                functools.partial(hybrid_class_kernels, b, c, d, op, w, as_built=built),
                functools.partial(class_floor, b, c, d, op, w),
            )
    for design in PAIR_DESIGNS:
        for label, b, d, op in PAIR_CASES:
            row(
                "pair fwd+bwd",
                design,
                label,
                functools.partial(pair_kernels, b, d, op, design),
                functools.partial(pair_floor, b, d, op),
            )
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - exercised by tests/ops/test_cost_model.py
    print(table())
    for design in CLASS_DESIGNS:
        print(f"\nclass, design {design.name}, B=1024 D=512 C=1M bf16 on the H100 SXM:")
        print(describe(class_kernels(1024, 1_000_000, 512, "bf16", "bf16", design), H100_SXM))
    for design in PAIR_DESIGNS:
        print(f"\npair, design {design.name}, B=16384 D=512 bf16 on the H100 SXM:")
        print(describe(pair_kernels(16384, 512, "bf16", design), H100_SXM))
