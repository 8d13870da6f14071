"""Fused Triton kernels for the all-pairs (and dense mined) pair-level Circle loss: tile
configuration and host launchers. The kernels live in ``pair_circle_triton_fwd`` (forward)
and ``pair_circle_triton_bwd`` (backward, both sides), their tile-level pieces in
``pair_circle_triton_tiles``.

Same contract as ``_BlockwiseCircle`` in ``pair_circle.py`` (that module's docstring
defines the loss): for rows x_i (B, D) and reference rows y_j (N, D), both already
normalised, s_ij = <x_i, y_j>,

    z_ij = gamma * [u_ij + m]_+ * (u_ij - m),   u_ij = 1 - s_ij (positive) or s_ij (negative)
    lse_p_i = logsumexp over i's positives of z_ij,  lse_n_i the same over its negatives.

Which pairs are positive / negative comes either from labels (``labels[i] == ref_labels[j]``,
minus the diagonal when the reference set is the batch itself) or from two (B, N) boolean
masks (the dense mined path). No B x N float tensor is ever built: every similarity tile
lives in registers only, like attention scores in flash attention.

Kernels
-------
``_fwd_kernel``   grid (row blocks, column splits). Each program holds BLOCK_M rows
    (loaded once when D fits one tile: "resident") and walks the BLOCK_N-row reference
    tiles of its split: similarities by ``tl.dot`` over all of D (float32 accumulator),
    masks, logits, and two online logsumexps (positives, negatives). Per-split (max, sum)
    partials are combined in PyTorch.

``_bwd_kernel``  row side, grid (row blocks, column splits, D groups): holds a row block,
    walks the column tiles, recomputes each similarity tile and accumulates
    sum_j w_ij dz_ij y_j, w_ij = exp(z_ij - lse_i) within the pair's own set; the per-row
    factor g_i = dL_i/d(lse_p_i + lse_n_i) multiplies the result afterwards. Column side,
    grid (column blocks, row splits, D groups): the same loop with x and y swapped (holds
    a column block, walks row tiles), accumulating sum_i g_i w_ij dz_ij x_i. Each streamed
    tile is loaded once for both of a step's dots (s, then w @ tile) when all of D fits
    one group (bf16/fp16 up to D = 512, fp32 up to 256); otherwise (D groups) s comes
    from a K-loop that reloads both tiles, as in v1. On that resident path the tiles
    come by TMA from host-made descriptors (:func:`_use_tma`: rows that are 16-byte
    multiples, compute capability >= 9.0 or the interpreter), 64 x 64 per step; with
    pointer loads 64 x 32 (``BlockConfig``).

fwd+bwd is therefore 5 matmul-sized passes (1 forward, 2 + 2 backward) against the
floor of 3, plus elementwise work on register tiles. With ``x is y`` (the usual
self-comparison) both sides of the backward run and their sums add up, as autograd would.

Precision: accumulation and every exp/log is float32. The matmul operands are
``operand_dtype`` (the embeddings' dtype: bf16/fp16 run on tensor cores); the [.]_+
weights and dz are computed from the float32 similarity. In the backward the softmax
weights times dz (bounded by gamma * (1 + 2m)) are rounded to the operand dtype, as flash
attention does with its probabilities; for the column kernel the per-row factors are
divided by their largest magnitude first, so fp16 never sees them underflow.

Interpreter (``TRITON_INTERPRET=1``, CPU): as in ``class_lse_triton``, bf16 operands are
multiplied as float32 there (same values).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

try:  # triton >= 3.3: host-side TMA descriptors (also understood by the interpreter)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

from ._triton_common import (
    ConfigSlot,
    check_tile_sizes,
    d_layout,
    is_interpreted,
    launch_device,
    operand_types,
    sm_count,
)
from .pair_circle_triton_bwd import _bwd_kernel
from .pair_circle_triton_fwd import _fwd_kernel

_LABELS, _MASKS = 0, 1  # MODE: where positives / negatives come from


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes; powers of two, and >= 16 on a GPU (``tl.dot``).

    Not timed yet (no GPU so far). Chosen by compiling for sm_90a (D = 512, Triton 3.9)
    and reading ptxas's register / spill counts (tests/gpu/test_sm90_spills.py prints
    them; pml_extras/ops/cost_model's PTXAS_SM90 holds them):

    * forward, 128 x 32 with the 128 x 512 row block resident (128 KB of shared memory
      next to two 32 x 512 column buffers): 94 registers, no spills. 64 x 64 fits too
      (124 registers) but reads the column tiles twice as often; 128 x 64 needs 256 KB.
    * backward, each side holding a 64-row block and its (64, D <= 512) float32
      accumulator (128 registers per thread): with TMA loads (bf16/fp16, aligned rows)
      64 x 64 steps fit in 247 (row side) and 255 (column side) registers without
      spills; with pointer loads the per-element addresses and masks do not fit at 64 x 64
      (the column side spills 96 bytes), so those paths stream ``block_n_pointer`` = 32
      rows per step (216 / 240 registers, no spills; 224 / 224 with D groups, D = 1024).

    ``block_m`` / ``block_n`` of the backward are the held (outer) block and the streamed
    (inner) tile, on both sides: batch rows / reference rows on the row side, reference
    rows / batch rows on the column side.
    """

    fwd_block_m: int = 128  # forward: batch rows held
    fwd_block_n: int = 32  # forward: reference rows streamed
    block_m: int = 64  # backward: rows held (the accumulator's rows)
    block_n: int = 64  # backward: rows streamed, TMA loads
    block_n_pointer: int = 32  # backward: rows streamed, pointer loads
    block_d: int = 64  # K step when D does not fit one group (no resident block)
    d_group: int = 512
    d_group_fp32: int = 256
    n_splits: Optional[int] = None  # None: about two programs per SM
    num_warps: int = 8
    num_stages: int = 2


_configs = ConfigSlot(BlockConfig())
block_config = _configs.override  # e.g. ``with block_config(block_m=16): ...`` (tests)


INTERPRETED = is_interpreted(_fwd_kernel)


# --------------------------------------------------------------------------- launchers


@dataclasses.dataclass
class PairSource:
    """Where positives / negatives come from: labels (+ whether to drop the diagonal) or
    two (B, N) boolean masks. Exactly one of the two pairs is set."""

    labels: Optional[Tensor] = None
    ref_labels: Optional[Tensor] = None
    self_compare: bool = False
    pos: Optional[Tensor] = None
    neg: Optional[Tensor] = None

    def kernel_args(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, bool, int]:
        """(LAB, REF, POS, NEG, SELF, MODE); unused pointers get a placeholder tensor."""
        if self.pos is not None:
            pos = self.pos.contiguous().view(torch.uint8)
            neg = self.neg.contiguous().view(torch.uint8)
            return pos, pos, pos, neg, False, _MASKS
        lab = self.labels.contiguous()
        ref = self.ref_labels.to(lab.dtype).contiguous()
        return lab, ref, lab, lab, bool(self.self_compare), _LABELS


def _check_config(cfg: BlockConfig) -> None:
    names = [f.name for f in dataclasses.fields(cfg) if "block_" in f.name or "d_group" in f.name]
    check_tile_sizes(cfg, names, True, INTERPRETED)


def _dtypes(operand_dtype: torch.dtype):
    """(dot-input type, precision) of the matmul operands."""
    _, dot, precision = operand_types(operand_dtype, INTERPRETED, "pair Circle")
    return dot, precision


def _d_layout(d: int, cfg: BlockConfig, fp32: bool) -> Tuple[int, int, int]:
    """(block_d, d_group, n_groups) for embedding size ``d``."""
    group = cfg.d_group_fp32 if fp32 else cfg.d_group
    return d_layout(d, cfg.block_d, group, INTERPRETED)


def tile_constexprs(d: int, cfg: BlockConfig, fp32: bool, tma: bool = True):
    """(forward, backward) tile constexprs of the kernels for embedding size ``d``: what the
    launchers pass, and what tests/gpu/test_sm90_spills.py compiles. Resident (the held
    block loaded once, s one ``tl.dot`` over all of D) when all of D fits one group; the
    backward's tiles come by TMA when ``tma`` and the path is resident."""
    block_d, d_group, n_groups = _d_layout(d, cfg, fp32)
    resident = n_groups == 1
    fwd = dict(
        BLOCK_M=cfg.fwd_block_m,
        BLOCK_N=cfg.fwd_block_n,
        BLOCK_D=d_group if resident else block_d,
        RESIDENT=resident,
    )
    tma = tma and resident
    bwd = dict(
        BLOCK_O=cfg.block_m, BLOCK_I=cfg.block_n if tma else cfg.block_n_pointer,
        BLOCK_D=block_d, D_GROUP=d_group, RESIDENT=resident, TMA=tma,
    )  # fmt: skip
    return fwd, bwd


def _use_tma(xo: Tensor, yo: Tensor, resident: bool) -> bool:
    """Whether the backward loads its tiles by TMA: the resident path, rows whose bytes are
    a multiple of 16 on 16-byte aligned storage (TMA's rules), and a GPU that has TMA
    (compute capability >= 9.0) or the interpreter, which runs the same kernel code."""
    if not resident or TensorDescriptor is None:
        return False
    if xo.device.type == "cuda" and torch.cuda.get_device_capability(xo.device)[0] < 9:
        return False
    d = xo.shape[1]
    return (d * xo.element_size()) % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in (xo, yo))


def _descriptor(t: Tensor, rows: int, d_group: int):
    """TMA descriptor of (rows, d_group) tiles of ``t``; zero fill past its edges."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [rows, d_group])


def _splits(n_programs: int, n_tiles: int, backward: bool, device, cfg):
    """(splits, tiles per split) of a kernel's inner loop: about two programs per SM; in the
    backward at most 4, each split costing one (rows, D) float32 partial sum."""
    if cfg.n_splits is not None:
        want = cfg.n_splits
    else:
        want = triton.cdiv(2 * sm_count(device), max(n_programs, 1))
        if backward:
            want = min(want, 4)
    want = max(1, min(want, n_tiles))
    per_split = triton.cdiv(n_tiles, want)
    return triton.cdiv(n_tiles, per_split), per_split


def _operands(x: Tensor, y: Tensor, operand_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    xo = x.to(operand_dtype).contiguous()
    yo = xo if y is x else y.to(operand_dtype).contiguous()
    return xo, yo


def forward(
    x: Tensor,
    y: Tensor,
    source: PairSource,
    m: float,
    gamma: float,
    operand_dtype: torch.dtype,
    config: Optional[BlockConfig] = None,
) -> Tuple[Tensor, Tensor]:
    """(lse_p, lse_n), both (B,) float32; -inf where a row has no positive / negative."""
    cfg = config or _configs.current
    _check_config(cfg)
    dot, precision = _dtypes(operand_dtype)
    batch, d = x.shape
    num_cols = y.shape[0]
    device = x.device
    if batch == 0 or num_cols == 0:
        empty = torch.full((batch,), float("-inf"), device=device, dtype=torch.float32)
        return empty, empty.clone()
    xo, yo = _operands(x, y, operand_dtype)
    lab, ref, pos, neg, self_compare, mode = source.kernel_args()
    tiles, _ = tile_constexprs(d, cfg, operand_dtype == torch.float32)
    n_row_blocks = triton.cdiv(batch, cfg.fwd_block_m)
    n_splits, per_split = _splits(
        n_row_blocks, triton.cdiv(num_cols, cfg.fwd_block_n), False, device, cfg
    )
    part = torch.empty(4, n_splits, batch, device=device, dtype=torch.float32)
    with launch_device(xo):
        _fwd_kernel[(n_row_blocks, n_splits)](
            xo,
            yo,
            lab,
            ref,
            pos,
            neg,
            part,
            batch,
            num_cols,
            d,
            xo.stride(0),
            yo.stride(0),
            float(m),
            float(gamma),
            per_split,
            SELF=self_compare,
            MODE=mode,
            DOT_DTYPE=dot,
            PRECISION=precision,
            **tiles,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return _combine(part[0], part[1]), _combine(part[2], part[3])


def _combine(maxes: Tensor, sums: Tensor) -> Tensor:
    """logsumexp from per-split (max, sum exp(z - max)); -inf where every sum is 0."""
    top = maxes.max(0).values
    total = (sums * torch.exp(maxes - top)).sum(0)
    return torch.where(total > 0, top + torch.log(total), float("-inf"))


def backward(
    x: Tensor,
    y: Tensor,
    source: PairSource,
    m: float,
    gamma: float,
    operand_dtype: torch.dtype,
    lse_p: Tensor,
    lse_n: Tensor,
    g_row: Tensor,
    *,
    need_x: bool = True,
    need_y: bool = True,
    config: Optional[BlockConfig] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients (float32) of sum_i g_row_i * (lse_p_i + lse_n_i) w.r.t. x and y.

    ``g_row`` must be 0 on rows without a loss (no positive or no negative)."""
    cfg = config or _configs.current
    _check_config(cfg)
    dot, precision = _dtypes(operand_dtype)
    batch, d = x.shape
    num_cols = y.shape[0]
    device = x.device
    grad_x = torch.zeros(batch, d, device=device, dtype=torch.float32) if need_x else None
    grad_y = torch.zeros(num_cols, d, device=device, dtype=torch.float32) if need_y else None
    if batch == 0 or num_cols == 0 or not (need_x or need_y):
        return grad_x, grad_y
    xo, yo = _operands(x, y, operand_dtype)
    lab, ref, pos, neg, self_compare, mode = source.kernel_args()
    fp32 = operand_dtype == torch.float32
    resident = _d_layout(d, cfg, fp32)[2] == 1
    _, tiles = tile_constexprs(d, cfg, fp32, _use_tma(xo, yo, resident))
    n_groups = triton.cdiv(d, tiles["D_GROUP"])
    tma = tiles["TMA"]
    lse_p = lse_p.to(torch.float32).contiguous()
    lse_n = lse_n.to(torch.float32).contiguous()
    g_row = g_row.to(torch.float32)
    common = dict(
        SELF=self_compare,
        MODE=mode,
        DOT_DTYPE=dot,
        PRECISION=precision,
        **tiles,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )

    def launch(column_side: bool, row_factor: Tensor) -> Tensor:
        """Sum over splits of one side's float32 partial gradients."""
        size, other = (num_cols, batch) if column_side else (batch, num_cols)
        n_outer, n_inner = triton.cdiv(size, cfg.block_m), triton.cdiv(other, tiles["BLOCK_I"])
        splits, per_split = _splits(n_outer * n_groups, n_inner, True, device, cfg)
        part = torch.empty(splits, size, d, device=device, dtype=torch.float32)
        held, streamed = (yo, xo) if column_side else (xo, yo)
        if tma:
            group = tiles["D_GROUP"]
            descs = (
                _descriptor(held, cfg.block_m, group),
                _descriptor(streamed, tiles["BLOCK_I"], group),
            )
        else:
            descs = (None, None)
        with launch_device(xo):
            _bwd_kernel[(n_outer, splits, n_groups)](
                xo,
                yo,
                *descs,
                lab,
                ref,
                pos,
                neg,
                lse_p,
                lse_n,
                row_factor,
                part,
                batch,
                num_cols,
                d,
                xo.stride(0),
                yo.stride(0),
                float(m),
                float(gamma),
                per_split,
                COLUMN_SIDE=column_side,
                **common,
            )
        return part.sum(0)

    if need_x:
        # The row factor is outside the matmul: tiny factors never meet fp16 operands.
        torch.mul(launch(False, lse_p), g_row[:, None], out=grad_x)
    if need_y:
        # Row factors scaled into [-1, 1] before they reach the operand dtype; the scale
        # (a device scalar, no sync) is applied to the float32 result.
        g_scale = g_row.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        torch.mul(launch(True, (g_row / g_scale).contiguous()), g_scale, out=grad_y)
    return grad_x, grad_y
