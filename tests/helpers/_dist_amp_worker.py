"""Rank side of the AMP tests (imported by ``_dist_sync_worker.py``; gloo, CPU, fp16 autocast).

A DDP backbone, a class-sharded loss outside DDP, ``torch.autocast`` and a GradScaler,
``unscale_`` then :func:`pml_extras.distributed.clip_grad_norm_`. At step 2 the last rank's
W-shard gradient gets an inf (as an fp16 overflow in that shard would give). With
:class:`pml_extras.distributed.GlobalGradScaler` (and FSDP's ShardedGradScaler) every rank
must skip that step and keep the same scale; the plain ``torch.amp.GradScaler`` is run
too, to show what it does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Imported here, before the process group exists (see _dist_common).
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

DIM, IN_DIM, CLASSES = 6, 5, 11
STEPS, INF_STEP = 4, 2


def amp_run(rank, world, scaler_kind):
    from pml_extras.distributed import GlobalGradScaler, ShardedSparseCircleLoss, clip_grad_norm_

    torch.manual_seed(0)  # same backbone on every rank
    backbone = torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, 8), torch.nn.ReLU(), torch.nn.Linear(8, DIM)
    )
    model = torch.nn.parallel.DistributedDataParallel(backbone)
    loss_fn = ShardedSparseCircleLoss(CLASSES, DIM, m=0.25, gamma=16.0, init_seed=1)
    opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.1)
    kw = dict(init_scale=2.0**10, growth_interval=1)  # the scale moves at every step
    if scaler_kind == "ours":
        scaler = GlobalGradScaler("cpu", **kw)
    elif scaler_kind == "fsdp":
        scaler = ShardedGradScaler("cpu", **kw)
    else:
        scaler = torch.amp.GradScaler("cpu", **kw)
    g = torch.Generator().manual_seed(100 + rank)
    out = {"scale": [], "skipped": [], "model": [], "norm": [], "found_inf": []}
    for step in range(1, STEPS + 1):
        x = torch.randn(4, IN_DIM, generator=g)
        y = torch.randint(0, CLASSES, (4,), generator=g)
        before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if step == INF_STEP and rank == world - 1:
            loss_fn.W.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        norm = clip_grad_norm_(model.parameters(), 1.0, sharded=loss_fn.parameters())
        found = sum(float(v) for v in scaler._found_inf_per_device(opt).values())
        scaler.step(opt)
        scaler.update()
        out["found_inf"].append(found > 0)
        after = opt.param_groups[0]["params"]
        out["skipped"].append(all(torch.equal(a, b) for a, b in zip(before, after)))
        out["scale"].append(float(scaler.get_scale()))
        out["norm"].append(float(norm))
        out["model"].append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    out["w"] = loss_fn.W.detach().clone()
    dist.barrier()
    return out


def suite_amp(rank, world, *_):
    return {kind: amp_run(rank, world, kind) for kind in ("ours", "fsdp", "torch")}
