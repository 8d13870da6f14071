"""Fused Triton kernels for the all-pairs (and dense mined) pair-level Circle loss.

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
``_fwd_kernel``   grid (row blocks, column splits). Each program takes BLOCK_M rows and
    walks the BLOCK_N-column tiles of its split: similarities by ``tl.dot`` over D in
    BLOCK_D steps (float32 accumulator), masks, logits, and two online logsumexps
    (positives, negatives). Per-split (max, sum) partials are combined in PyTorch.

``_bwd_kernel``  row side, grid (row blocks, column splits, D groups): recomputes each
    tile and accumulates sum_j w_ij dz_ij y_j, w_ij = exp(z_ij - lse_i) within the pair's
    own set; the per-row factor g_i = dL_i/d(lse_p_i + lse_n_i) multiplies the result
    afterwards. Column side, grid (column blocks, row splits, D groups): the same tiles
    seen from the columns, sum_i g_i w_ij dz_ij x_i, accumulated as x^T (g w dz).

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
import triton.language as tl
from torch import Tensor

from ._triton_common import (
    ConfigSlot,
    check_tile_sizes,
    d_layout,
    is_interpreted,
    launch_device,
    operand_types,
    sm_count,
)

_NEG_BIG = tl.constexpr(-1.0e30)
_LABELS, _MASKS = 0, 1  # MODE: where positives / negatives come from


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes; powers of two, and >= 16 on a GPU (``tl.dot``).

    Not timed yet (no GPU so far). Chosen by compiling for sm_90 (D = 512, bf16 and fp32)
    and reading ptxas's register / spill counts: the backward kernels, which hold a
    (64, D <= 512) float32 accumulator, use 231-233 registers and no spills at 64 x 32
    tiles with 8 warps, and spill at 64 x 64 or with 4 warps; the forward, which holds no
    D-sized accumulator, fits 128 x 64 tiles in 137 registers without spills.
    """

    fwd_block_m: int = 128  # forward tiles
    fwd_block_n: int = 64
    block_m: int = 64  # backward tiles
    block_n: int = 32
    block_d: int = 64
    d_group: int = 512
    d_group_fp32: int = 256
    n_splits: Optional[int] = None  # None: about two programs per SM
    num_warps: int = 8
    num_stages: int = 2


_configs = ConfigSlot(BlockConfig())
block_config = _configs.override  # e.g. ``with block_config(block_m=16): ...`` (tests)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _similarity(
    X,
    Y,
    rows,
    row_ok,
    cols,
    col_ok,
    D,
    stride_x,
    stride_y,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) float32 tile of <x_i, y_j> (unit stride along D)."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    y_cols = Y + cols.to(tl.int64)[None, :] * stride_y
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        d_ok = dk < D
        xk = tl.load(x_rows + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        yk = tl.load(y_cols + dk[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.dot(xk.to(DOT_DTYPE), yk.to(DOT_DTYPE), s, input_precision=PRECISION)
    return s


@triton.jit
def _pair_masks(
    LAB, REF, POS, NEG, rows, row_ok, cols, col_ok, N, SELF: tl.constexpr, MODE: tl.constexpr
):
    """(pos, neg) boolean tiles; both False outside the B x N range."""
    inside = row_ok[:, None] & col_ok[None, :]
    if MODE == 0:
        lab = tl.load(LAB + rows, mask=row_ok, other=0)
        ref = tl.load(REF + cols, mask=col_ok, other=0)
        same = lab[:, None] == ref[None, :]
        pos = same & inside
        neg = (lab[:, None] != ref[None, :]) & inside
        if SELF:
            pos = pos & (rows[:, None] != cols[None, :])
    else:
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        pos = tl.load(POS + offs, mask=inside, other=0) != 0
        neg = tl.load(NEG + offs, mask=inside, other=0) != 0
    return pos, neg


@triton.jit
def _circle_logits(s, pos, m, gamma):
    """(z, dz/ds) with the [.]_+ weight detached; one form for both sets (see pair_circle)."""
    u = tl.where(pos, 1.0 - s, s)
    weight = tl.maximum(u + m, 0.0) * gamma
    z = weight * (u - m)
    return z, tl.where(pos, -weight, weight)


@triton.jit
def _set_weights(z, dz, pos, neg, lse_p, lse_n):
    """exp(z - lse) of each pair within its own set, times dz; 0 for pairs in neither.

    A pair in a set implies the set is non-empty, so its lse is finite and z <= lse."""
    w = tl.where(pos, tl.exp(z - lse_p[:, None]), tl.exp(z - lse_n[:, None]))
    return tl.where(pos | neg, w * dz, 0.0)


@triton.jit
def _logit_tile(
    X,
    Y,
    LAB,
    REF,
    POS,
    NEG,
    rows,
    row_ok,
    cols,
    col_ok,
    N,
    D,
    stride_x,
    stride_y,
    m,
    gamma,
    SELF: tl.constexpr,
    MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(z, dz/ds, pos, neg) of one (BLOCK_M, BLOCK_N) tile of pairs."""
    s = _similarity(
        X,
        Y,
        rows,
        row_ok,
        cols,
        col_ok,
        D,
        stride_x,
        stride_y,
        DOT_DTYPE,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    pos, neg = _pair_masks(LAB, REF, POS, NEG, rows, row_ok, cols, col_ok, N, SELF, MODE)
    z, dz = _circle_logits(s, pos, m, gamma)
    return z, dz, pos, neg


@triton.jit
def _fwd_kernel(
    X,
    Y,
    LAB,
    REF,
    POS,
    NEG,
    OUT,
    B,
    N,
    D,
    stride_x,
    stride_y,
    m,
    gamma,
    tiles_per_split,
    SELF: tl.constexpr,
    MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    max_p = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    max_n = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    sum_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_n = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for t in range(t_start, t_end):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        z, _, pos, neg = _logit_tile(
            X,
            Y,
            LAB,
            REF,
            POS,
            NEG,
            rows,
            row_ok,
            cols,
            col_ok,
            N,
            D,
            stride_x,
            stride_y,
            m,
            gamma,
            SELF,
            MODE,
            DOT_DTYPE,
            PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        zp = tl.where(pos, z, float("-inf"))
        zn = tl.where(neg, z, float("-inf"))
        new_p = tl.maximum(max_p, tl.max(zp, axis=1))
        new_n = tl.maximum(max_n, tl.max(zn, axis=1))
        sum_p = sum_p * tl.exp(max_p - new_p) + tl.sum(tl.exp(zp - new_p[:, None]), axis=1)
        sum_n = sum_n * tl.exp(max_n - new_n) + tl.sum(tl.exp(zn - new_n[:, None]), axis=1)
        max_p = new_p
        max_n = new_n
    # OUT is (4, splits, B): max_p, sum_p, max_n, sum_n.
    out = pid_s * B + rows
    plane = n_split * B
    tl.store(OUT + out, max_p, mask=row_ok)
    tl.store(OUT + plane + out, sum_p, mask=row_ok)
    tl.store(OUT + 2 * plane + out, max_n, mask=row_ok)
    tl.store(OUT + 3 * plane + out, sum_n, mask=row_ok)


@triton.jit
def _bwd_kernel(
    X,
    Y,
    LAB,
    REF,
    POS,
    NEG,
    LSE_P,
    LSE_N,
    G,
    GRAD,
    B,
    N,
    D,
    stride_x,
    stride_y,
    m,
    gamma,
    tiles_per_split,
    COLUMN_SIDE: tl.constexpr,
    SELF: tl.constexpr,
    MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_GROUP: tl.constexpr,
):
    """grad x (row side: a row block, walking column tiles) or grad y (column side: a
    column block, walking row tiles) of sum_i g_i (lse_p_i + lse_n_i), into float32
    per-split partials GRAD (splits, B or N, D). The row side leaves out g (a per-row
    factor, applied afterwards); the column side reads G, scaled into [-1, 1]."""
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_g = tl.program_id(2)
    dg = pid_g * D_GROUP + tl.arange(0, D_GROUP)
    dg_ok = dg < D
    if COLUMN_SIDE:
        cols = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros([D_GROUP, BLOCK_N], dtype=tl.float32)
        n_tiles = tl.cdiv(B, BLOCK_M)
    else:
        rows = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        acc = tl.zeros([BLOCK_M, D_GROUP], dtype=tl.float32)
        n_tiles = tl.cdiv(N, BLOCK_N)
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        if COLUMN_SIDE:
            rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < B
        else:
            cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
        lse_p = tl.load(LSE_P + rows, mask=row_ok, other=0.0)
        lse_n = tl.load(LSE_N + rows, mask=row_ok, other=0.0)
        z, dz, pos, neg = _logit_tile(
            X,
            Y,
            LAB,
            REF,
            POS,
            NEG,
            rows,
            row_ok,
            cols,
            col_ok,
            N,
            D,
            stride_x,
            stride_y,
            m,
            gamma,
            SELF,
            MODE,
            DOT_DTYPE,
            PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        w = _set_weights(z, dz, pos, neg, lse_p, lse_n)
        if COLUMN_SIDE:
            g = tl.load(G + rows, mask=row_ok, other=0.0)
            x_group = tl.load(
                X + rows.to(tl.int64)[:, None] * stride_x + dg[None, :],
                mask=row_ok[:, None] & dg_ok[None, :],
                other=0.0,
            )
            w = (w * g[:, None]).to(X.dtype.element_ty).to(DOT_DTYPE)
            acc = tl.dot(tl.trans(x_group.to(DOT_DTYPE)), w, acc, input_precision=PRECISION)
        else:
            y_group = tl.load(
                Y + cols.to(tl.int64)[:, None] * stride_y + dg[None, :],
                mask=col_ok[:, None] & dg_ok[None, :],
                other=0.0,
            )
            w = w.to(Y.dtype.element_ty).to(DOT_DTYPE)
            acc = tl.dot(w, y_group.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if COLUMN_SIDE:
        out = (pid_s * N + cols).to(tl.int64)[None, :] * D + dg[:, None]
        tl.store(GRAD + out, acc, mask=dg_ok[:, None] & col_ok[None, :])
    else:
        out = (pid_s * B + rows).to(tl.int64)[:, None] * D + dg[None, :]
        tl.store(GRAD + out, acc, mask=row_ok[:, None] & dg_ok[None, :])


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
    block_d, _, _ = _d_layout(d, cfg, operand_dtype == torch.float32)
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
            BLOCK_M=cfg.fwd_block_m,
            BLOCK_N=cfg.fwd_block_n,
            BLOCK_D=block_d,
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
    block_d, d_group, n_groups = _d_layout(d, cfg, operand_dtype == torch.float32)
    lse_p = lse_p.to(torch.float32).contiguous()
    lse_n = lse_n.to(torch.float32).contiguous()
    g_row = g_row.to(torch.float32)
    common = dict(
        SELF=self_compare,
        MODE=mode,
        DOT_DTYPE=dot,
        PRECISION=precision,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        D_GROUP=d_group,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    n_row_blocks = triton.cdiv(batch, cfg.block_m)
    n_col_blocks = triton.cdiv(num_cols, cfg.block_n)

    def launch(column_side: bool, row_factor: Tensor) -> Tensor:
        """Sum over splits of one side's float32 partial gradients."""
        n_outer, n_inner, size = (
            (n_col_blocks, n_row_blocks, num_cols)
            if column_side
            else (n_row_blocks, n_col_blocks, batch)
        )
        splits, per_split = _splits(n_outer * n_groups, n_inner, True, device, cfg)
        part = torch.empty(splits, size, d, device=device, dtype=torch.float32)
        with launch_device(xo):
            _bwd_kernel[(n_outer, splits, n_groups)](
                xo,
                yo,
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
