"""Gradient-norm clipping over a model whose parameters are partly sharded across ranks.

With a class-sharded loss each rank's W shard holds different gradients, so
``torch.nn.utils.clip_grad_norm_`` on one rank sees the model plus one shard: every rank
measures a different norm and scales by a different factor, and the update is neither the
single-process one nor consistent across ranks. :func:`clip_grad_norm_` reduces the
shards' contribution over the process group and clips everything with the norm of the
whole (model + full W) gradient.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import _comm

TensorOrTensors = Union[Tensor, Iterable[Tensor]]


def _unique(tensors: TensorOrTensors) -> List[Tensor]:
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    seen, out = set(), []
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"clip_grad_norm_ expects tensors, got {type(t).__name__}")
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _by_device_and_dtype(grads: List[Tensor]) -> Dict[Tuple[torch.device, torch.dtype], list]:
    groups: Dict[Tuple[torch.device, torch.dtype], list] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    return groups


def _use_foreach(foreach: Optional[bool], device: torch.device) -> bool:
    return foreach if foreach is not None else device.type in ("cpu", "cuda")


def _wide(device: torch.device) -> torch.dtype:
    # float64 for the reduction; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _partial(grads: List[Tensor], p: float, foreach, device: torch.device) -> Tensor:
    """sum_i ||g_i||_p^p (max_i ||g_i||_inf for p = inf) as a 0-d tensor on ``device``.

    Each tensor's norm is taken in its own dtype when that is float32 or wider and in
    float32 otherwise (an fp16 gradient's norm easily exceeds 65504); the per-tensor norms
    are combined in float64.
    """
    wide = _wide(device)
    norms: List[Tensor] = []
    for (dev, dtype), group in _by_device_and_dtype(grads).items():
        acc = torch.promote_types(dtype, torch.float32)
        if acc == dtype and _use_foreach(foreach, dev):
            found = torch._foreach_norm(group, p)
        else:
            found = [torch.linalg.vector_norm(g, p, dtype=acc) for g in group]
        norms.extend(n.to(device=device, dtype=wide) for n in found)
    if not norms:
        return torch.zeros((), dtype=wide, device=device)
    norms = torch.stack(norms)
    return norms.max() if math.isinf(p) else norms.pow(p).sum()


def _collective_device(group, tensors: List[Tensor]) -> torch.device:
    """Where the norm all-reduce runs: CPU for gloo, else the device of the parameters.

    The shard parameters come first in ``tensors`` and decide even where their gradient is
    None; ``torch.cuda.current_device()`` is only the last resort (it is cuda:0 on every
    rank unless the script called ``torch.cuda.set_device(local_rank)``).
    """
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo":
        return torch.device("cpu")
    if tensors:
        return tensors[0].device
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    sharded: TensorOrTensors = (),
    process_group=None,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model with parameters sharded over ranks.

    Clips the gradients of ``parameters`` and ``sharded`` together, in place, by the norm
    of the *whole* gradient, as if every shard were in one process:

        total = ( sum_{replicated g} ||g||_p^p + sum_{ranks} sum_{shard g} ||g||_p^p )^(1/p)
        g <- g * min(1, max_norm / (total + 1e-6))          (p = inf: max instead of sums)

    * ``parameters``: the replicated ones, whose gradients are the same on every rank (a
      DDP model's parameters after ``backward()``: DDP has already averaged them; a
      :class:`DistributedLossWrapper`'s loss parameters). They are counted once.
    * ``sharded``: the ones that hold a different part of one tensor on every rank (the
      ``W`` of :class:`ShardedSparseCircleLoss` / :class:`ShardedCurricularFaceLoss`, i.e.
      ``loss_fn.parameters()``). Their norms are summed (max for p = inf) over
      ``process_group`` with one small all-reduce. A tensor given in both counts as
      sharded, so the optimizer's whole parameter list can be passed as ``parameters``.

    A collective: call it on every rank of ``process_group`` (default: the world), with the
    same ``norm_type``, also where a rank has no gradients. Every rank returns the same
    total norm and uses the same factor, which is the single-process
    ``clip_grad_norm_([*model params, full W], ...)``. Without ``torch.distributed`` (or
    with one rank) it is that function. The norms are computed in float32 or wider
    (float16/bfloat16 gradients are measured in float32) and combined in float64.

    Args:
        parameters: tensors (or one tensor) with replicated gradients; a gradient of None
            is skipped, as in PyTorch.
        max_norm: the largest allowed total norm (>= 0).
        norm_type: p > 0, or ``float("inf")`` (max-abs, all-reduced with MAX). Default 2.
        sharded: tensors whose gradients differ per rank (see above). Default: none.
        process_group: the group the shards are split over (default: the world).
        error_if_nonfinite: raise a RuntimeError (on every rank) when the total norm is
            NaN or infinite, instead of scaling the gradients by it.
        foreach: use the foreach kernels (default: on CPU and CUDA tensors).

    Returns:
        The total norm (0-d, float32 or the widest gradient dtype if wider), identical on
        every rank.

    Example::

        loss.backward()                      # model = DDP(backbone); loss_fn sharded
        total = pml_extras.distributed.clip_grad_norm_(
            model.parameters(), 5.0, sharded=loss_fn.parameters()
        )
        optimizer.step()
    """
    p = float(norm_type)
    if not p > 0:  # also NaN
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    max_norm = float(max_norm)
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    shards = _unique(sharded)
    shard_ids = {id(t) for t in shards}
    replicated = [t for t in _unique(parameters) if id(t) not in shard_ids]
    rep_grads = [t.grad for t in replicated if t.grad is not None]
    shard_grads = [t.grad for t in shards if t.grad is not None]
    grads = rep_grads + shard_grads
    _, world = _comm.group_info(process_group)
    if world > 1:
        device = _collective_device(process_group, shards + replicated)
    else:
        device = grads[0].device if grads else torch.device("cpu")

    shard_part = _partial(shard_grads, p, foreach, device)
    if world > 1:
        # One all-reduce of (partial, NaN flag): a MAX reduction need not propagate NaN.
        packet = torch.stack([shard_part, torch.isnan(shard_part).to(shard_part.dtype)])
        op = dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM
        dist.all_reduce(packet, op=op, group=process_group)
        shard_part = torch.where(packet[1] > 0, packet.new_tensor(math.nan), packet[0])
    rep_part = _partial(rep_grads, p, foreach, device)
    if math.isinf(p):
        total = torch.maximum(rep_part, shard_part)
    else:
        total = (rep_part + shard_part).pow(1.0 / p)

    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {p} of the gradients (all ranks together) is "
            f"non-finite ({float(total)}), so it cannot be clipped. To scale the gradients "
            "by it anyway, set error_if_nonfinite=False"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (dev, dtype), group in _by_device_and_dtype(grads).items():
        # float32 or wider: a float16 factor can be subnormal and lose digits.
        factor = coef.to(device=dev, dtype=torch.promote_types(dtype, torch.float32))
        if _use_foreach(foreach, dev):
            torch._foreach_mul_(group, factor)
        else:
            for g in group:
                g.mul_(factor)

    out_dtype = torch.float32
    for g in grads:
        out_dtype = torch.promote_types(out_dtype, g.dtype)
    return total.to(device=grads[0].device if grads else device, dtype=out_dtype)
