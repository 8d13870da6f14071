"""Every rank runs the same collectives whatever its local batch holds (gloo, 2 and 3 ranks).

The ranks' batches differ in kind: rank 0's labels are unique in the global batch (no
pairs or triplets of its own), a rank mined nothing, a rank's local batch is empty, a
rank's embeddings do not require grad. Each scenario of ``_dist_sync_worker.py`` logs the
collectives issued by every rank; they must be the same, in the same order, and the
gradients must be those of the single-process float64 computation of the same objective.
The process group times out after 20 s, so a mismatch fails instead of hanging.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_extras.losses import StandaloneCenterLoss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_sync_worker as sw  # noqa: E402
import _dist_worker as worker  # noqa: E402
from _dist_harness import close, objective_reference, spawn  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "_dist_sync_worker.py"


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def sync_run(request, tmp_path_factory):
    world = request.param
    results = spawn(
        world,
        [1] * world,
        13,
        tmp_path_factory.mktemp(f"sync{world}"),
        suites="sync_wrapper,sync_sharded,amp,sync_state,host_syncs",
        timeout=300.0,  # a guard only: the group's 20 s timeout fails a mismatch first
        worker=WORKER,
        PMLX_TIMEOUT=20,
    )
    return dict(world=world, results=results)


def _scenarios(run, suite, name):
    return [res[suite][name] for res in run["results"]]


def _same_collectives(got):
    calls = [g["calls"] for g in got]
    assert len(calls[0]) > 0
    for r, c in enumerate(calls[1:], 1):
        assert c == calls[0], f"rank {r} issued {c}, rank 0 issued {calls[0]}"
    for g in got:
        assert g["call_counts"] == [len(calls[0])] * len(got)


def _pairs_without_self(y_local, y_all, offset):
    """All (anchor, ref) pairs; with an offset, the pairs of a sample with itself dropped."""
    a1, p, a2, n = lmu.get_all_pairs_indices(y_local, y_all)
    if offset is not None:
        keep = p != a1 + offset
        a1, p = a1[keep], p[keep]
    return a1, p, a2, n


def efficient_reference(loss, sizes, labels, indices=None, ref=None):
    """Single process: L_s = loss(x_s, y_s, idx_s, refs) for every rank s, and their sum's
    gradient w.r.t. the global embeddings (and the references)."""
    x = sw.global_x(sum(sizes)).requires_grad_(True)
    refs = x if ref is None else ref.requires_grad_(True)
    parts = []
    for s in range(len(sizes)):
        rows = worker.rows(sizes, s)
        idx = indices(s) if indices is not None else None
        if idx is None:
            idx = _pairs_without_self(labels[rows], labels, None if ref is not None else rows.start)
        parts.append(loss(x[rows], labels[rows], idx, refs, labels))
    total = sum(parts)
    total.backward()
    return dict(
        losses=[p.detach() for p in parts],
        x_grad=x.grad,
        ref_grad=None if ref is None else ref.grad,
        total=total.detach(),
    )


def check_rows(got, expected_x_grad, losses, scale_loss=None):
    sizes = got[0]["sizes"]
    for r, g in enumerate(got):
        close(g["loss"], losses[r] if scale_loss is None else scale_loss)
        if g["x_grad"] is not None:
            close(g["x_grad"], expected_x_grad[worker.rows(sizes, r)])


@pytest.mark.parametrize(
    "name, nograd",
    [("eff_no_pos", None), ("eff_empty", None), ("eff_nograd", 0), ("eff_mined_nothing", None)],
)
def test_efficient_wrapper_same_collectives_and_exact_grads(sync_run, name, nograd):
    got = _scenarios(sync_run, "sync_wrapper", name)
    _same_collectives(got)
    sizes = got[0]["sizes"]
    _, labels = sw.labels_for(sync_run["world"], 0 if "empty" in name else None)
    indices = (lambda s: sw.fixed_triplets(s, sizes)) if name == "eff_mined_nothing" else None
    ref = efficient_reference(TripletMarginLoss(margin=0.2), sizes, labels, indices)
    check_rows(got, ref["x_grad"], ref["losses"])
    assert float(ref["losses"][0]) == 0.0  # rank 0 has no triplets of its own ...
    if sizes[0]:  # ... but its samples are the others' negatives
        assert ref["x_grad"][worker.rows(sizes, 0)].abs().sum() > 0
    for r, g in enumerate(got):
        assert (g["x_grad"] is None) == (r == nograd)


def test_efficient_wrapper_with_separate_references(sync_run):
    got = _scenarios(sync_run, "sync_wrapper", "eff_ref")
    _same_collectives(got)
    assert sum(name == "all_reduce" for name, _ in got[0]["calls"]) == 1  # one backward
    sizes, labels = sw.labels_for(sync_run["world"])
    refs = sw.global_x(sum(sizes), seed=1)
    ref = efficient_reference(TripletMarginLoss(margin=0.2), sizes, labels, ref=refs)
    check_rows(got, ref["x_grad"], ref["losses"])
    for r, g in enumerate(got):
        close(g["ref_grad"], ref["ref_grad"][worker.rows(sizes, r)])


def test_efficient_wrapper_loss_parameters_with_an_empty_rank(sync_run):
    got = _scenarios(sync_run, "sync_wrapper", "eff_params_empty")
    _same_collectives(got)
    world = sync_run["world"]
    sizes, labels = sw.labels_for(world, 0)
    torch.manual_seed(7)
    loss = StandaloneCenterLoss(13, sw.DIM).double()
    ref = efficient_reference(loss, sizes, labels)
    check_rows(got, ref["x_grad"], ref["losses"])
    for g in got:  # averaged: the gradient of (1/N) sum_s L_s on every rank
        close(g["p_grad"]["centers"], loss.centers.grad / world)


@pytest.mark.parametrize("name, nograd", [("plain_empty", None), ("plain_nograd", -1)])
def test_plain_wrapper_same_collectives_and_exact_grads(sync_run, name, nograd):
    got = _scenarios(sync_run, "sync_wrapper", name)
    _same_collectives(got)
    world = sync_run["world"]
    sizes = got[0]["sizes"]
    _, labels = sw.labels_for(world, 0 if "empty" in name else None)
    x = sw.global_x(sum(sizes)).requires_grad_(True)
    value = TripletMarginLoss(margin=0.2)(x, labels)
    value.backward()
    check_rows(got, world * x.grad, None, scale_loss=value.detach())
    for r, g in enumerate(got):
        assert (g["x_grad"] is None) == (r == world - 1 and nograd is not None)


@pytest.mark.parametrize("name", ["nograd", "mined_nothing"])
def test_sharded_loss_same_collectives_and_exact_grads(sync_run, name):
    got = _scenarios(sync_run, "sync_sharded", name)
    _same_collectives(got)
    world = sync_run["world"]
    sizes, labels = sw.labels_for(world)
    w = sw.global_x(13, seed=3).t().contiguous()
    weights = None
    if name == "mined_nothing":
        weights = torch.cat(
            [
                lmu.convert_to_weights(g["indices"], torch.zeros(n), dtype=torch.float64)
                for g, n in zip(got, sizes)
            ]
        )
    case = ([sw.global_x(sum(sizes))], [labels], w)
    ref = objective_reference("circle", case, sizes, 1, dict(gamma=16.0), weights=weights)
    check_rows(got, world * ref["x_grad"][0], ref["losses"][0])
    from pml_extras.distributed import shard_ranges

    for (lo, hi), g in zip(shard_ranges(13, world), got):
        close(g["p_grad"]["W"], ref["w_grad"][0][:, lo:hi])
    assert (got[0]["x_grad"] is None) == (name == "nograd")


# ----------------------------------------------------------------------------- AMP
def test_amp_global_scaler_skips_the_same_step_on_every_rank(sync_run):
    """An inf in the last rank's W shard at step 2: every rank skips it, scales stay equal."""
    import _dist_amp_worker as amp

    world = sync_run["world"]
    for kind in ("ours", "fsdp"):
        got = [res["amp"][kind] for res in sync_run["results"]]
        for g in got:
            expected = [s == amp.INF_STEP for s in range(1, amp.STEPS + 1)]
            assert g["found_inf"] == expected and g["skipped"] == expected, kind
            # growth_interval=1: x2 after every good step, x0.5 after the skipped one
            assert g["scale"] == [2.0**11, 2.0**10, 2.0**11, 2.0**12], (kind, g["scale"])
            assert g["norm"][amp.INF_STEP - 1] == float("inf")
            for a, b in zip(g["model"], got[0]["model"]):
                assert torch.equal(a, b)  # the DDP replicas stay identical
    # The plain GradScaler decides per rank: only the last rank sees the inf, the scales
    # part, and the next steps unscale the same all-reduced gradients by different
    # factors, so the replicas drift apart.
    got = [res["amp"]["torch"] for res in sync_run["results"]]
    assert [g["found_inf"][amp.INF_STEP - 1] for g in got] == [False] * (world - 1) + [True]
    assert got[0]["scale"][amp.INF_STEP - 1] == 4 * got[-1]["scale"][amp.INF_STEP - 1]
    assert not torch.equal(got[0]["model"][-1], got[-1]["model"][-1])


# ----------------------------------------------------------------------------- replicated state
def test_wrapper_restores_state_perturbed_on_one_rank(sync_run):
    """W and t changed on the last rank after step 1: with sync_every=1 the next forward
    broadcasts rank 0's state, and every rank continues as if nothing had happened (same
    W, t and momentum as the unperturbed run); with sync_every=0 the change stays."""
    res = [r["sync_state"] for r in sync_run["results"]]
    clean = res[0]["every1_clean"]
    for r, got in enumerate(res):
        for step in range(3):
            for k, v in got["every1_perturbed"]["state"][step].items():
                if step > 0 or r != len(res) - 1:
                    close(v, clean["state"][step][k], rtol=1e-13, atol=1e-13)
                assert torch.equal(v, res[0]["every1_perturbed"]["state"][step][k]), (r, step, k)
            # gradients averaged: the same momentum on every rank, bit for bit
            assert torch.equal(
                got["every1_perturbed"]["momentum"][step],
                res[0]["every1_perturbed"]["momentum"][step],
            )
        for step in range(3):  # no perturbation: both cadences agree with each other
            for k, v in got["every0_clean"]["state"][step].items():
                close(v, clean["state"][step][k], rtol=1e-13, atol=1e-13)
    last = res[-1]["every0_perturbed"]["state"][2]
    first = res[0]["every0_perturbed"]["state"][2]
    assert not torch.equal(last["W"], first["W"]) and not torch.equal(last["t"], first["t"])


# ----------------------------------------------------------------------------- host syncs
def test_host_syncs_per_step(sync_run):
    """One host sync per training step (the all-gather of batch sizes, errors and the label
    range), plus one with negative sampling (how many columns to keep). Counted by patching
    the Tensor methods that wait for the device (item, tolist, __bool__, nonzero, __int__,
    __float__, unique); the code avoids boolean-mask indexing, which syncs unseen."""
    gather = ("tolist", "/distributed/_comm.py:all_gather_ints")
    keep = ("__int__", "/distributed/sharded_base.py:_columns_and_targets")
    for res in sync_run["results"]:
        got = res["host_syncs"]
        assert got["circle"] == [gather]
        assert got["circle_sampled"] == [gather, keep]
        assert got["curricular_sampled"] == [gather, keep]
        # The wrapper adds its all-gather to what the wrapped loss does (CenterLoss's own
        # label check on the gathered batch).
        assert got["wrapper_center"] == [gather, ("tolist", "/_validation.py:_check_label_range")]
