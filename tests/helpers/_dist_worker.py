"""One rank of the multi-process tests in tests/distributed (gloo, CPU, loopback):
``test_sharded_losses.py``, ``test_distributed_clip.py``, ``test_wrapper_gradients.py``.

Run as ``python tests/helpers/_dist_worker.py SUITE WORLD RANK PORT OUTDIR``. Every scenario of the
suite runs in this one process group and stores plain tensors in a dict; the dict is
saved to OUTDIR/rank{RANK}.pt for the parent test, which recomputes everything in a
single process and compares. The inputs come from :func:`make_case`, which the parent
calls too, so both sides see the same float64 data.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_common  # noqa: E402  (imports pml_extras before any process group exists)

F64 = torch.float64
LR = 0.5


def make_case(seed, sizes, num_classes, dim, label_range=None, steps=1):
    """Global float64 batches (one per step), labels and a full W, from one seed."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = label_range if label_range is not None else (0, num_classes)
    total = sum(sizes)
    xs = [torch.randn(total, dim, generator=g, dtype=F64) for _ in range(steps)]
    ys = [torch.randint(lo, hi, (total,), generator=g) for _ in range(steps)]
    w = torch.randn(dim, num_classes, generator=g, dtype=F64)
    return xs, ys, w


def sampling_case(sizes, num_classes, dim):
    """Three steps whose labels are one class per shard, so most columns are negatives."""
    from pml_extras.distributed import shard_ranges

    xs, ys, w = make_case(5, sizes, num_classes, dim, steps=3)
    label_set = torch.tensor([lo + 1 for lo, _ in shard_ranges(num_classes, len(sizes))])
    return xs, [label_set[y % len(label_set)] for y in ys], w


def rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def local_triplets(n):
    """A fixed local indices_tuple (a, p, n) that mines some samples more than others."""
    a = torch.tensor([0, 0, 1, 2][: max(n - 1, 1)])
    return a, (a + 1) % n, (a + 2) % n


# --------------------------------------------------------------------------- sharded runs
def run_sharded(kind, case, sizes, rank, world, steps, train=True, miner=False, **kw):
    from pml_extras.distributed import ShardedCurricularFaceLoss, ShardedSparseCircleLoss

    xs, ys, w_full = case
    cls = ShardedSparseCircleLoss if kind == "circle" else ShardedCurricularFaceLoss
    loss_fn = cls(w_full.shape[1], w_full.shape[0], **kw).double()
    loss_fn.load_full_weight(w_full)
    loss_fn.train(train)
    out = {"loss": [], "x_grad": [], "w_grad": [], "t": [], "sampled": [], "range": None}
    out["range"] = (loss_fn.class_start, loss_fn.class_end)
    for step in range(steps):
        x = xs[step][rows(sizes, rank)].clone().requires_grad_(True)
        y = ys[step][rows(sizes, rank)]
        indices = local_triplets(len(y)) if miner else None
        loss = loss_fn(x, y, indices)
        loss.backward()
        out["loss"].append(loss.detach())
        out["x_grad"].append(x.grad.clone())
        out["w_grad"].append(loss_fn.W.grad.clone())
        out["t"].append(loss_fn.t.clone() if hasattr(loss_fn, "t") else None)
        out["sampled"].append(loss_fn.last_sampled_classes)
        with torch.no_grad():
            loss_fn.W -= LR * loss_fn.W.grad
        loss_fn.W.grad = None
    out["state_keys"] = sorted(loss_fn.state_dict().keys())
    out["full_w"] = loss_fn.gather_weight()
    return out, loss_fn


def suite_sharded(rank, world, sizes, num_classes, dim):
    res = {}
    case = make_case(1, sizes, num_classes, dim, steps=2)
    from pytorch_metric_learning.regularizers import LpRegularizer

    res["circle"], _ = run_sharded(
        "circle",
        case,
        sizes,
        rank,
        world,
        2,
        m=0.25,
        gamma=64.0,
        weight_regularizer=LpRegularizer(),
        chunk_size=3,
    )
    case = make_case(2, sizes, num_classes, dim, steps=3)
    res["curricular"], loss_fn = run_sharded(
        "curricular", case, sizes, rank, world, 3, margin=0.5, scale=16.0, momentum=0.3
    )
    # eval mode: t must not move, every rank still agrees.
    loss_fn.eval()
    x = case[0][0][rows(sizes, rank)]
    loss_fn(x, case[1][0][rows(sizes, rank)])
    res["curricular"]["t_eval"] = loss_fn.t.clone()
    res["curricular"]["predict"] = loss_fn.predict(x)
    res["curricular"]["predict_top3"] = loss_fn.predict(x, k=3, chunk_size=2, return_scores=True)

    case = make_case(3, sizes, num_classes, dim)
    res["circle_miner"], _ = run_sharded(
        "circle", case, sizes, rank, world, 1, gamma=32.0, miner=True
    )

    # every label in the last rank's shard, then every label in the first rank's shard
    from pml_extras.distributed import shard_ranges

    ranges = shard_ranges(num_classes, world)
    for name, rng in (("last", ranges[-1]), ("first", ranges[0])):
        case = make_case(4, sizes, num_classes, dim, label_range=rng, steps=2)
        res[f"one_shard_{name}_circle"], _ = run_sharded("circle", case, sizes, rank, world, 1)
        res[f"one_shard_{name}_curricular"], _ = run_sharded(
            "curricular", case, sizes, rank, world, 2, scale=16.0, momentum=0.5
        )
    res["clip"] = run_clip(make_case(8, sizes, num_classes, dim), sizes, rank, world)
    return res


CLIP_MAX_NORM = 0.05
CLIP_NORM_TYPES = (2.0, float("inf"), 3.0)


def clip_model(dim):
    """A replicated "backbone" x -> x @ A + b with the same values on every rank.

    A is large, so its gradient is small and the largest gradient entry lies in W (the
    inf-norm test then depends on the shards of the other ranks).
    """
    g = torch.Generator().manual_seed(11)
    a = 10.0 * (torch.eye(dim, dtype=F64) + 0.3 * torch.randn(dim, dim, generator=g, dtype=F64))
    return a, torch.randn(dim, generator=g, dtype=F64)


def run_clip(case, sizes, rank, world):
    """One step of backbone + sharded loss, then the sharded-aware clip_grad_norm_."""
    from pml_extras.distributed import ShardedSparseCircleLoss, clip_grad_norm_

    xs, ys, w_full = case
    loss_fn = ShardedSparseCircleLoss(w_full.shape[1], w_full.shape[0], gamma=32.0).double()
    loss_fn.load_full_weight(w_full)
    a, b = [t.clone().requires_grad_(True) for t in clip_model(w_full.shape[0])]
    unused = torch.zeros(3, dtype=F64, requires_grad=True)  # its grad stays None
    x = xs[0][rows(sizes, rank)]
    loss_fn(x @ a + b, ys[0][rows(sizes, rank)]).backward()
    for t in (a, b):  # what DDP does to the replicated model's gradients
        dist.all_reduce(t.grad)
        t.grad /= world
    params = (a, b, loss_fn.W)
    saved = [t.grad.clone() for t in params]

    def clip(p, **kw):
        for t, g in zip(params, saved):
            t.grad = g.clone()
        return clip_grad_norm_([a, b, unused], CLIP_MAX_NORM, p, sharded=loss_fn.W, **kw)

    out = {"range": (loss_fn.class_start, loss_fn.class_end), "grads": list(saved)}
    for p in CLIP_NORM_TYPES:
        total = clip(p)
        out[p] = {"total": total, "grads": [t.grad.clone() for t in params]}
    # The whole parameter list as `parameters`: W is still counted as a shard.
    for t, g in zip(params, saved):
        t.grad = g.clone()
    out["all_in_parameters"] = clip_grad_norm_(
        [a, b, loss_fn.W], CLIP_MAX_NORM, sharded=loss_fn.parameters()
    )
    # Rank 0 has no shard gradient: it still joins the collective.
    for t, g in zip(params, saved):
        t.grad = g.clone()
    if rank == 0:
        loss_fn.W.grad = None
    out["rank0_no_grad"] = clip_grad_norm_([a, b], CLIP_MAX_NORM, sharded=[loss_fn.W])
    out["empty"] = clip_grad_norm_([], CLIP_MAX_NORM, sharded=[])
    # A NaN in the last rank's shard only: every rank sees a NaN total (also for p = inf,
    # whose MAX reduction alone need not propagate NaN) and raises if asked to.
    saved[2] = saved[2].clone()
    if rank == world - 1:
        saved[2][0, 0] = float("nan")
    out["nan_total"] = [clip(p) for p in (2.0, float("inf"))]
    try:
        clip(float("inf"), error_if_nonfinite=True)
        out["nan_error"] = "no error"
    except RuntimeError as exc:
        out["nan_error"] = f"RuntimeError: {exc}"
    return out


def suite_sampling(rank, world, sizes, num_classes, dim):
    res = {}
    case = sampling_case(sizes, num_classes, dim)
    runs = []
    for seed in (123, 123, 7):
        torch.manual_seed(1000 + rank)  # the global RNG must not matter
        out, _ = run_sharded(
            "circle", case, sizes, rank, world, 3, gamma=32.0, sample_rate=0.4, seed=seed
        )
        runs.append(out)
    res["sampled_a"], res["sampled_b"], res["sampled_other_seed"] = runs
    res["sampled_curricular"], _ = run_sharded(
        "curricular", case, sizes, rank, world, 2, scale=16.0, momentum=0.3, sample_rate=0.4, seed=5
    )
    # Every class is a positive somewhere in the global batch: the sampled path keeps all.
    total = sum(sizes)
    xs, _, w = case
    y_all = torch.arange(total) % num_classes
    res["sampled_all_pos"], _ = run_sharded(
        "circle", ([xs[0]], [y_all], w), sizes, rank, world, 1, gamma=32.0, sample_rate=0.1
    )
    res["unsampled_all_pos"], _ = run_sharded(
        "circle", ([xs[0]], [y_all], w), sizes, rank, world, 1, gamma=32.0
    )
    # In eval mode nothing is sampled.
    res["sampled_eval"], _ = run_sharded(
        "circle", case, sizes, rank, world, 1, train=False, gamma=32.0, sample_rate=0.4
    )
    return res


def suite_errors(rank, world, sizes, num_classes, dim):
    from pml_extras.distributed import ShardedSparseCircleLoss

    res = {}
    loss_fn = ShardedSparseCircleLoss(num_classes, dim).double()
    x = torch.randn(3, dim, dtype=F64)
    y = torch.zeros(3, dtype=torch.int64)
    bad = y.clone()
    if rank == world - 1:
        bad[1] = num_classes + 2
    try:
        loss_fn(x, bad)
        res["label"] = "no error"
    except ValueError as exc:
        res["label"] = f"ValueError: {exc}"
    x_bad = torch.randn(3, dim + 1, dtype=F64) if rank == 0 else x
    try:
        loss_fn(x_bad, y)
        res["dim"] = "no error"
    except ValueError as exc:
        res["dim"] = f"ValueError: {exc}"
    # still usable afterwards: the group is not out of step
    res["after"] = loss_fn(x, y).detach()
    # an empty local batch on the last rank
    case = make_case(6, [s if r < world - 1 else 0 for r, s in enumerate(sizes)], num_classes, dim)
    sizes0 = [s if r < world - 1 else 0 for r, s in enumerate(sizes)]
    res["empty"], _ = run_sharded("circle", case, sizes0, rank, world, 1, gamma=32.0)
    res["empty"]["sizes"] = sizes0
    return res


# --------------------------------------------------------------------------- wrappers
def record_steps(loss, call, xs, ys, steps=1, miner=None, lr=0.0):
    """Per step: ``call(x, y, indices)`` on ``xs[step]``, ``ys[step]`` (indices from ``miner``),
    backward, then record the loss, the grads of x and of ``loss``'s parameters, and the
    state after an SGD step of size ``lr`` on those parameters. The worker's wrapped runs
    and the tests' single-process references both take their steps here."""
    out = {"loss": [], "x_grad": [], "p_grad": [], "state": []}
    for step in range(steps):
        x = xs[step].clone().requires_grad_(True)
        y = ys[step]
        indices = miner(x, y) if miner is not None else None
        value = call(x, y, indices)
        value.backward()
        out["loss"].append(value.detach())
        out["x_grad"].append(x.grad.clone())
        out["p_grad"].append({k: p.grad.clone() for k, p in loss.named_parameters()})
        with torch.no_grad():
            for p in loss.parameters():
                p -= lr * p.grad
                p.grad = None
        out["state"].append({k: v.clone() for k, v in loss.state_dict().items()})
    return out


def wrapped_step(loss, wrapper, xs, ys, sizes, rank, steps=1, miner=None, lr=0.0):
    """``record_steps`` of ``wrapper`` on this rank's rows of each step's batch."""
    mine = rows(sizes, rank)
    xs, ys = [x[mine] for x in xs[:steps]], [y[mine] for y in ys[:steps]]
    return record_steps(loss, wrapper, xs, ys, steps, miner, lr)


def suite_wrappers(rank, world, sizes, num_classes, dim):
    from pytorch_metric_learning.miners import TripletMarginMiner
    from pytorch_metric_learning.utils.distributed import (
        DistributedLossWrapper as PMLWrapper,
    )

    from pml_extras.distributed import DistributedLossWrapper, DistributedMinerWrapper
    from pml_extras.losses import (
        CenterLoss,
        CurricularFaceLoss,
        SparseCircleLoss,
        StandaloneCenterLoss,
    )
    from pml_extras.losses.circle_loss import CircleLoss

    res = {}
    xs, ys, w = make_case(7, sizes, num_classes, dim, steps=2)
    equal = len(set(sizes)) == 1

    def circle():
        loss = SparseCircleLoss(num_classes, dim, gamma=32.0).double()
        with torch.no_grad():
            loss.W.copy_(w)
        return loss

    if equal:  # PML's gather needs equal local batch sizes
        loss = circle()
        res["pml_circle"] = wrapped_step(loss, PMLWrapper(loss), xs, ys, sizes, rank)
        loss = CurricularFaceLoss(num_classes, dim, scale=16.0, momentum=0.3).double()
        with torch.no_grad():
            loss.W.copy_(w)
        res["pml_curricular"] = wrapped_step(loss, PMLWrapper(loss), xs, ys, sizes, rank, 2)

    loss = circle()
    res["ours_circle"] = wrapped_step(
        loss, DistributedLossWrapper(loss), xs, ys, sizes, rank, 2, lr=LR
    )

    torch.manual_seed(100 + rank)  # replicas start different: the wrapper must sync them
    loss = CurricularFaceLoss(num_classes, dim, scale=16.0, momentum=0.3).double()
    res["ours_curricular"] = wrapped_step(
        loss, DistributedLossWrapper(loss), xs, ys, sizes, rank, 2, lr=LR
    )
    torch.manual_seed(200 + rank)
    loss = CenterLoss(num_classes, dim).double()
    res["ours_center_grad"] = wrapped_step(
        loss, DistributedLossWrapper(loss), xs, ys, sizes, rank, 2, lr=LR
    )
    torch.manual_seed(300 + rank)
    loss = CenterLoss(num_classes, dim, update_rule="paper", alpha=0.5).double()
    res["ours_center_paper"] = wrapped_step(
        loss, DistributedLossWrapper(loss), xs, ys, sizes, rank, 2
    )

    loss = CircleLoss(m=0.4, gamma=16.0)
    miner = DistributedMinerWrapper(TripletMarginMiner(margin=0.5, type_of_triplets="all"))
    res["ours_pair_mined"] = wrapped_step(
        loss, DistributedLossWrapper(loss), xs, ys, sizes, rank, 1, miner
    )

    torch.manual_seed(400 + rank)
    loss = StandaloneCenterLoss(num_classes, dim).double()
    wrapper = DistributedLossWrapper(loss, efficient=True)
    res["ours_standalone_efficient"] = wrapped_step(loss, wrapper, xs, ys, sizes, rank, 2, lr=LR)

    torch.manual_seed(500 + rank)
    loss = StandaloneCenterLoss(num_classes, dim).double()
    res["ours_standalone"] = wrapped_step(
        loss, DistributedLossWrapper(loss), xs, ys, sizes, rank, 1
    )
    return res


SUITES = {
    "sharded": suite_sharded,
    "sampling": suite_sampling,
    "errors": suite_errors,
    "wrappers": suite_wrappers,
}


def main():
    names, world, rank, port, outdir = sys.argv[1:6]
    world, rank = int(world), int(rank)
    sizes = [int(s) for s in os.environ["PMLX_SIZES"].split(",")]
    num_classes, dim = int(os.environ["PMLX_CLASSES"]), int(os.environ["PMLX_DIM"])
    torch.set_num_threads(1)
    _dist_common.init(world, rank, int(port), float(os.environ.get("PMLX_TIMEOUT", "30")))
    results = {}
    try:
        for name in names.split(","):
            results[name] = SUITES[name](rank, world, sizes, num_classes, dim)
    except Exception:
        results["error"] = traceback.format_exc()
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        raise
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    _dist_common.shutdown()


if __name__ == "__main__":
    main()
