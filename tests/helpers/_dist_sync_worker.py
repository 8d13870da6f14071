"""Ranks of ``test_distributed_sync.py``: batches that differ in kind between ranks.

Run like ``_dist_worker.py`` (same command line and environment). Each scenario records
the collectives every rank issues (name, shape, dtype, in order) besides its loss and
gradients, so the parent can check that all ranks took part in the same collectives in
the same order, and compare the gradients with a single-process float64 computation.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as base  # noqa: E402

F64 = torch.float64
DIM = 6

# Rank 0's labels are unique in the global batch; the others have positives (also across
# ranks), so rank 0 has no pairs or triplets of its own.
LABELS = {
    2: [[0, 1, 2, 3], [10, 10, 11, 11]],
    3: [[0, 1, 2], [10, 10, 11, 11], [11, 12]],
}
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "barrier")


@contextlib.contextmanager
def record_collectives():
    """Log every torch.distributed collective issued inside (name, shape, dtype)."""
    log, saved = [], {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name, fn):
        def call(*args, **kwargs):
            tensor = args[1] if name in ("all_gather", "all_gather_into_tensor") else None
            tensor = args[0] if name in ("all_reduce", "broadcast") else tensor
            shape = None if tensor is None else (tuple(tensor.shape), str(tensor.dtype))
            log.append((name, shape))
            return fn(*args, **kwargs)

        return call

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def labels_for(world, empty_rank=None):
    per_rank = [list(v) for v in LABELS[world]]
    if empty_rank is not None:
        per_rank[empty_rank] = []
    return [len(v) for v in per_rank], torch.tensor(sum(per_rank, []), dtype=torch.int64)


def global_x(total, seed=0):
    return torch.randn(total, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)


def run_step(rank, sizes, labels, call, nograd_rank=None, params=(), seed=0):
    """One forward + backward on this rank's rows; backward is called on every rank."""
    x = global_x(sum(sizes), seed)[base.rows(sizes, rank)].clone()
    y = labels[base.rows(sizes, rank)]
    if rank != nograd_rank:
        x.requires_grad_(True)
    with record_collectives() as log:
        loss = call(x, y)
        loss.backward()
    out = {
        "loss": loss.detach(),
        "x_grad": None if x.grad is None else x.grad.clone(),
        "p_grad": {k: None if p.grad is None else p.grad.clone() for k, p in params},
        "calls": log,
        "sizes": sizes,
    }
    # Still in step afterwards: every rank gathers the same token.
    token = torch.tensor([len(log)], dtype=torch.int64)
    seen = [torch.zeros_like(token) for _ in range(dist.get_world_size())]
    dist.all_gather(seen, token)
    out["call_counts"] = [int(t) for t in seen]
    return out


def triplet_loss():
    from pytorch_metric_learning.losses import TripletMarginLoss

    return TripletMarginLoss(margin=0.2)


def fixed_triplets(rank, sizes):
    """Rank 0 mined nothing; the other ranks mined (local anchor, global p, global n)."""
    if rank == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty, empty
    start = sum(sizes[:rank])
    a = torch.tensor([0, 1])
    return a, (start + 1 - a), torch.tensor([0, 1])  # positive: the other local sample


def suite_sync_wrapper(rank, world, *_):
    from pml_extras.distributed import DistributedLossWrapper
    from pml_extras.losses import StandaloneCenterLoss

    res = {}
    sizes, labels = labels_for(world)
    e_sizes, e_labels = labels_for(world, empty_rank=0)

    def wrapped(efficient, **kw):
        wrapper = DistributedLossWrapper(triplet_loss(), efficient=efficient)
        return lambda x, y: wrapper(x, y, **kw)

    res["eff_no_pos"] = run_step(rank, sizes, labels, wrapped(True))
    res["eff_empty"] = run_step(rank, e_sizes, e_labels, wrapped(True))
    res["eff_nograd"] = run_step(rank, sizes, labels, wrapped(True), nograd_rank=0)
    res["eff_mined_nothing"] = run_step(
        rank, sizes, labels, wrapped(True, indices_tuple=fixed_triplets(rank, sizes))
    )
    res["plain_empty"] = run_step(rank, e_sizes, e_labels, wrapped(False))
    res["plain_nograd"] = run_step(rank, sizes, labels, wrapped(False), nograd_rank=world - 1)

    # Separate references (two gathers with gradient): still one order of collectives.
    ref = global_x(sum(sizes), seed=1)[base.rows(sizes, rank)].clone().requires_grad_(True)
    wrapper = DistributedLossWrapper(triplet_loss(), efficient=True)
    res["eff_ref"] = run_step(
        rank, sizes, labels, lambda x, y: wrapper(x, y, ref_emb=ref, ref_labels=y)
    )
    res["eff_ref"]["ref_grad"] = ref.grad.clone()

    # A loss with parameters whose gradients are averaged after backward.
    torch.manual_seed(7)  # the same centers on every rank
    loss = StandaloneCenterLoss(13, DIM).double()
    wrapper = DistributedLossWrapper(loss, efficient=True)
    res["eff_params_empty"] = run_step(
        rank, e_sizes, e_labels, wrapper, params=list(loss.named_parameters())
    )
    return res


def suite_sync_sharded(rank, world, *_):
    from pml_extras.distributed import ShardedSparseCircleLoss

    res = {}
    sizes, labels = labels_for(world)
    w = global_x(13, seed=3).t().contiguous()

    def sharded():
        loss = ShardedSparseCircleLoss(13, DIM, gamma=16.0).double()
        loss.load_full_weight(w)
        return loss

    loss = sharded()
    res["nograd"] = run_step(rank, sizes, labels, loss, nograd_rank=0, params=[("W", loss.W)])
    loss = sharded()
    no_tuples = fixed_triplets(rank, sizes) if rank == 0 else base.local_triplets(sizes[rank])
    res["mined_nothing"] = run_step(
        rank, sizes, labels, lambda x, y: loss(x, y, no_tuples), params=[("W", loss.W)]
    )
    res["mined_nothing"]["indices"] = no_tuples
    return res


def state_run(rank, world, sync_every, perturb):
    """3 SGD+momentum steps of a wrapped CurricularFaceLoss (W param, t buffer); with
    ``perturb``, the last rank's W and t are changed between steps 1 and 2."""
    from pml_extras.distributed import DistributedLossWrapper
    from pml_extras.losses import CurricularFaceLoss

    sizes, labels = labels_for(world)
    torch.manual_seed(5)
    loss = CurricularFaceLoss(13, DIM, margin=0.5, scale=16.0, momentum=0.3).double()
    wrapper = DistributedLossWrapper(loss, sync_every=sync_every)
    opt = torch.optim.SGD(loss.parameters(), lr=0.5, momentum=0.9)
    out = {"state": [], "momentum": []}
    for step in range(3):
        if perturb and step == 1 and rank == world - 1:
            with torch.no_grad():
                loss.W.add_(0.1)
                loss.t.add_(0.05)
        x = global_x(sum(sizes), seed=10 + step)[base.rows(sizes, rank)].requires_grad_(True)
        opt.zero_grad()
        wrapper(x, labels[base.rows(sizes, rank)]).backward()
        opt.step()
        out["state"].append({k: v.detach().clone() for k, v in loss.state_dict().items()})
        out["momentum"].append(opt.state[loss.W]["momentum_buffer"].clone())
    return out


def suite_sync_state(rank, world, *_):
    return {
        f"every{k}_{'perturbed' if p else 'clean'}": state_run(rank, world, k, p)
        for k in (1, 0)
        for p in (False, True)
    }


SYNC_METHODS = ("item", "tolist", "__bool__", "nonzero", "__int__", "__float__", "unique")


@contextlib.contextmanager
def count_host_syncs():
    """Record every call of a Tensor method that waits for the device, with its call site
    (the innermost frame in pml_extras). Implicit syncs inside C++ ops (boolean-mask
    indexing, torch.unique) are not seen, so the code under test avoids those."""
    import traceback

    log, saved = [], {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    saved_fn = {name: getattr(torch, name) for name in ("nonzero", "unique")}

    def site():
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "pml_extras" in frame.filename:
                return f"{frame.filename.split('pml_extras')[-1]}:{frame.name}"
        return "outside pml_extras"

    def wrap(name, fn):
        def call(*args, **kwargs):
            log.append((name, site()))
            return fn(*args, **kwargs)

        return call

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    for name, fn in saved_fn.items():
        setattr(torch, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in saved_fn.items():
            setattr(torch, name, fn)


def suite_host_syncs(rank, world, *_):
    from pml_extras.distributed import (
        DistributedLossWrapper,
        ShardedCurricularFaceLoss,
        ShardedSparseCircleLoss,
    )
    from pml_extras.losses import CenterLoss

    sizes, labels = labels_for(world)
    y = labels[base.rows(sizes, rank)]
    cases = {
        "circle": ShardedSparseCircleLoss(13, DIM, gamma=16.0),
        "circle_sampled": ShardedSparseCircleLoss(13, DIM, gamma=16.0, sample_rate=0.5),
        "curricular_sampled": ShardedCurricularFaceLoss(13, DIM, scale=16.0, sample_rate=0.5),
        "wrapper_center": DistributedLossWrapper(CenterLoss(13, DIM)),
    }
    out = {}
    for name, loss_fn in cases.items():
        for step in range(2):  # the second step is counted (the first syncs state)
            x = global_x(sum(sizes), seed=step)[base.rows(sizes, rank)].float()
            x.requires_grad_(True)
            with count_host_syncs() as log:
                loss_fn(x, y).backward()
        out[name] = log
    return out


from _dist_amp_worker import suite_amp  # noqa: E402

base.SUITES.update(
    sync_wrapper=suite_sync_wrapper,
    sync_sharded=suite_sync_sharded,
    amp=suite_amp,
    sync_state=suite_sync_state,
    host_syncs=suite_host_syncs,
)

if __name__ == "__main__":
    base.main()
