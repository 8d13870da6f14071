"""Ranks of ``test_distributed_wrapper.py``: misuse, ``autograd.grad``, traffic, host syncs.

Run like ``_dist_worker.py`` (same command line and environment). Scenarios:

* ``misuse``: one rank calls a loss differently from the others (labels, ref_emb,
  ref_labels or indices_tuple given on one rank only, another dtype or embedding size,
  ``efficient``, train/eval or ``impl`` differing). Every rank must raise, and the group
  must still be in step afterwards; each case records its error text and its duration.
* ``grad_only``: ``torch.autograd.grad(loss, x)`` through the wrapper must leave the loss
  parameters' ``.grad`` (None) and the wrapper alone; a real backward then averages.
* ``traffic``: bytes per training step moved for the loss's state by the wrapper, and by
  DDP for a module holding the same parameters and buffers.
* ``state``: ``check_every`` catches drift; ``sync_every`` still works, with a warning.
* ``wrapper_syncs``: host syncs of the efficient wrappers, counted at the dispatcher.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as base  # noqa: E402  (imports pml_extras before init, via _dist_common)
from _dist_sync_worker import DIM, global_x, labels_for  # noqa: E402

from pml_extras.distributed import (  # noqa: E402
    DistributedLossWrapper,
    DistributedMinerWrapper,
    ShardedSparseCircleLoss,
)
from pml_extras.losses import CenterLoss, CurricularFaceLoss, SparseCircleLoss  # noqa: E402

F64 = torch.float64


def _in_step():
    """An all-gather of a token: True if every rank is at the same point."""
    token = torch.tensor([7], dtype=torch.int64)
    seen = [torch.zeros_like(token) for _ in range(dist.get_world_size())]
    dist.all_gather(seen, token)
    return all(int(t) == 7 for t in seen)


def _outcome(call):
    start = time.monotonic()
    try:
        value = call()
        text = f"no error: {float(value.detach().sum()) if torch.is_tensor(value) else value}"
    except Exception as exc:  # the test checks the type
        text = f"{type(exc).__name__}: {exc}"
    return {"error": text, "seconds": time.monotonic() - start, "in_step": _in_step()}


def suite_misuse(rank, world, *_):
    from pytorch_metric_learning.losses import TripletMarginLoss

    sizes, labels = labels_for(world)
    x = global_x(sum(sizes))[base.rows(sizes, rank)].clone().requires_grad_(True)
    y = labels[base.rows(sizes, rank)]
    odd = rank == world - 1  # the rank that calls differently
    triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
    circle = SparseCircleLoss(13, DIM, gamma=16.0).double()

    def wrap(loss=None, **kw):
        return DistributedLossWrapper(loss or TripletMarginLoss(margin=0.2), **kw)

    plain, eff = wrap(), wrap(efficient=True)
    cases = {
        "labels_one_rank": lambda: plain(x, None if odd else y),
        "ref_emb_one_rank": lambda: eff(x, y, ref_emb=x if odd else None),
        "ref_labels_one_rank": lambda: eff(x, y, ref_emb=x, ref_labels=y if odd else None),
        "indices_one_rank": lambda: eff(x, y, triplets if odd else None),
        "dtype": lambda: plain(x.float() if odd else x, y),
        "embedding_size": lambda: plain(torch.cat([x, x[:, :1]], 1) if odd else x, y),
        "efficient": lambda: (eff if odd else plain)(x, y),
        "train_eval": lambda: wrap(circle).train(not odd)(x, y),
        "impl": lambda: wrap(SparseCircleLoss(13, DIM, impl="torch" if odd else "auto"))(
            x.float(), y
        ),
        "miner_ref_one_rank": lambda: DistributedMinerWrapper(_miner())(
            x, y, x if odd else None, y if odd else None
        ),
    }
    sharded = ShardedSparseCircleLoss(13, DIM, gamma=16.0).double()
    sharded_torch = ShardedSparseCircleLoss(13, DIM, impl="torch" if odd else "auto").double()
    cases.update(
        sharded_labels_one_rank=lambda: sharded(x, None if odd else y),
        sharded_indices_one_rank=lambda: sharded(x, y, triplets if odd else None),
        sharded_dtype=lambda: sharded(x.float() if odd else x, y),
        sharded_impl=lambda: sharded_torch(x, y),
    )
    out = {}
    for name, call in cases.items():
        print("case", name, flush=True)  # in the rank's log, should one abort
        out[name] = _outcome(call)
    out["after"] = _outcome(lambda: plain(x, y))  # still usable
    return out


def _miner():
    from pytorch_metric_learning.miners import TripletMarginMiner

    return TripletMarginMiner(margin=0.5, type_of_triplets="all")


def suite_grad_only(rank, world, *_):
    """autograd.grad(loss, x) must not touch the loss parameters' .grad nor issue the
    parameter all-reduce; loss.backward() then averages as usual."""
    from _dist_sync_worker import record_collectives

    sizes, labels = labels_for(world)
    y = labels[base.rows(sizes, rank)]
    torch.manual_seed(3 + rank)  # different replicas: the first forward syncs them
    loss = CurricularFaceLoss(13, DIM, scale=16.0, momentum=0.3).double()
    wrapper = DistributedLossWrapper(loss)
    x = global_x(sum(sizes))[base.rows(sizes, rank)].clone().requires_grad_(True)
    out = {}
    with record_collectives() as log:
        value = wrapper(x, y)
        (gx,) = torch.autograd.grad(value, x, retain_graph=True)
    out["grad_calls"] = log
    out["w_grad_after_grad"] = loss.W.grad
    out["gx"] = gx
    with record_collectives() as log:
        value.backward(inputs=[x])  # backward, but not into the loss's parameters
    out["inputs_calls"] = log
    out["w_grad_after_inputs"] = loss.W.grad
    with record_collectives() as log:
        wrapper(x, y).backward()
    out["backward_calls"] = log
    out["w_grad"] = None if loss.W.grad is None else loss.W.grad.clone()
    out["w"] = loss.W.detach().clone()
    return out


COUNTED = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor")


@contextlib.contextmanager
def count_bytes():
    """Bytes each rank sends into every torch.distributed collective issued in Python,
    DDP's buffer broadcast (``dist._broadcast_coalesced``) included; DDP's gradient
    all-reduce runs in C++ and is counted by a comm hook (see ``ddp_counting_hook``)."""
    log, saved = {}, {name: getattr(dist, name) for name in (*COUNTED, "_broadcast_coalesced")}

    def size(t):
        return t.numel() * t.element_size()

    def wrap(name, fn):
        def call(*args, **kwargs):
            if name == "_broadcast_coalesced":
                n = sum(size(t) for t in args[1])
            elif name in ("all_gather", "all_gather_into_tensor"):
                n = size(args[1])
            else:
                n = size(args[0])
            log[name] = log.get(name, 0) + n
            return fn(*args, **kwargs)

        return call

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def ddp_counting_hook(state, bucket):
    state["ddp_grad_all_reduce"] = state.get("ddp_grad_all_reduce", 0) + (
        bucket.buffer().numel() * bucket.buffer().element_size()
    )
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    return allreduce_hook(None, bucket)


def suite_traffic(rank, world, *_):
    """Per training step (steps 2 and 3; step 1 holds the one-off initial broadcast), for a
    CurricularFaceLoss (W: 64 x 500 float32 = 128000 bytes, t: 4 bytes) and a paper-rule
    CenterLoss (centers: a 500 x 64 buffer, no parameter)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    classes, dim, batch = 500, 64, 4
    g = torch.Generator().manual_seed(rank)
    out = {}
    makers = {
        "curricular": lambda: CurricularFaceLoss(classes, dim),
        "center_paper": lambda: CenterLoss(classes, dim, update_rule="paper"),
        "curricular_sync_every1": lambda: CurricularFaceLoss(classes, dim),  # the old cadence
    }
    for name, make in makers.items():
        torch.manual_seed(0)
        loss = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            wrapper = DistributedLossWrapper(loss, sync_every=1 if "every1" in name else None)
        opt = torch.optim.SGD(loss.parameters(), lr=0.1) if list(loss.parameters()) else None
        steps = []
        for _ in range(3):
            x = torch.randn(batch, dim, generator=g, requires_grad=True)
            y = torch.randint(0, classes, (batch,), generator=g)
            with count_bytes() as log:
                wrapper(x, y).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad()
            steps.append(log)
        out[f"wrapper_{name}"] = steps
        if name != "curricular":  # DDP refuses a module without parameters
            continue
        # DDP over a module holding the same parameters and buffers, on the local batch.
        torch.manual_seed(0)
        ddp = DDP(make())
        state = {}
        ddp.register_comm_hook(state, ddp_counting_hook)
        steps = []
        for _ in range(3):
            x = torch.randn(batch, dim, generator=g, requires_grad=True)
            y = torch.randint(0, classes, (batch,), generator=g)
            state.clear()
            with count_bytes() as log:
                ddp(x, y).backward()
            log.update(state)
            steps.append(log)
        out[f"ddp_{name}"] = steps
        del ddp  # it holds the process group (see _dist_common)
    out["param_bytes"] = 4 * classes * dim
    return out


def suite_state(rank, world, *_):
    sizes, labels = labels_for(world)
    y = labels[base.rows(sizes, rank)]
    out = {}

    def steps(wrapper, n, perturb_at=None):
        got = []
        for step in range(n):
            if step == perturb_at and rank == world - 1:
                with torch.no_grad():
                    wrapper.loss.W.add_(1e-3)
            x = global_x(sum(sizes), seed=step)[base.rows(sizes, rank)].requires_grad_(True)
            got.append(_outcome(lambda x=x: wrapper(x, y).backward()))
        return got

    def curricular():
        torch.manual_seed(9)
        return CurricularFaceLoss(13, DIM, scale=16.0).double()

    out["check_clean"] = steps(DistributedLossWrapper(curricular(), check_every=1), 3)
    out["check_drift"] = steps(DistributedLossWrapper(curricular(), check_every=2), 4, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DistributedLossWrapper(curricular())
        out["default_warnings"] = [str(w.message) for w in caught]
        wrapper = DistributedLossWrapper(curricular(), sync_every=1)
        out["sync_every_warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    # sync_every=1 still restores W changed on one rank (the old cadence).
    steps(wrapper, 3, perturb_at=1)
    w = wrapper.loss.W.detach().clone()
    ws = [torch.zeros_like(w) for _ in range(world)]
    dist.all_gather(ws, w)
    out["sync_every_equal"] = all(torch.equal(v, ws[0]) for v in ws)
    return out


SYNC_OPS = {
    "aten::nonzero",
    "aten::_local_scalar_dense",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::nonzero_static",
}


@contextlib.contextmanager
def count_dispatch_syncs():
    """Host syncs seen at the dispatcher, so that calls from C++ count too: ``nonzero``
    and ``_local_scalar_dense`` (item, int, bool...), ``masked_select``, ``unique``, and an
    ``index``/``index_put`` with a boolean index (it runs ``nonzero`` inside); plus
    ``Tensor.tolist`` (CPU tolist reads memory without dispatching). Each with its call
    site: the innermost frame in pml_extras, or "inside PML" (the wrapped loss's own)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    log = []

    def site():
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "pytorch_metric_learning" in frame.filename:
                return "inside PML"  # the wrapped loss's or miner's own
            if "pml_extras" in frame.filename:
                return f"{frame.filename.split('pml_extras')[-1]}:{frame.name}"
        return "outside pml_extras"

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            boolean_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                torch.is_tensor(i) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])
                if i is not None
            )
            if name in SYNC_OPS or boolean_index:
                log.append((name, site()))
            return func(*args, **(kwargs or {}))

    saved = torch.Tensor.tolist

    def tolist(self):
        log.append(("tolist", site()))
        return saved(self)

    torch.Tensor.tolist = tolist
    try:
        with Mode():
            yield log
    finally:
        torch.Tensor.tolist = saved


def suite_wrapper_syncs(rank, world, *_):
    """One forward + backward of the efficient wrappers; the syncs issued from
    pml_extras/distributed (the loss's own are PML's)."""
    from pytorch_metric_learning.losses import TripletMarginLoss

    sizes, labels = labels_for(world)
    y = labels[base.rows(sizes, rank)]
    x = global_x(sum(sizes))[base.rows(sizes, rank)].clone().requires_grad_(True)
    ref = global_x(sum(sizes), seed=1)[base.rows(sizes, rank)].clone().requires_grad_(True)
    eff = DistributedLossWrapper(TripletMarginLoss(margin=0.2), efficient=True)
    miner = DistributedMinerWrapper(_miner(), efficient=True)
    out = {}
    for name, call in {
        "loss": lambda: eff(x, y),
        "loss_ref": lambda: eff(x, y, ref_emb=ref, ref_labels=y),
        "miner": lambda: miner(x, y),
        "loss_mined": lambda: eff(x, y, miner(x, y)),
    }.items():
        with count_dispatch_syncs() as log:
            value = call()
            if torch.is_tensor(value):
                value.backward()
        out[name] = [entry for entry in log if entry[1].startswith("/distributed/")]
        out[name + "_all"] = log
    # The dispatch-level count sees what the method patch missed: a boolean-mask index.
    with count_dispatch_syncs() as log:
        torch.arange(4)[torch.arange(4) > 1]
    out["boolean_mask_seen"] = log
    return out


base.SUITES.update(
    misuse=suite_misuse,
    grad_only=suite_grad_only,
    traffic=suite_traffic,
    state=suite_state,
    wrapper_syncs=suite_wrapper_syncs,
)

if __name__ == "__main__":
    base.main()
