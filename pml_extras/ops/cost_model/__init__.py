"""A roofline cost model of the fused Triton kernels (class logsumexp, pair Circle).

Modules: ``roofline`` (hardware figures, :class:`KernelCost`, :func:`predict`), ``ptxas_figures``
(registers, spills and shared memory from ptxas), ``class_kernels`` and ``pair_kernels`` (each
design's launches and the matmul floor), ``bounds`` (what any fused class design can reach),
``report`` (the table for the target cases).

Every time this module returns is a PREDICTION from published peak figures and the
assumptions below, not a measurement. It exists so that a kernel design can be judged
before a GPU is available, and so that a benchmark run can print the prediction beside
the measured time and the matmul floor.

A leaf package: it imports nothing from the rest of the package (the block sizes are passed in, and
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

from .bounds import ClassBound, class_bound, describe_bound
from .class_kernels import (
    CUBLAS_FRACTION,
    CURRENT_CLASS,
    V1,
    V2,
    V2_BWD64,
    V2_CM,
    V2_FULL,
    V3,
    ClassDesign,
    class_floor,
    class_kernels,
    hybrid_class_kernels,
    wave_splits,
)
from .pair_kernels import (
    CURRENT_PAIR,
    PAIR_V1,
    PAIR_V2,
    PAIR_V2_BUILT,
    PairDesign,
    pair_floor,
    pair_kernels,
)
from .ptxas_figures import PTXAS_SM90, ptxas
from .report import CLASS_CASES, CLASS_DESIGNS, PAIR_CASES, PAIR_DESIGNS, table
from .roofline import (
    ALU_PER_LOGIT_CLASS_BWD,
    ALU_PER_LOGIT_CLASS_FWD,
    ALU_PER_PAIR_BWD,
    ALU_PER_PAIR_FWD,
    DTYPE_BYTES,
    GB,
    GPUS,
    H100_SXM,
    H200,
    KB,
    MMA_SYNC_FRACTION,
    Hardware,
    KernelCost,
    Prediction,
    blocks_per_sm,
    describe,
    mma_smem_bytes,
    predict,
    total,
)

__all__ = [
    "ALU_PER_LOGIT_CLASS_BWD", "ALU_PER_LOGIT_CLASS_FWD", "ALU_PER_PAIR_BWD", "ALU_PER_PAIR_FWD",
    "CLASS_CASES", "CLASS_DESIGNS", "CUBLAS_FRACTION", "CURRENT_CLASS", "CURRENT_PAIR",
    "ClassBound", "class_bound", "describe_bound",
    "DTYPE_BYTES", "GB", "GPUS", "H100_SXM", "H200", "KB", "MMA_SYNC_FRACTION", "PAIR_CASES",
    "PAIR_DESIGNS", "PAIR_V1", "PAIR_V2", "PAIR_V2_BUILT", "PTXAS_SM90", "V1", "V2", "V2_BWD64",
    "V2_CM", "V2_FULL", "V3",
    "ClassDesign", "Hardware", "KernelCost", "PairDesign", "Prediction", "blocks_per_sm",
    "class_floor", "class_kernels", "describe", "hybrid_class_kernels", "mma_smem_bytes",
    "pair_floor", "pair_kernels", "predict", "ptxas", "table", "total", "wave_splits",
]  # fmt: skip
