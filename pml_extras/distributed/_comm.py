"""Collectives with the autograd semantics the distributed losses rely on.

Every function here is a no-op (or the identity) when ``torch.distributed`` is not
initialised or the group has a single member, so the losses also run in one process.

``gather_rows`` is the only differentiable collective: an all-gather along dim 0 (local
batches may have different sizes) whose backward *sums* the incoming gradient over all
ranks and returns this rank's slice. If every rank ``s`` computes a loss ``L_s`` from the
gathered tensor, rank ``r``'s input therefore receives ``d(sum_s L_s)/d x_r``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

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


def all_gather_ints(
    values: Sequence[int], device, group=None, device_values: Optional[Tensor] = None
) -> List[List[int]]:
    """All-gather a short list of ints from every rank (one small collective, one sync).

    ``device_values`` (a 1-D int64 tensor, the same length on every rank) is appended to
    each rank's row without a host round trip of its own, so that values computed on the
    device (a label range) arrive on the host in the same single sync.
    """
    rank, world = group_info(group)
    if world == 1 and device_values is None:
        # No tensor round trip: under torch.compile that would be a needless graph break.
        return [[int(v) for v in values]]
    local = torch.tensor(list(values), dtype=torch.int64, device=device)
    if device_values is not None:
        local = torch.cat([local, device_values.to(device=device, dtype=torch.int64)])
    if world == 1:
        return [local.tolist()]
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


def _needs_token(requires_grad: Optional[bool], xs: Sequence[Tensor]) -> bool:
    return bool(requires_grad) and torch.is_grad_enabled() and not any(x.requires_grad for x in xs)


def _grad_token(device) -> Tensor:
    """A leaf that requires grad: it puts a collective in the autograd graph of a rank whose
    own inputs do not require grad, so that rank still joins the backward collective."""
    return torch.zeros((), device=device, requires_grad=True)


class _GatherRows(torch.autograd.Function):
    """All-gather of one or more tensors; one all-reduce in backward whatever their number."""

    @staticmethod
    def forward(ctx, token, sizes_list, rank, group, *xs):
        ctx.sizes_list, ctx.rank, ctx.group = sizes_list, rank, group
        ctx.dtypes = [x.dtype for x in xs]
        return tuple(_gather_padded(x, sizes, group) for x, sizes in zip(xs, sizes_list))

    @staticmethod
    def backward(ctx, *grads):
        # Every rank holds the gradient of its own loss w.r.t. the whole gathered tensors;
        # the input of rank r gets the sum over ranks of the rows that came from r. One
        # flat all-reduce: several would have to run in the same order on every rank,
        # which the autograd engine does not promise for independent branches.
        wide = grads[0].dtype
        for g in grads[1:]:
            wide = torch.promote_types(wide, g.dtype)
        flat = torch.cat([g.reshape(-1).to(wide) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
        out, offset = [], 0
        for g, sizes, dtype, needed in zip(
            grads, ctx.sizes_list, ctx.dtypes, ctx.needs_input_grad[4:]
        ):
            full = flat[offset : offset + g.numel()].view(g.shape)
            offset += g.numel()
            start = sum(sizes[: ctx.rank])
            mine = full[start : start + sizes[ctx.rank]]
            out.append(mine.to(dtype) if needed else None)
        return (None, None, None, None, *out)


def gather_rows_many(
    xs: Sequence[Tensor],
    sizes_list: Sequence[Sequence[int]],
    group=None,
    requires_grad: Optional[bool] = None,
) -> List[Tensor]:
    """Differentiable all-gather along dim 0 of several tensors, in rank order.

    Backward sums over ranks with *one* all-reduce for all of them. ``requires_grad``
    must be the same on every rank (e.g. agreed by :func:`synced_validation`): True puts
    the backward collective in this rank's graph even where its own inputs do not require
    grad (it then returns no gradient for them); None uses the inputs' flags, which is
    safe only if they are the same on every rank.
    """
    rank, world = group_info(group)
    if world == 1:
        return list(xs)
    for x, sizes in zip(xs, sizes_list):
        if x.shape[0] != sizes[rank]:
            raise ValueError(f"rank {rank} has {x.shape[0]} rows but sizes says {sizes[rank]}")
    if requires_grad is False:
        return [gather_rows_nograd(x, sizes, group) for x, sizes in zip(xs, sizes_list)]
    token = _grad_token(xs[0].device) if _needs_token(requires_grad, xs) else None
    sizes_list = tuple(tuple(int(n) for n in sizes) for sizes in sizes_list)
    return list(_GatherRows.apply(token, sizes_list, rank, group, *xs))


def gather_rows(x: Tensor, sizes: Sequence[int], group=None, requires_grad=None) -> Tensor:
    """Differentiable all-gather along dim 0, in rank order; backward sums over ranks.

    See :func:`gather_rows_many` for ``requires_grad``.
    """
    return gather_rows_many([x], [sizes], group, requires_grad)[0]


class _Anchor(torch.autograd.Function):
    """Identity on ``value``; sends a zero gradient to the other inputs."""

    @staticmethod
    def forward(ctx, value, *others):
        ctx.shapes = [(o.shape, o.dtype, o.device) if torch.is_tensor(o) else None for o in others]
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        zeros = [
            None if s is None else torch.zeros((), dtype=s[1], device=s[2]).expand(s[0])
            for s in ctx.shapes
        ]
        return (grad, *zeros)


def anchor(value: Tensor, *tensors: Tensor, force: bool = False) -> Tensor:
    """``value``, made to depend on ``tensors`` in the autograd graph (zero gradient).

    A rank whose loss happens not to use the gathered tensors (no pairs or triplets of its
    own, an empty batch, a reducer returning a detached zero) would otherwise skip the
    all-reduce in their backward while the other ranks run it. With ``force`` (agreed on
    every rank) the result requires grad even where nothing here does, so that
    ``value.backward()`` runs on every rank.
    """
    if not torch.is_grad_enabled():
        return value
    others = [t for t in tensors if torch.is_tensor(t) and t.requires_grad]
    if force and not value.requires_grad and not others:
        others = [_grad_token(value.device)]
    if not others:
        return value
    return _Anchor.apply(value, *others)


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
    broadcast_tensors(list(module.parameters()) + list(module.buffers()), group, src_group_rank)


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[Tensor], group=None, src_group_rank: int = 0):
    """Copy ``tensors`` (in place) from ``src_group_rank`` to all ranks."""
    if not is_active(group):
        return
    src = global_rank(group, src_group_rank)
    for tensor in tensors:
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


_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


def dtype_code(x) -> int:
    """A small int naming ``x.dtype`` (-1 for a non-tensor), for :func:`synced_validation`."""
    if not torch.is_tensor(x):
        return -1
    return _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)


def describe_dtype(code: int) -> str:
    if code < 0:
        return "not a tensor"
    return str(_DTYPES[code]) if code < len(_DTYPES) else "another dtype"


def describe_bool(code: int) -> str:
    return "yes" if code else "no"


def synced_validation(
    check,
    owner: str,
    labels,
    num_classes: Optional[int],
    device,
    group=None,
    needs_grad: bool = False,
    label_range: Optional[Tensor] = None,
    agree: Sequence[Tuple[str, int, Optional[Callable[[int], str]]]] = (),
    num_sizes: int = 1,
):
    """Run ``check()`` (returns the local batch size) on every rank; fail on all if one fails.

    A rank that raised alone would leave the others blocked in the next collective, so the
    outcome is all-gathered first: the failing rank re-raises its own error and the others
    raise a ValueError naming the rank (and, for an out-of-range label, the label and
    ``num_classes``). Returns (every rank's batch size, whether ``needs_grad`` is true on
    some rank): the collective that gathers the outcome also makes the ranks agree on
    whether the gathered embeddings take part in a backward collective.

    ``agree``: (name, value, describe) triples, the same names in the same order on every
    rank, each value an int computed without raising (whether labels were given, a dtype
    code, the embedding size...). Where a value differs between ranks, which would
    desynchronise the collectives that follow (or silently mix two objectives), *every*
    rank raises the same ValueError naming it and each rank's value (``describe(value)``
    if given). It is checked before the errors of ``check()``.

    ``num_sizes`` > 1: ``check()`` returns that many sizes (a tuple), and so does each
    rank's entry of the result.

    ``label_range`` (``lambda: (min, max)`` of the labels as device tensors, called after a
    successful ``check()``) moves the label range check into the same all-gather: one host
    sync per step for sizes, errors, agreement and labels, instead of one more for the
    range.
    """
    error, code, batch, bad = None, 0, [-1] * num_sizes, 0
    lo_hi = None
    try:
        got = check()
        batch = [int(n) for n in got] if num_sizes > 1 else [int(got)]
        if label_range is not None:
            lo_hi = torch.stack(label_range()) if batch[0] > 0 else None
    except (ValueError, TypeError) as exc:
        error = exc
        label = None if num_classes is None else out_of_range_label(labels, num_classes)
        code, bad = (1, label) if label is not None else (2, 0)
    if label_range is not None and lo_hi is None:
        lo_hi = torch.zeros(2, dtype=torch.int64, device=device)
    head = [code, bad, int(bool(needs_grad))]
    values = [int(v) for _, v, _ in agree]
    rows = all_gather_ints(head + batch + values, device, group, device_values=lo_hi)
    rank, _ = group_info(group)
    first = len(head) + num_sizes
    for i, (name, _, describe) in enumerate(agree):
        seen = [row[first + i] for row in rows]
        if any(v != seen[0] for v in seen):
            show = describe or str
            per_rank = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(seen))
            raise ValueError(
                f"{owner}: the ranks disagree on {name} ({per_rank}); every rank must make "
                "the same call"
            )
    if error is not None:
        raise error
    end = first + len(agree)
    if label_range is not None:  # codes of out-of-range labels, found on the host now
        for row in rows:
            lo, hi = row[end : end + 2]
            if row[0] == 0 and row[3] > 0 and (lo < 0 or hi >= num_classes):
                row[0], row[1] = 1, lo if lo < 0 else hi
        if rows[rank][0] == 1:
            raise ValueError(
                f"{owner}: label {rows[rank][1]} is out of range for num_classes={num_classes} "
                f"(labels must lie in [0, {num_classes}))"
            )
    for r, row in enumerate(rows):
        c, b = row[0], row[1]
        if c == 1:
            raise ValueError(
                f"{owner}: label {b} on rank {r} is out of range for num_classes={num_classes} "
                f"(labels must lie in [0, {num_classes}))"
            )
        if c == 2:
            raise ValueError(f"{owner}: rank {r} got invalid inputs (see the error raised there)")
    sizes = [row[3] if num_sizes == 1 else tuple(row[3:first]) for row in rows]
    return sizes, any(row[2] for row in rows)


@torch.no_grad()
def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over ranks (a copy; no autograd)."""
    if not is_active(group):
        return x.detach().clone()
    out = x.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
