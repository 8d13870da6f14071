"""The pair Circle kernels (``pair_circle_triton``) as launches for the roofline, and the
pair matmul floor."""

from __future__ import annotations

import dataclasses
import math
from typing import List

from .ptxas_figures import ptxas
from .roofline import (
    ALU_PER_PAIR_BWD,
    ALU_PER_PAIR_FWD,
    DTYPE_BYTES,
    H100_SXM,
    KernelCost,
    mma_smem_bytes,
)


@dataclasses.dataclass(frozen=True)
class PairDesign:
    """Tiles of the pair Circle kernels (see pair_circle_triton); ``resident`` as in
    :class:`ClassDesign` (the held block stays loaded while the other set's tiles stream
    by, and a streamed tile is loaded once for both of a backward step's dots).

    ``block_m`` / ``block_n``: the backward's row / column tiles (v1), or its held /
    streamed tiles on both sides (``rows_oriented``). ``rows_oriented``: the column side
    runs the row side's dots with the roles swapped (s = x_tile y_block^T, then
    acc += (g w)^T x_tile, A from registers after a transposing layout conversion), instead
    of v1's x^T (g w) with D rows of A read from shared memory."""

    name: str = "v1"
    fwd_block_m: int = 128
    fwd_block_n: int = 64
    block_m: int = 64
    block_n: int = 32
    num_warps: int = 8
    resident: bool = False
    overlap: float = 0.0
    rows_oriented: bool = False


PAIR_V1 = PairDesign()
# Not built: every tile loaded once per use (the row block resident while column tiles
# stream by; a streamed tile loaded once for both of a backward step's dots), 64 x 64
# backward tiles, half the softmax hidden under the matmuls.
PAIR_V2 = PairDesign(name="v2 (hypothetical)", block_n=64, resident=True, overlap=0.5)
# Built (pair_circle_triton at this commit; tests/ops/test_cost_model.py checks the tiles
# against its BlockConfig). Forward 128 x 32 with the 128 x 512 row block resident (a
# 128 x 64 forward needs 256 KB of shared memory with two column buffers); backward
# 64 x 64 on both sides, held block resident, streamed tiles by TMA, each loaded once for
# both dots. overlap 0, from the PTX (tests/gpu/test_sm90_spills.py checks it): every
# ``wgmma.wait_group.sync.aligned`` in the three bf16 kernels at D = 512 waits for 0
# pending groups, so the softmax work on a tile never runs while a wgmma is in flight.
# The backward's accumulating wgmma (w @ tile) is left in flight across the loop's end,
# but the next step's similarity wgmma waits for it (wait_group 0) before any
# elementwise work. A forward pipelined by hand (the next tile's dot issued before this
# tile's softmax) compiled to the same wait_group 0 right after each dot: Triton 3.9
# defers a wgmma's wait only for a dot that accumulates into its own loop-carried result.
PAIR_V2_BUILT = PairDesign(
    name="v2",
    fwd_block_m=128,
    fwd_block_n=32,
    block_m=64,
    block_n=64,
    resident=True,
    overlap=0.0,
    rows_oriented=True,
)
CURRENT_PAIR = PAIR_V2_BUILT  # what pair_circle_triton implements now


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
        if design.rows_oriented:  # held block_m rows of either set, block_n streamed
            outer, inner, other = (batch if side == "row" else n), bm, bn
        else:
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
        if design.rows_oriented:
            # Both sides: s (held x streamed, K = D, both operands in shared memory), then
            # acc += w @ tile (w in registers); w crosses shared memory once to reach the
            # dot-operand layout (transposed on the column side): written and read.
            mma = mma_smem_bytes(inner, other, dim, e, nw)
            mma += mma_smem_bytes(inner, dim, other, e, nw, True)
            convert = 2 * inner * other * e
        else:
            mma = mma_smem_bytes(bm, bn, dim, e, nw)
            mma += (
                mma_smem_bytes(bm, dim, bn, e, nw, True)
                if side == "row"
                else mma_smem_bytes(dim, bn, bm, e, nw)
            )
            convert = bm * bn * e
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
                smem=l2 + steps * (mma + convert),
                alu=padded * ALU_PER_PAIR_BWD,
                sfu=float(padded),
                overlap=design.overlap,
            )
        )
    return out


def pair_floor(batch: int, dim: int, op: str = "bf16", hw=H100_SXM) -> float:
    """Seconds of the 3 B*B*D matmuls of the all-pairs loss fwd+bwd (x x^T, G x, G^T x)."""
    return 3 * 2.0 * batch * batch * dim / (hw.tensor_tflops[op] * 1e12)
