"""Fused Triton kernels for :func:`pml_extras.ops.class_lse.class_logsumexp`: tile
configuration and launchers (this module), the kernels in their own modules.

Same contract as ``_forward_torch`` / ``_backward_torch`` in ``class_lse_autograd.py`` (the
``class_lse`` docstring defines the transforms): ``lse`` (B,) is the logsumexp over the
non-target columns of z_ij = g(c_ij), c_ij = clamp(<x_i, w_j> / (||x_i|| ||w_j||), -1, 1)
(the clamp bounds the value only; no gradient mask anywhere), and ``cos_y`` (B,) the
target cosine. No B x C tensor and no normalised copy of W is ever built; every logit
tile lives in registers only.

Modules
-------
:mod:`.class_lse_triton_tiles`  ``inv_norm_kernel`` (1 / ||w_j|| of every class, a
    C-sized float32 vector), the transforms g and g', and the K-loop logits.

:mod:`.class_lse_triton_fwd`    ``fwd_kernel``, grid (row blocks, class splits, D groups):
    per BLOCK_M-row block and BLOCK_C-class tile, logits by ``tl.dot`` (float32
    accumulation), both normalisations on the float32 result, clamp, transform, target
    and padding columns -inf, online max / sum-exp; per-(split, row) partials combined
    across splits here. With ``NEED_U`` (x needs a gradient) it also accumulates, with
    the same online rescaling, u_i = sum_j softmax_ij g'(c_ij) w_hat_j = d lse_i / d x_hat_i,
    so the backward's grad x is ``grad_lse[:, None] * u`` (fwd+bwd: 4 matmuls, x W and
    P W^T forward, x W and x^T G backward, against the floor's 3; without the saved u,
    ``state=None`` in :func:`backward`, 5). Loading: when all of D fits one group the x
    block is loaded once per program and each W tile once (``RESIDENT``); otherwise the
    logits are a K-loop over D that reloads x per class tile and u's dot loads the W
    tile again (D split over programs, or ``BlockConfig(fwd_resident=False)``).

:mod:`.class_lse_triton_bwd`    ``bwd_w_kernel``, grid (class tiles, D groups): each
    program holds its W tile (loaded once when all of D fits one group) and walks all
    row blocks ``bwd_block_m`` rows at a time, each x block loaded once for both dots:
    recompute the logits, G = exp(z - lse) g'(c) grad_lse (target column masked),
    accumulate x^T G (D_GROUP x BLOCK_C float32; for bf16 operands its transpose, with
    ``bwd_block_c`` classes) and the radial term r_j = sum_i G_ij raw_ij, then write
    grad_w_j = (grad_w_hat_j - w_hat_j r_j) / ||w_j|| once (bf16: on the tensor cores):
    no atomics, no second pass.

D handling: the second-stage accumulators (u: BLOCK_M x D, x^T G: D x BLOCK_C) hold all
of D when the padded D is at most ``d_group`` (512; 256 for float32 operands). Larger D
is split into ``d_group`` slices over a grid axis; each slice program recomputes the
logits over all of D with the K-loop (one extra logits matmul per additional slice).

The target column's own gradient (grad_cos) is added in PyTorch afterwards, exactly as in
``_backward_torch`` (``class_common.add_target_grad``; on CUDA without atomics, so in the
same order on every run).

Precision: accumulation is float32. The matmul operands follow the operand policy
(:func:`pml_extras.ops.precision.operand_dtype`: autocast's dtype, else bf16/fp16
embeddings' dtype, else float32), W rounded to it tile by tile; for 16-bit operands the
second-stage operands (the softmax weights P and G) are rounded to that dtype too, as
flash attention does. Float32 inputs use IEEE float32 dots unless torch's float32 matmul
precision says TF32 (``precision.tf32_enabled``), mirroring what PyTorch's own matmuls
would do, so the torch path is a like-for-like oracle. Float64 is not supported
(``impl="auto"`` never picks Triton for it).

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
from .class_lse_triton_bwd import bwd_w_kernel as _bwd_w_kernel
from .class_lse_triton_fwd import fwd_kernel as _fwd_kernel
from .class_lse_triton_tiles import KIND_IDS as _KIND_IDS
from .class_lse_triton_tiles import inv_norm_kernel as _inv_norm_kernel

assert set(_KIND_IDS) == set(KINDS)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes. All must be powers of two; on a GPU ``tl.dot`` also needs >= 16.

    The defaults were chosen by compiling for sm_90 (D = 512, bf16) and reading ptxas's
    register / spill counts: 64 x 32 forward tiles and 64 x 64 bf16 backward steps with
    all of D per program fit in 255 registers without spills to speak of; larger tiles or
    16 warps spill (float32 operands spill unless D is split at 256). They are not timed.
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
    # Rows per step of the backward; None: block_m (64). With all of D in one group the
    # backward holds its W tile and a whole (rows x D) x block: at 64 rows both of its
    # dots run on wgmma and nothing spills (the softmax in its own branch, see
    # class_lse_triton_bwd); at 32 the logits dot ran on mma.sync.
    bwd_block_m: Optional[int] = None
    # Classes per backward tile for bfloat16 operands; None: twice block_c (64). The
    # bf16 backward accumulates (x^T G)^T, BLOCK_C rows: under 64 its x^T G dot runs on
    # mma.sync. At 64 x 64 x 512: 254 registers (255 with fp32 W), no spills, all dots on
    # wgmma. float32 and float16 operands use block_c (see class_lse_triton_bwd).
    bwd_block_c: Optional[int] = None
    # The forward with u loads its x block once per program and each W tile once for
    # both dots when all of D fits one group (the no-grad forward always does): 243
    # registers, no spills (bf16, D = 512; 88 B with fp32 W). False: the K-loop logits
    # that reload x per class tile and a second load of the W tile for u (cost_model v2).
    fwd_resident: bool = True


_configs = ConfigSlot(BlockConfig())
block_config = _configs.override  # e.g. ``with block_config(block_c=16): ...`` (tests)


INTERPRETED = is_interpreted(_fwd_kernel)
# Concurrent programs per SM: at the default tiles (255 registers per thread, 8 warps)
# one block fits per SM, so a wave is sm_count programs.
BLOCKS_PER_SM = 1


# --------------------------------------------------------------------------- launchers


def _check_config(cfg: BlockConfig) -> None:
    names = [f.name for f in dataclasses.fields(cfg) if f.name.startswith(("block_", "d_group"))]
    check_tile_sizes(cfg, names, True, INTERPRETED)
    check_tile_sizes(cfg, ["norm_block_c", "norm_block_d"], False, INTERPRETED)
    for name in ("bwd_block_m", "bwd_block_c"):
        if getattr(cfg, name) is not None:
            check_tile_sizes(cfg, [name], True, INTERPRETED)


def _bwd_block_m(cfg: BlockConfig) -> int:
    return cfg.block_m if cfg.bwd_block_m is None else cfg.bwd_block_m


def _bwd_block_c(cfg: BlockConfig, op) -> int:
    """Classes per backward tile for Triton operand dtype ``op``."""
    if op != tl.bfloat16:
        return cfg.block_c
    return 2 * cfg.block_c if cfg.bwd_block_c is None else cfg.bwd_block_c


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
    # Resident x block and W tiles when all of D fits one group (see BlockConfig).
    resident = n_groups == 1 and (cfg.fwd_resident or not need_u)
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
            RESIDENT=resident,
            # float16 keeps 1/||w|| on the W side (see class_lse_triton_fwd).
            P_SIDE=resident and need_u and op != tl.float16,
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
    block_m, block_c = _bwd_block_m(cfg), _bwd_block_c(cfg, op)
    grid = (triton.cdiv(num_classes, block_c), n_groups)
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
            BLOCK_C=block_c,
            BLOCK_D=block_d,
            D_GROUP=d_group,
            RESIDENT=d_group >= d,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
