"""The roofline core: hardware figures, a kernel launch's totals, and the predicted time
(the model and its sources: the package docstring, ``pml_extras.ops.cost_model``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

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
