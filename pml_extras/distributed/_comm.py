"""Collectives with the autograd semantics the distributed losses rely on.

Every function here is a no-op (or the identity) when ``torch.distributed`` is not
initialised or the group has a single member, so the losses also run in one process.

``gather_rows`` is the only differentiable collective: an all-gather along dim 0 (local
batches may have different sizes) whose backward *sums* the incoming gradient over all
ranks and returns this rank's slice. If every rank ``s`` computes a loss ``L_s`` from the
gathered tensor, rank ``r``'s input therefore receives ``d(sum_s L_s)/d x_r``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def group_info(group=None) -> Tuple[int, int]:
    """(rank, world_size) of this process in ``group``; (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_active(group=None) -> bool:
    return group_info(group)[1] > 1


def global_rank(group, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (what broadcast's ``src`` expects)."""
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def all_gather_ints(values: Sequence[int], device, group=None) -> List[List[int]]:
    """All-gather a short list of ints from every rank (one small collective, one sync)."""
    rank, world = group_info(group)
    if world == 1:
        # No tensor round trip: under torch.compile that would be a needless graph break.
        return [[int(v) for v in values]]
    local = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).tolist()


def _gather_padded(x: Tensor, sizes: Sequence[int], group) -> Tensor:
    """All-gather ``x`` (rows = sizes[rank]) from every rank into one (sum(sizes), ...) tensor."""
    x = x.contiguous()
    peak = max(sizes)
    if all(n == peak for n in sizes):
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)
    padded = x.new_zeros((peak,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = tuple(sizes), rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # Every rank holds the gradient of its own loss w.r.t. the whole gathered tensor;
        # the input of rank r gets the sum over ranks of the rows that came from r.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_rows(x: Tensor, sizes: Sequence[int], group=None) -> Tensor:
    """Differentiable all-gather along dim 0, in rank order; backward sums over ranks."""
    rank, world = group_info(group)
    if world == 1:
        return x
    if x.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} has {x.shape[0]} rows but sizes says {sizes[rank]}")
    return _GatherRows.apply(x, list(sizes), rank, group)


@torch.no_grad()
def gather_rows_nograd(x: Tensor, sizes: Sequence[int], group=None) -> Tensor:
    """All-gather along dim 0, in rank order, without autograd (labels, mining inputs)."""
    if group_info(group)[1] == 1:
        return x
    return _gather_padded(x.detach(), sizes, group)


def gather_stack(x: Tensor, group=None) -> Tensor:
    """(world, *x.shape): every rank's ``x`` (same shape on all ranks), differentiable."""
    _, world = group_info(group)
    return gather_rows(x.unsqueeze(0), [1] * world, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # In place when the incoming gradient is a plain buffer of the engine's (the W shard's
        # gradient is as large as the shard: no second copy of it at the backward's peak).
        if not torch.is_grad_enabled() and grad._base is None and grad.is_contiguous():
            return grad.mul_(ctx.scale), None
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward."""
    if scale == 1.0:
        return x
    return _ScaleGrad.apply(x, float(scale))


@torch.no_grad()
def broadcast_module_state(module: torch.nn.Module, group=None, src_group_rank: int = 0):
    """Copy every parameter and buffer of ``module`` from ``src_group_rank`` to all ranks."""
    if not is_active(group):
        return
    src = global_rank(group, src_group_rank)
    for tensor in list(module.parameters()) + list(module.buffers()):
        data = tensor.data.contiguous()
        dist.broadcast(data, src=src, group=group)
        if data.data_ptr() != tensor.data.data_ptr():
            tensor.data.copy_(data)


def out_of_range_label(labels, num_classes: int) -> Optional[int]:
    """The first offending label value if ``labels`` is a valid 1-D int tensor with one."""
    if not torch.is_tensor(labels) or labels.ndim != 1 or labels.numel() == 0:
        return None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return None
    lo, hi = torch.stack([labels.min(), labels.max()]).tolist()
    if lo < 0:
        return int(lo)
    if hi >= num_classes:
        return int(hi)
    return None


def synced_validation(check, owner: str, labels, num_classes: Optional[int], device, group=None):
    """Run ``check()`` (returns the local batch size) on every rank; fail on all if one fails.

    A rank that raised alone would leave the others blocked in the next collective, so the
    outcome is all-gathered first: the failing rank re-raises its own error and the others
    raise a ValueError naming the rank (and, for an out-of-range label, the label and
    ``num_classes``). Returns the list of every rank's batch size.
    """
    error, code, batch, bad = None, 0, -1, 0
    try:
        batch = int(check())
    except (ValueError, TypeError) as exc:
        error = exc
        label = None if num_classes is None else out_of_range_label(labels, num_classes)
        code, bad = (1, label) if label is not None else (2, 0)
    rows = all_gather_ints([code, batch, bad], device, group)
    if error is not None:
        raise error
    for r, (c, _, b) in enumerate(rows):
        if c == 1:
            raise ValueError(
                f"{owner}: label {b} on rank {r} is out of range for num_classes={num_classes} "
                f"(labels must lie in [0, {num_classes}))"
            )
        if c == 2:
            raise ValueError(f"{owner}: rank {r} got invalid inputs (see the error raised there)")
    return [row[1] for row in rows]


@torch.no_grad()
def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over ranks (a copy; no autograd)."""
    if not is_active(group):
        return x.detach().clone()
    out = x.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
