"""DistributedLossWrapper: the losses and gradients of wrapped PML-style losses on 2 and 3 gloo
ranks, against one process on the concatenated batch in float64 (the workers and the
``run`` fixture: tests/helpers/_dist_harness.py, tests/distributed/conftest.py)."""

from __future__ import annotations

import _dist_worker as worker  # noqa: E402
import pytest
import torch
from _dist_harness import (  # noqa: E402
    DIM,
    close,
)
from pytorch_metric_learning.miners import TripletMarginMiner

from pml_extras.functional.center import center_update
from pml_extras.losses import (
    CenterLoss,
    CurricularFaceLoss,
    SparseCircleLoss,
    StandaloneCenterLoss,
)
from pml_extras.losses.circle_loss import CircleLoss


# ----------------------------------------------------------------------------- wrappers
def concat_reference(loss, xs, ys, steps, lr=0.0, miner=None):
    """One process, the concatenated batch, the loss called directly."""
    return worker.record_steps(loss, loss, xs, ys, steps, miner, lr)


def _wrapper_case(run):
    return worker.make_case(7, run["sizes"], run["num_classes"], DIM, steps=2)


def check_wrapped(run, name, ref, steps, loss_scale=1.0, grad_scale=1.0):
    sizes, world = run["sizes"], run["world"]
    results = [r["wrappers"][name] for r in run["results"]]
    for step in range(steps):
        for r, got in enumerate(results):
            close(got["loss"][step], loss_scale * ref["loss"][step])
            close(got["x_grad"][step], world * ref["x_grad"][step][worker.rows(sizes, r)])
            for k, g in ref["p_grad"][step].items():
                close(got["p_grad"][step][k], grad_scale * g)
            for k, v in ref["state"][step].items():
                close(got["state"][step][k], v)
                assert torch.equal(got["state"][step][k], results[0]["state"][step][k])


def test_pml_wrapper_gives_loss_parameters_world_size_times_the_gradient(run):
    """What PML 2.9's DistributedLossWrapper does (the reason for our wrapper)."""
    if run["world"] != 2:
        pytest.skip("PML's wrapper needs equal local batches")
    xs, ys, w = _wrapper_case(run)
    world, num_classes = run["world"], run["num_classes"]
    loss = SparseCircleLoss(num_classes, DIM, gamma=32.0).double()
    with torch.no_grad():
        loss.W.copy_(w)
    ref = concat_reference(loss, xs, ys, 1)
    for got in (r["wrappers"]["pml_circle"] for r in run["results"]):
        close(got["loss"][0], world * ref["loss"][0])
        close(got["p_grad"][0]["W"], world * ref["p_grad"][0]["W"])  # N times too large
    # the embeddings' gradient is right for DDP (N * dL/dx_r), and t is the global one
    for r, got in enumerate(r["wrappers"]["pml_circle"] for r in run["results"]):
        close(got["x_grad"][0], world * ref["x_grad"][0][worker.rows(run["sizes"], r)])
    loss = CurricularFaceLoss(num_classes, DIM, scale=16.0, momentum=0.3).double()
    with torch.no_grad():
        loss.W.copy_(w)
    ref = concat_reference(loss, xs, ys, 2)
    for got in (r["wrappers"]["pml_curricular"] for r in run["results"]):
        for step in range(2):
            close(got["state"][step]["t"], ref["state"][step]["t"], rtol=1e-12, atol=1e-14)
            close(got["p_grad"][step]["W"], world * ref["p_grad"][step]["W"])


def _init_state(cls, seed, *args, **kw):
    torch.manual_seed(seed)
    return cls(*args, **kw).double()


def test_wrapper_sparse_circle_replicated_w(run):
    xs, ys, w = _wrapper_case(run)
    loss = SparseCircleLoss(run["num_classes"], DIM, gamma=32.0).double()
    with torch.no_grad():
        loss.W.copy_(w)
    check_wrapped(run, "ours_circle", concat_reference(loss, xs, ys, 2, lr=worker.LR), 2)


def test_wrapper_curricular_t_and_w_in_sync_from_rank0(run):
    xs, ys, _ = _wrapper_case(run)
    kw = dict(scale=16.0, momentum=0.3)
    loss = _init_state(CurricularFaceLoss, 100, run["num_classes"], DIM, **kw)  # rank 0's init
    ref = concat_reference(loss, xs, ys, 2, lr=worker.LR)
    check_wrapped(run, "ours_curricular", ref, 2)
    assert ref["state"][1]["t"].abs() > 1e-4  # t does move


def test_wrapper_center_loss_gradient_mode(run):
    xs, ys, _ = _wrapper_case(run)
    loss = _init_state(CenterLoss, 200, run["num_classes"], DIM)
    check_wrapped(run, "ours_center_grad", concat_reference(loss, xs, ys, 2, lr=worker.LR), 2)


def test_wrapper_center_loss_paper_rule_keeps_centers_identical(run):
    xs, ys, _ = _wrapper_case(run)
    loss = _init_state(CenterLoss, 300, run["num_classes"], DIM, update_rule="paper", alpha=0.5)
    centers = loss.centers.clone()
    ref = concat_reference(loss, xs, ys, 2)
    for step in range(2):
        centers = center_update(centers, xs[step], ys[step], 0.5)
        close(ref["state"][step]["centers"], centers)
    check_wrapped(run, "ours_center_paper", ref, 2)


def test_wrapper_and_miner_wrapper_pair_loss(run):
    xs, ys, _ = _wrapper_case(run)
    miner = TripletMarginMiner(margin=0.5, type_of_triplets="all")
    ref = concat_reference(CircleLoss(m=0.4, gamma=16.0), xs, ys, 1, miner=miner)
    check_wrapped(run, "ours_pair_mined", ref, 1)


def test_wrapper_standalone_center(run):
    xs, ys, _ = _wrapper_case(run)
    loss = _init_state(StandaloneCenterLoss, 500, run["num_classes"], DIM)
    check_wrapped(run, "ours_standalone", concat_reference(loss, xs, ys, 1), 1)


def test_wrapper_efficient_mode_averages_loss_parameter_grads(run):
    """efficient=True: rank r's loss over its anchors against the gathered batch."""
    xs, ys, _ = _wrapper_case(run)
    sizes, world = run["sizes"], run["world"]
    loss = _init_state(StandaloneCenterLoss, 400, run["num_classes"], DIM)
    for step in range(2):
        x = xs[step].clone().requires_grad_(True)
        parts = [
            loss(x[worker.rows(sizes, r)], ys[step][worker.rows(sizes, r)], None, x, ys[step])
            for r in range(world)
        ]
        (sum(parts) / world).backward()
        for r, res in enumerate(run["results"]):
            got = res["wrappers"]["ours_standalone_efficient"]
            close(got["loss"][step], parts[r].detach())
            close(got["x_grad"][step], world * x.grad[worker.rows(sizes, r)])
            close(got["p_grad"][step]["centers"], loss.centers.grad)
            close(got["state"][step]["centers"], loss.centers - worker.LR * loss.centers.grad)
        with torch.no_grad():
            loss.centers -= worker.LR * loss.centers.grad
        loss.centers.grad = None
