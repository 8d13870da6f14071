"""Fused Triton kernels for :func:`pml_extras.ops.class_lse.class_logsumexp`.

Same contract as ``_forward_torch`` / ``_backward_torch`` in ``class_lse_autograd.py`` (the
``class_lse`` docstring defines the transforms): ``lse`` (B,) is the logsumexp over the
non-target columns of z_ij = g(c_ij), c_ij = clamp(<x_i, w_j> / ||w_j||, -1, 1), and
``cos_y`` (B,) the target cosine. No B x C tensor and no normalised copy of W is ever
built; every logit tile lives in registers only.

Kernels
-------
``_inv_norm_kernel``  1 / ||w_j|| for every class (a C-sized float32 vector).

``_fwd_kernel``       grid (row blocks, class splits, D groups). Each program takes a
    BLOCK_M-row block of x and loops over the BLOCK_C-class tiles of its split: logits by
    ``tl.dot`` (float32 accumulation), scale by 1/||w||, clamp, transform, target and
    padding columns set to -inf, online max / sum-exp. It writes per-(split, row)
    partials (max, sumexp), combined across splits in PyTorch.

    With ``NEED_U`` (training: x needs a gradient) it also accumulates, flash-attention
    style with the same online rescaling,

        u_i = sum_j softmax_ij * g'(c_ij) * w_hat_j                        (B, D)

    i.e. d lse_i / d x_hat_i (the clamp to [-1, 1] bounds the value only: no gradient
    mask, as in ``class_common.add_target_grad``). Since grad_lse_i only scales row i,
    the backward's grad_x is just ``grad_lse[:, None] * u``: the logits are recomputed once in the
    backward instead of twice. Cost: forward 2 matmuls (x W, P W^T), backward 2 matmuls
    (x W again, x^T G), so fwd+bwd = 4 matmuls against the floor of 3 (x W, dC W^T,
    x^T dC) plus the cheap elementwise work. Recomputing instead (``state=None`` in
    :func:`backward`, used when the forward did not save u) costs 5.

``_bwd_w_kernel``     grid (class blocks, D groups). Each program holds its class tile of
    W and loops over all row blocks (``bwd_block_m`` rows at a time; when all of D fits
    one group, the W tile is loaded once and each x block once for both dots, see
    ``cost_model`` design "v2"): recompute the logits, G = exp(z - lse) * g'(c) *
    grad_lse (target column masked; no mask at the clamp), accumulate x^T G in registers
    (D_GROUP x BLOCK_C float32) and the radial term r_j = sum_i G_ij raw_ij
    (= <grad_w_hat_j, w_hat_j>, so it needs no full-D accumulator), then writes
    grad_w_j = (grad_w_hat_j - w_hat_j r_j) / ||w_j|| once: no atomics, no second pass.

D handling: the logits are a K-loop over D in ``block_d`` steps (what Triton pipelines
best). The second-stage accumulators (u: BLOCK_M x D, x^T G: D x BLOCK_C) hold all of D
when the padded D is at most ``d_group`` (default 512). Larger D is split into
``d_group`` slices over a grid axis; each slice program recomputes the logits over all
of D (one extra logits matmul per additional slice: the price of bounded registers).

The target column's own gradient (grad_cos) is added in PyTorch afterwards, exactly as in
``_backward_torch``.

Precision: accumulation is float32. The matmul operands follow the operand policy
(:func:`pml_extras.ops.precision.operand_dtype`: autocast's dtype, else bf16/fp16
embeddings' dtype, else float32), W rounded to it tile by tile; for 16-bit operands the
second-stage operands (the softmax weights P and G) are rounded to
that dtype too, as flash attention does. Float32 inputs use IEEE float32 dots unless
torch's float32 matmul precision says TF32 (``precision.tf32_enabled``), mirroring what PyTorch's
own matmuls would do, so the torch path is a like-for-like oracle. Float64 is not
supported (``impl="auto"`` never picks Triton for it).

Interpreter (``TRITON_INTERPRET=1``, CPU): triton 3.9's interpreter multiplies bfloat16
tensors as their raw uint16 storage in ``tl.dot``, so under the interpreter bf16
operands are rounded to bf16 and then multiplied as float32 (same values; only the
accumulation order differs from the GPU).
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
    wave_splits,
)
from .class_common import (
    KINDS,
    add_target_grad,
    operands,
    project_rows,
    unit_target_cosine,
)
from .precision import EPS as _EPS

_KIND_IDS = {"circle": 0, "curricular": 1, "scaled": 2}  # the KIND branches of _transform
assert set(_KIND_IDS) == set(KINDS)
# Finite "minus infinity" for the running max (keeps exp(m - m) = 1 on all-masked rows).
_NEG_BIG = tl.constexpr(-1.0e30)
EPS = tl.constexpr(_EPS)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes. All must be powers of two; on a GPU ``tl.dot`` also needs >= 16.

    The defaults were chosen by compiling for sm_90 (D = 512, bf16) and reading ptxas's
    register / spill counts: 64 x 32 tiles with all of D per program fit in 255 registers
    without spills to speak of, 64 x 64 tiles or 16 warps spill (float32 operands spill
    unless D is split at 256). They are not timed.
    """

    block_m: int = 64  # rows per tile
    block_c: int = 32  # classes per tile
    block_d: int = 64  # D step of the logits matmul
    d_group: int = 512  # most of D one program accumulates; larger D is split over programs
    d_group_fp32: int = 256  # the same for float32 operands (twice the bytes per tile)
    n_splits: Optional[int] = None  # class splits of the forward; None: fill the GPU
    norm_block_c: int = 256  # inverse-norm kernel tiles
    norm_block_d: int = 32
    num_warps: int = 8
    num_stages: int = 2
    # Rows per step of the backward; None: min(block_m, 32). With all of D in one group
    # the backward holds its W tile and a whole (rows x D) x block: at 64 rows that
    # spills (228 bytes, bf16, D = 512), at 32 it fits in 183 registers (cost_model).
    bwd_block_m: Optional[int] = None


_configs = ConfigSlot(BlockConfig())
block_config = _configs.override  # e.g. ``with block_config(block_c=16): ...`` (tests)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _transform(c, rp, p0, p1, KIND: tl.constexpr):
    """(z, dz/dc) of a float32 cosine tile; ``rp`` is the (BLOCK_M,) row parameter."""
    if KIND == 0:  # circle: p0 * [c + p1]_+ * (c - p1), the weight detached
        dz = p0 * tl.maximum(c + p1, 0.0)
        z = dz * (c - p1)
    elif KIND == 1:  # curricular: p0 * (c (p1 + c) if c > rp else c), mask detached
        hard = c > rp[:, None]
        z = tl.where(hard, c * (p1 + c), c) * p0
        dz = tl.where(hard, (p1 + 2.0 * c) * p0, p0)
    else:  # scaled
        z = c * p0
        dz = tl.zeros_like(c) + p0
    return z, dz


@triton.jit
def _inv_norm_kernel(
    W,
    INV,
    D,
    C,
    stride_wd,
    stride_wc,
    OP_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w_cols = W + cols.to(tl.int64)[None, :] * stride_wc
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(
            w_cols + dk.to(tl.int64)[:, None] * stride_wd,
            mask=(dk < D)[:, None] & col_ok[None, :],
            other=0.0,
        )
        w = w.to(OP_DTYPE).to(tl.float32)  # norms of the operand values the dots use
        acc += tl.sum(w * w, axis=0)
    # Correctly rounded sqrt and division (the default "/" and sqrt are approximate on
    # the GPU): the same inverse norms as the PyTorch path up to its rsqrt's rounding.
    norm = tl.sqrt_rn(tl.maximum(acc, EPS))
    tl.store(INV + cols, tl.div_rn(tl.full([BLOCK_C], 1.0, tl.float32), norm), mask=col_ok)


@triton.jit
def _logits(
    X,
    w_cols,
    rows,
    row_ok,
    col_ok,
    D,
    stride_xb,
    stride_xd,
    stride_wd,
    OP_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """x[rows] . w[:, cols] over all of D in BLOCK_D steps (float32 accumulator)."""
    s = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xb  # int64: B * stride may pass 2^31
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        d_ok = dk < D
        xk = tl.load(
            x_rows + dk[None, :] * stride_xd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        wk = tl.load(
            w_cols + dk.to(tl.int64)[:, None] * stride_wd,
            mask=d_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        s = tl.dot(
            xk.to(OP_DTYPE).to(DOT_DTYPE),
            wk.to(OP_DTYPE).to(DOT_DTYPE),
            s,
            input_precision=PRECISION,
        )
    return s


@triton.jit
def _fwd_kernel(
    X,
    W,
    INV,
    RX,
    TGT,
    RP,
    P1,
    M_OUT,
    L_OUT,
    U_OUT,
    B,
    D,
    C,
    stride_xb,
    stride_xd,
    stride_wd,
    stride_wc,
    p0,
    p1_value,
    tiles_per_split,
    KIND: tl.constexpr,
    P1_PTR: tl.constexpr,
    NEED_U: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_GROUP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_g = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    rp = tl.load(RP + rows, mask=row_ok, other=0.0)
    rx = tl.load(RX + rows, mask=row_ok, other=0.0)
    if P1_PTR:
        p1 = tl.load(P1)
    else:
        p1 = p1_value
    # This program's slice of D for u (all of D unless D > D_GROUP).
    dg = pid_g * D_GROUP + tl.arange(0, D_GROUP)
    dg_ok = dg < D
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NEED_U:
        u_acc = tl.zeros([BLOCK_M, D_GROUP], dtype=tl.float32)

    n_tiles = tl.cdiv(C, BLOCK_C)
    t_start = pid_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        cols = t * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        inv = tl.load(INV + cols, mask=col_ok, other=0.0)
        w_cols = W + cols.to(tl.int64)[None, :] * stride_wc
        s = _logits(
            X,
            w_cols,
            rows,
            row_ok,
            col_ok,
            D,
            stride_xb,
            stride_xd,
            stride_wd,
            OP_DTYPE,
            DOT_DTYPE,
            PRECISION,
            BLOCK_M,
            BLOCK_C,
            BLOCK_D,
        )
        # Both normalisations outside the dot, on its float32 result.
        c = tl.minimum(tl.maximum(s * rx[:, None] * inv[None, :], -1.0), 1.0)
        z, dz = _transform(c, rp, p0, p1, KIND)
        keep = col_ok[None, :] & (cols[None, :] != tgt[:, None])
        z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        if NEED_U:
            # Softmax weight times dz/dc, at most ~2 * p0: safe in fp16. The clamp bounds
            # the value only (no gradient mask: see class_common.add_target_grad). 1/||w||
            # goes on the W side, so w_hat's entries lie in [-1, 1]: a near-zero proxy's
            # huge 1/||w|| never meets a 16-bit operand.
            pw = e * dz
            w_tile = tl.load(
                w_cols + dg.to(tl.int64)[:, None] * stride_wd,
                mask=dg_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            w_tile = w_tile.to(OP_DTYPE).to(tl.float32) * inv[None, :]
            w_tile = w_tile.to(OP_DTYPE).to(DOT_DTYPE)
            pw = pw.to(OP_DTYPE).to(DOT_DTYPE)
            u_acc = u_acc * alpha[:, None]
            u_acc = tl.dot(pw, tl.trans(w_tile), u_acc, input_precision=PRECISION)
        m_i = m_new

    out = pid_s * B + rows
    if pid_g == 0:
        tl.store(M_OUT + out, m_i, mask=row_ok)
        tl.store(L_OUT + out, l_i, mask=row_ok)
    if NEED_U:
        tl.store(
            U_OUT + out.to(tl.int64)[:, None] * D + dg[None, :],
            u_acc,
            mask=row_ok[:, None] & dg_ok[None, :],
        )


@triton.jit
def _bwd_w_kernel(
    X,
    W,
    INV,
    RX,
    TGT,
    RP,
    P1,
    LSE,
    GLSE,
    GW,
    B,
    D,
    C,
    stride_xb,
    stride_xd,
    stride_wd,
    stride_wc,
    stride_gd,
    stride_gc,
    p0,
    p1_value,
    KIND: tl.constexpr,
    P1_PTR: tl.constexpr,
    OP_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    RESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_GROUP: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    inv = tl.load(INV + cols, mask=col_ok, other=0.0)
    if P1_PTR:
        p1 = tl.load(P1)
    else:
        p1 = p1_value
    dg = pid_g * D_GROUP + tl.arange(0, D_GROUP)
    dg_ok = dg < D
    w_cols = W + cols.to(tl.int64)[None, :] * stride_wc
    w_ptrs = w_cols + dg.to(tl.int64)[:, None] * stride_wd
    w_mask = dg_ok[:, None] & col_ok[None, :]
    if RESIDENT:
        w_dot = tl.load(w_ptrs, mask=w_mask, other=0.0).to(OP_DTYPE).to(DOT_DTYPE)
    acc = tl.zeros([D_GROUP, BLOCK_C], dtype=tl.float32)
    radial = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, B, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
        rp = tl.load(RP + rows, mask=row_ok, other=0.0)
        # Rows whose columns are all masked have lse = -inf; ``valid`` is False on all of
        # them, so the tl.where below never lets exp(z + inf) through.
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        glse = tl.load(GLSE + rows, mask=row_ok, other=0.0)
        rx = tl.load(RX + rows, mask=row_ok, other=0.0)
        x_group = tl.load(
            X + rows.to(tl.int64)[:, None] * stride_xb + dg[None, :] * stride_xd,
            mask=row_ok[:, None] & dg_ok[None, :],
            other=0.0,
        )
        x_group = x_group.to(OP_DTYPE).to(DOT_DTYPE)
        if RESIDENT:
            # All of D in one group: the W tile loaded once above serves every row block,
            # and the x block is loaded once for both dots (cost_model design "v2": x
            # through L2 once per class tile instead of twice, W once per program).
            s = tl.dot(x_group, w_dot, input_precision=PRECISION)
        else:
            s = _logits(
                X,
                w_cols,
                rows,
                row_ok,
                col_ok,
                D,
                stride_xb,
                stride_xd,
                stride_wd,
                OP_DTYPE,
                DOT_DTYPE,
                PRECISION,
                BLOCK_M,
                BLOCK_C,
                BLOCK_D,
            )
        raw = s * rx[:, None] * inv[None, :]
        c = tl.minimum(tl.maximum(raw, -1.0), 1.0)
        z, dz = _transform(c, rp, p0, p1, KIND)
        valid = col_ok[None, :] & (cols[None, :] != tgt[:, None])
        g = tl.where(valid, tl.exp(z - lse[:, None]) * dz * glse[:, None], 0.0)
        # <grad_w_hat_j, w_hat_j> = sum_i G_ij <x_hat_i, w_hat_j> = sum_i G_ij raw_ij.
        radial += tl.sum(g * raw, axis=0)
        # grad_w_hat_j = sum_i G_ij x_hat_i = sum_i (G_ij / ||x_i||) x_i: the raw x tile.
        g = g * rx[:, None]
        if RESCALE:
            # fp16 operands: each column scaled into [-1, 1] before rounding, the scale
            # applied to the float32 product. Without it, G ~ 1e-9 (C = 1M, mean
            # reduction) flushes to zero and a large 1/||x|| overflows.
            g_max = tl.maximum(tl.max(tl.abs(g), axis=0), 1.0e-38)
            g = (g / g_max[None, :]).to(OP_DTYPE).to(DOT_DTYPE)
            part = tl.dot(tl.trans(x_group), g, input_precision=PRECISION)
            acc += part * g_max[None, :]
        else:
            g = g.to(OP_DTYPE).to(DOT_DTYPE)
            acc = tl.dot(tl.trans(x_group), g, acc, input_precision=PRECISION)
    # Normalisation Jacobian: (I - w_hat w_hat^T) / ||w||.
    # W loaded again for the Jacobian rather than kept live in registers through the loop.
    w_group = tl.load(w_ptrs, mask=w_mask, other=0.0)
    w_hat = w_group.to(OP_DTYPE).to(tl.float32) * inv[None, :]
    grad = (acc - w_hat * radial[None, :]) * inv[None, :]
    tl.store(
        GW + dg.to(tl.int64)[:, None] * stride_gd + cols.to(tl.int64)[None, :] * stride_gc,
        grad.to(GW.dtype.element_ty),
        mask=dg_ok[:, None] & col_ok[None, :],
    )


INTERPRETED = is_interpreted(_fwd_kernel)
# Concurrent programs per SM: at the default tiles (255 registers per thread, 8 warps)
# one block fits per SM, so a wave is sm_count programs.
BLOCKS_PER_SM = 1


# --------------------------------------------------------------------------- launchers


def _check_config(cfg: BlockConfig) -> None:
    names = [f.name for f in dataclasses.fields(cfg) if f.name.startswith(("block_", "d_group"))]
    check_tile_sizes(cfg, names, True, INTERPRETED)
    check_tile_sizes(cfg, ["norm_block_c", "norm_block_d"], False, INTERPRETED)
    if cfg.bwd_block_m is not None:
        check_tile_sizes(cfg, ["bwd_block_m"], True, INTERPRETED)


def _bwd_block_m(cfg: BlockConfig) -> int:
    return min(cfg.block_m, 32) if cfg.bwd_block_m is None else cfg.bwd_block_m


def _d_layout(d: int, cfg: BlockConfig, fp32: bool) -> Tuple[int, int, int]:
    """(block_d, d_group, n_groups) for embedding size ``d``."""
    group = cfg.d_group_fp32 if fp32 else cfg.d_group
    return d_layout(d, cfg.block_d, group, INTERPRETED)


def _p1_args(p1, device):
    """(pointer tensor, float value, is_pointer): a 0-d tensor p1 is read on the device."""
    if torch.is_tensor(p1):
        return p1.detach().reshape(1).to(device=device, dtype=torch.float32), 0.0, True
    return None, float(p1), False


def inverse_norms(
    weight: Tensor, config: Optional[BlockConfig] = None, op_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """(C,) float32 1 / max(||w_j||, 1e-6), as ``rsqrt(clamp_min(sum w^2, 1e-12))``, of W's
    values rounded to the operand dtype ``op_dtype`` (default: W's own dtype)."""
    cfg = config or _configs.current
    op = operand_types(op_dtype or weight.dtype, INTERPRETED, "class_logsumexp")[0]
    d, c = weight.shape
    inv = torch.empty(c, device=weight.device, dtype=torch.float32)
    if c:
        grid = (triton.cdiv(c, cfg.norm_block_c),)
        with launch_device(weight):
            _inv_norm_kernel[grid](
                weight,
                inv,
                d,
                c,
                weight.stride(0),
                weight.stride(1),
                OP_DTYPE=op,
                BLOCK_D=cfg.norm_block_d,
                BLOCK_C=cfg.norm_block_c,
            )
    return inv


def _n_splits(
    batch: int, num_classes: int, n_groups: int, need_u: bool, itemsize: int, device, cfg
):
    """(number of class splits, class tiles per split) for the forward grid: the grid
    (row blocks x splits x D groups) fills whole waves of the GPU (see ``wave_splits``)."""
    n_row_blocks = triton.cdiv(batch, cfg.block_m)
    n_tiles = triton.cdiv(num_classes, cfg.block_c)
    if cfg.n_splits is not None:
        want = max(1, min(cfg.n_splits, n_tiles))
        per_split = triton.cdiv(n_tiles, want)
        return triton.cdiv(n_tiles, per_split), per_split
    per_split_programs = n_row_blocks * n_groups
    slots = sm_count(device) * BLOCKS_PER_SM
    # Up to 4 waves' worth of splits; more only multiply the partial sums.
    most = 4 * triton.cdiv(slots, per_split_programs)
    if need_u:  # keep the (splits, B, D) float32 partials of u no larger than W
        most = min(most, max(1, (num_classes * itemsize) // (batch * 4)))
    return wave_splits(per_split_programs, n_tiles, slots, most)


def _forward_impl(x_op, inv_x, weight, inv, target, row_param, kind, p0, p1, need_u, cfg):
    """(lse, u or None): lse (B,) float32; u (B, D) float32 = d lse / d x_hat (see above).

    ``x_op``: the embeddings rounded to the operand dtype; ``inv_x``: (B,) float32 inverse
    norms of its rows."""
    batch, d = x_op.shape
    num_classes = weight.shape[1]
    device = x_op.device
    op, dot, precision = operand_types(x_op.dtype, INTERPRETED, "class_logsumexp")
    block_d, d_group, n_groups = _d_layout(d, cfg, op == tl.float32)
    if not need_u:
        n_groups = 1  # without u the D slices are not needed
    n_splits, per_split = _n_splits(
        batch, num_classes, n_groups, need_u, weight.element_size(), device, cfg
    )
    m_part = torch.empty(n_splits, batch, device=device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    u_part = (
        torch.empty(n_splits, batch, d, device=device, dtype=torch.float32) if need_u else m_part
    )
    p1_ptr, p1_value, p1_is_ptr = _p1_args(p1, device)
    grid = (triton.cdiv(batch, cfg.block_m), n_splits, n_groups)
    with launch_device(x_op):
        _fwd_kernel[grid](
            x_op,
            weight,
            inv,
            inv_x,
            target,
            row_param,
            p1_ptr if p1_is_ptr else inv,
            m_part,
            l_part,
            u_part,
            batch,
            d,
            num_classes,
            x_op.stride(0),
            x_op.stride(1),
            weight.stride(0),
            weight.stride(1),
            float(p0),
            p1_value,
            per_split,
            KIND=_KIND_IDS[kind],
            P1_PTR=p1_is_ptr,
            NEED_U=need_u,
            OP_DTYPE=op,
            DOT_DTYPE=dot,
            PRECISION=precision,
            BLOCK_M=cfg.block_m,
            BLOCK_C=cfg.block_c,
            BLOCK_D=block_d,
            D_GROUP=d_group,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    # Combine the splits: lse = M + log sum_s exp(m_s - M) l_s (-inf when all masked).
    m_max = m_part.max(0).values
    scale = torch.exp(m_part - m_max)
    total = (scale * l_part).sum(0)
    lse = m_max + torch.log(total)
    if not need_u:
        return lse, None
    inv_total = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    u = torch.einsum("sb,sbd->bd", scale, u_part) * inv_total[:, None]
    return lse, u


def _prepare(x, weight, target, row_param, kind, op_dtype):
    """Checks, then (operands, target, row_param); see ``class_lse.operands``."""
    if kind not in _KIND_IDS:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {KINDS}")
    ops = operands(x, weight, op_dtype)
    operand_types(ops[0], INTERPRETED, "class_logsumexp")  # raises for unsupported dtypes
    target = target.long().contiguous()
    row_param = row_param.to(torch.float32).contiguous()
    return ops, target, row_param


def forward(
    x, weight, target, row_param, kind, p0, p1, *, op_dtype=None, need_state=False, config=None
):
    """(lse, cos_y), both (B,) float32, of raw embeddings ``x`` (normalised here).

    ``op_dtype``: the matmul operand dtype; None follows :func:`class_lse.operand_dtype`.
    With ``need_state``: (lse, cos_y, state), where ``state`` = (u, inv_norm) lets
    :func:`backward` skip one recompute of the logits."""
    cfg = config or _configs.current
    _check_config(cfg)
    (op, acc, x_op, x_hat, inv_x), target, row_param = _prepare(
        x, weight, target, row_param, kind, op_dtype
    )
    batch, d = x.shape
    if batch == 0 or weight.shape[1] == 0:
        # No rows or no classes: nothing to reduce (the torch path agrees for B = 0).
        lse = torch.full((batch,), float("-inf"), device=x.device, dtype=acc)
        u = torch.zeros(batch, d, device=x.device, dtype=acc)
        inv = torch.empty(weight.shape[1], device=x.device, dtype=torch.float32)
    else:
        inv = inverse_norms(weight, cfg, op)
        lse, u = _forward_impl(
            x_op, inv_x.contiguous(), weight, inv, target, row_param, kind, p0, p1, need_state, cfg
        )
    cos_y = unit_target_cosine(x_hat, weight, target, op)
    if need_state:
        return lse, cos_y, (u, inv)
    return lse, cos_y


def backward(
    x,
    weight,
    target,
    row_param,
    kind,
    p0,
    p1,
    lse,
    grad_lse,
    grad_cos,
    *,
    state=None,
    need_grad_x=True,
    need_grad_w=True,
    op_dtype=None,
    config=None,
):
    """(grad_x (B, D) in x.dtype, grad_w (D, C) in weight.dtype); a gradient that is not
    needed is returned as None. ``state`` is the third output of ``forward(need_state=True)``;
    without it, u is recomputed (one more pass over W). ``op_dtype`` as in :func:`forward`
    (pass the forward's)."""
    cfg = config or _configs.current
    _check_config(cfg)
    (op, acc, x_op, x_hat, inv_x), target, row_param = _prepare(
        x, weight, target, row_param, kind, op_dtype
    )
    inv_x = inv_x.contiguous()
    batch, d = x.shape
    num_classes = weight.shape[1]
    grad_lse = grad_lse.to(acc).contiguous()
    grad_cos = grad_cos.to(acc)
    u, inv = state if state is not None else (None, None)
    if inv is None and batch and num_classes:
        inv = inverse_norms(weight, cfg, op)
    grad_hat = grad_w = None
    if need_grad_x:
        if u is None:
            if batch and num_classes:
                _, u = _forward_impl(
                    x_op, inv_x, weight, inv, target, row_param, kind, p0, p1, True, cfg
                )
            else:
                u = torch.zeros(batch, d, device=x.device, dtype=acc)
        grad_hat = grad_lse[:, None] * u
    if need_grad_w:
        grad_w = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
        if batch == 0:
            grad_w.zero_()
        elif num_classes:
            _bwd_w_impl(
                x_op,
                inv_x,
                weight,
                inv,
                target,
                row_param,
                kind,
                p0,
                p1,
                lse,
                grad_lse,
                grad_w,
                cfg,
            )
    if batch:
        add_target_grad(x_hat, weight, target, grad_cos, grad_hat, grad_w, op)
    if grad_hat is None:
        return None, grad_w
    return project_rows(grad_hat, x_hat, inv_x).to(x.dtype), grad_w


def _bwd_w_impl(
    x_op, inv_x, weight, inv, target, row_param, kind, p0, p1, lse, grad_lse, grad_w, cfg
):
    batch, d = x_op.shape
    num_classes = weight.shape[1]
    op, dot, precision = operand_types(x_op.dtype, INTERPRETED, "class_logsumexp")
    block_d, d_group, n_groups = _d_layout(d, cfg, op == tl.float32)
    p1_ptr, p1_value, p1_is_ptr = _p1_args(p1, x_op.device)
    block_m = _bwd_block_m(cfg)
    grid = (triton.cdiv(num_classes, cfg.block_c), n_groups)
    with launch_device(x_op):
        _bwd_w_kernel[grid](
            x_op,
            weight,
            inv,
            inv_x,
            target,
            row_param,
            p1_ptr if p1_is_ptr else inv,
            lse.to(torch.float32).contiguous(),
            grad_lse.to(torch.float32),
            grad_w,
            batch,
            d,
            num_classes,
            x_op.stride(0),
            x_op.stride(1),
            weight.stride(0),
            weight.stride(1),
            grad_w.stride(0),
            grad_w.stride(1),
            float(p0),
            p1_value,
            KIND=_KIND_IDS[kind],
            P1_PTR=p1_is_ptr,
            OP_DTYPE=op,
            DOT_DTYPE=dot,
            PRECISION=precision,
            RESCALE=op == tl.float16,
            BLOCK_M=block_m,
            BLOCK_C=cfg.block_c,
            BLOCK_D=block_d,
            D_GROUP=d_group,
            RESIDENT=d_group >= d,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
