"""Multi-process tests of ``pml_extras.distributed`` on CPU (gloo over loopback).

Two process groups are spawned per session (2 ranks with even shards and batches, 3 ranks
with C=10 split 4/3/3 and local batches 4/3/5); every rank runs all scenarios of
``_dist_worker.py`` and saves its tensors. The parent recomputes each scenario in one
process in float64 with the single-process losses of ``pml_extras.losses`` and checks the
contract stated in ``pml_extras.distributed.sharded``: with N ranks and L = (1/N) sum_r L_r
(L_r = what rank r returns), rank r's loss is L_r, its embeddings get N * dL/dx_r, its W
shard gets dL/dW_r, and t is the single-process t. With equal local batches L is the
single-process mean loss on the concatenated batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.miners import TripletMarginMiner
from pytorch_metric_learning.regularizers import LpRegularizer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_extras.distributed import (
    DistributedLossWrapper,
    ShardedCurricularFaceLoss,
    ShardedSparseCircleLoss,
    clip_grad_norm_,
    shard_ranges,
)
from pml_extras.functional.center import center_update
from pml_extras.functional.circle import sparse_circle_loss
from pml_extras.functional.curricular import curricular_face_loss, update_t
from pml_extras.losses import (
    CenterLoss,
    CurricularFaceLoss,
    SparseCircleLoss,
    StandaloneCenterLoss,
)
from pml_extras.losses.circle_loss import CircleLoss
from pml_extras.ops.class_lse import target_cosine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parents[1] / "helpers" / "_dist_worker.py"
F64 = torch.float64
DIM = 6
SUITES = "sharded,sampling,errors,wrappers"
CONFIGS = {
    2: dict(sizes=[5, 5], num_classes=8),
    3: dict(sizes=[4, 3, 5], num_classes=10),
}
TOL = dict(rtol=1e-9, atol=1e-11)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, sizes, num_classes, outdir, suites=SUITES, timeout=300.0, worker=WORKER, **env_kw):
    """Run ``world`` worker processes; return each rank's results dict.

    ``env_kw`` adds environment variables (e.g. ``PMLX_TIMEOUT``, the process group's
    timeout in seconds, so that a collective mismatch fails fast instead of hanging).
    """
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PMLX_SIZES=",".join(map(str, sizes)),
        PMLX_CLASSES=str(num_classes),
        PMLX_DIM=str(DIM),
        **{k: str(v) for k, v in env_kw.items()},
    )
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        log = open(outdir / f"rank{rank}.log", "w+")
        cmd = [sys.executable, str(worker), suites, str(world), str(rank), str(port), str(outdir)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = ""
    for rank, log in enumerate(logs):
        log.seek(0)
        text += f"--- rank {rank} (rc={procs[rank].returncode}) ---\n{log.read()[-4000:]}\n"
        log.close()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError(f"distributed workers failed or hung:\n{text}")
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def run(request, tmp_path_factory):
    world = request.param
    cfg = CONFIGS[world]
    results = spawn(world, cfg["sizes"], cfg["num_classes"], tmp_path_factory.mktemp(f"w{world}"))
    return dict(world=world, results=results, **cfg)


def close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected, **(tol or TOL))


# ----------------------------------------------------------------------------- references
def objective_reference(kind, case, sizes, steps, kw, train=True, weights=None, reg=None):
    """Single-process, full-W, float64: per step the objective L = (1/N) sum_r L_r.

    L_r = mean over rank r's rows of the per-sample losses (times miner weights) plus
    reg(W_r). Returns per-step lists of (L_r for each rank, dL/dX, dL/dW, t) after the same
    SGD steps on W as the workers take.
    """
    xs, ys, w = case
    world, num_classes = len(sizes), w.shape[1]
    ranges = shard_ranges(num_classes, world)
    # The sharded losses' defaults are their single-device twins' for the global (C, D).
    twin = SparseCircleLoss if kind == "circle" else CurricularFaceLoss
    kw = twin.resolve_hyper_parameters(num_classes, w.shape[0], **kw)
    weight = w.clone().requires_grad_(True)
    t = torch.zeros(1, dtype=F64)
    out = {"losses": [], "x_grad": [], "w_grad": [], "t": []}
    for step in range(steps):
        x = xs[step].clone().requires_grad_(True)
        y = ys[step]
        if kind == "circle":
            per = sparse_circle_loss(x, weight, y, kw["m"], kw["gamma"])
        else:
            cos = target_cosine(F.normalize(x, dim=1), weight, y)
            if train:
                t = update_t(t, cos, kw["momentum"])
            per = curricular_face_loss(x, weight, y, t, kw["margin"], kw["scale"])
        if weights is not None:
            per = per * weights
        rank_losses = []
        for r in range(world):
            part = per[worker.rows(sizes, r)]
            value = part.mean() if len(part) else per.sum() * 0
            if reg is not None:
                lo, hi = ranges[r]
                value = value + reg(weight[:, lo:hi].t())
            rank_losses.append(value)
        total = sum(rank_losses) / world
        total.backward()
        out["losses"].append(torch.stack(rank_losses).detach())
        out["x_grad"].append(x.grad.clone())
        out["w_grad"].append(weight.grad.clone())
        out["t"].append(t.clone())
        with torch.no_grad():
            weight -= worker.LR * weight.grad
        weight.grad = None
    return out


def module_reference(kind, case, steps, kw):
    """The single-process loss module on the concatenated batch with the full W."""
    xs, ys, w = case
    cls = SparseCircleLoss if kind == "circle" else CurricularFaceLoss
    loss_fn = cls(w.shape[1], w.shape[0], **kw).double()
    with torch.no_grad():
        loss_fn.W.copy_(w)
    out = {"loss": [], "x_grad": [], "w_grad": [], "t": []}
    for step in range(steps):
        x = xs[step].clone().requires_grad_(True)
        loss = loss_fn(x, ys[step])
        loss.backward()
        out["loss"].append(loss.detach())
        out["x_grad"].append(x.grad.clone())
        out["w_grad"].append(loss_fn.W.grad.clone())
        out["t"].append(loss_fn.t.clone() if kind != "circle" else None)
        with torch.no_grad():
            loss_fn.W -= worker.LR * loss_fn.W.grad
        loss_fn.W.grad = None
    return out


def check_against(ref, results, name, sizes, steps, check_t=False):
    world = len(sizes)
    for step in range(steps):
        for r, res in enumerate(results):
            got = res[name]
            lo, hi = got["range"]
            close(got["loss"][step], ref["losses"][step][r])
            close(got["x_grad"][step], world * ref["x_grad"][step][worker.rows(sizes, r)])
            close(got["w_grad"][step], ref["w_grad"][step][:, lo:hi])
            if check_t:
                close(got["t"][step], ref["t"][step])


# ----------------------------------------------------------------------------- sharded
CIRCLE_KW = dict(m=0.25, gamma=64.0)
CURRICULAR_KW = dict(margin=0.5, scale=16.0, momentum=0.3)


def test_shards_are_contiguous_and_cover_all_classes(run):
    ranges = [res["sharded"]["circle"]["range"] for res in run["results"]]
    assert ranges == shard_ranges(run["num_classes"], run["world"])
    assert ranges[0][0] == 0 and ranges[-1][1] == run["num_classes"]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if run["world"] == 3:
        assert [hi - lo for lo, hi in ranges] == [4, 3, 3]  # uneven shards
    for res in run["results"]:
        got = res["sharded"]["circle"]
        assert got["w_grad"][0].shape == (DIM, got["range"][1] - got["range"][0])
        assert got["state_keys"] == ["W", "class_range", "sample_step"]


def test_sparse_circle_loss_and_grads_match_single_process(run):
    sizes, results = run["sizes"], [r["sharded"] for r in run["results"]]
    case = worker.make_case(1, sizes, run["num_classes"], DIM, steps=2)
    ref = objective_reference("circle", case, sizes, 2, CIRCLE_KW, reg=LpRegularizer())
    check_against(ref, results, "circle", sizes, 2)
    # the gathered W after two SGD steps is the single-process W after them
    w_ref = case[2] - worker.LR * (ref["w_grad"][0] + ref["w_grad"][1])
    for res in results:
        close(res["circle"]["full_w"], w_ref)


def test_equal_batches_give_the_single_process_module_result(run):
    """With equal local batches: mean_r L_r and the gradients are the module's own."""
    if run["world"] != 2:
        pytest.skip("equal local batches in the 2-rank group")
    sizes, results = run["sizes"], [r["sharded"] for r in run["results"]]
    world = run["world"]
    for kind, seed, steps, kw, extra in (
        ("circle", 1, 2, CIRCLE_KW, dict(weight_regularizer=LpRegularizer())),
        ("curricular", 2, 3, CURRICULAR_KW, {}),
    ):
        case = worker.make_case(seed, sizes, run["num_classes"], DIM, steps=steps)
        ref = module_reference(kind, case, steps, dict(kw, **extra))
        for step in range(steps):
            mean_loss = torch.stack([res[kind]["loss"][step] for res in results]).mean()
            close(mean_loss, ref["loss"][step])
            x_grad = torch.cat([res[kind]["x_grad"][step] for res in results])
            close(x_grad, world * ref["x_grad"][step])
            w_grad = torch.cat([res[kind]["w_grad"][step] for res in results], dim=1)
            close(w_grad, ref["w_grad"][step])
            if kind == "curricular":
                for res in results:
                    close(res[kind]["t"][step], ref["t"][step])


def test_curricular_loss_grads_and_t_over_three_steps(run):
    sizes, results = run["sizes"], [r["sharded"] for r in run["results"]]
    case = worker.make_case(2, sizes, run["num_classes"], DIM, steps=3)
    ref = objective_reference("curricular", case, sizes, 3, CURRICULAR_KW)
    check_against(ref, results, "curricular", sizes, 3, check_t=True)
    ts = [res["curricular"]["t"] for res in results]
    assert all(torch.equal(a, b) for other in ts[1:] for a, b in zip(ts[0], other))
    assert abs(float(ts[0][2]) - float(ts[0][1])) > 1e-3  # t does move (momentum 0.3)
    for res in results:  # eval mode: t unchanged
        assert torch.equal(res["curricular"]["t_eval"], res["curricular"]["t"][-1])


def test_predict_is_nearest_proxy_over_all_shards(run):
    sizes = run["sizes"]
    case = worker.make_case(2, sizes, run["num_classes"], DIM, steps=3)
    ref = objective_reference("curricular", case, sizes, 3, CURRICULAR_KW)
    w = case[2] - worker.LR * sum(ref["w_grad"])
    logits = F.normalize(case[0][0], dim=1) @ F.normalize(w, dim=0)
    expected = logits.argmax(1)
    got = torch.cat([res["sharded"]["curricular"]["predict"] for res in run["results"]])
    assert torch.equal(got, expected)
    # top-3 in chunks of 2 classes (shards of 3-5 classes: chunks straddle nothing)
    top = logits.topk(3, dim=1)
    ids = torch.cat([res["sharded"]["curricular"]["predict_top3"][0] for res in run["results"]])
    cos = torch.cat([res["sharded"]["curricular"]["predict_top3"][1] for res in run["results"]])
    assert torch.equal(ids, top.indices)
    close(cos, top.values)


@pytest.mark.parametrize("k, chunk", [(1, None), (1, 3), (4, 1), (4, 5), (9, 2)])
def test_predict_in_chunks_is_the_full_topk(k, chunk):
    """One process: the chunked running top-k equals top-k of the full cosine matrix."""
    torch.manual_seed(3)
    loss = ShardedSparseCircleLoss(9, DIM).double()
    x = 3 * torch.randn(11, DIM, dtype=F64)
    logits = F.normalize(x, dim=1) @ F.normalize(loss.W.detach(), dim=0)
    ids, cos = loss.predict(x, k=k, chunk_size=chunk, return_scores=True)
    top = logits.topk(k, dim=1)
    if k == 1:
        assert ids.shape == (11,)
        ids, cos = ids[:, None], cos[:, None]
    assert torch.equal(ids, top.indices)
    close(cos, top.values)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 9\], got 10"):
        loss.predict(x, k=10)
    with pytest.raises(ValueError, match="chunk_size"):
        loss.predict(x, chunk_size=0)


def test_miner_indices_become_local_sample_weights(run):
    sizes, results = run["sizes"], [r["sharded"] for r in run["results"]]
    case = worker.make_case(3, sizes, run["num_classes"], DIM)
    weights = torch.cat(
        [lmu.convert_to_weights(worker.local_triplets(n), torch.zeros(n), dtype=F64) for n in sizes]
    )
    assert weights.min() < 1  # the tuple does weight samples differently
    ref = objective_reference("circle", case, sizes, 1, dict(gamma=32.0), weights=weights)
    check_against(ref, results, "circle_miner", sizes, 1)


@pytest.mark.parametrize("which", ["first", "last"])
def test_all_labels_in_one_shard(run, which):
    sizes, results = run["sizes"], [r["sharded"] for r in run["results"]]
    ranges = shard_ranges(run["num_classes"], run["world"])
    rng = ranges[0] if which == "first" else ranges[-1]
    case = worker.make_case(4, sizes, run["num_classes"], DIM, label_range=rng, steps=2)
    assert case[1][0].min() >= rng[0] and case[1][0].max() < rng[1]
    ref = objective_reference("circle", case, sizes, 1, {})
    check_against(ref, results, f"one_shard_{which}_circle", sizes, 1)
    kw = dict(scale=16.0, momentum=0.5)
    ref = objective_reference("curricular", case, sizes, 2, kw)
    check_against(ref, results, f"one_shard_{which}_curricular", sizes, 2, check_t=True)


def test_empty_local_batch(run):
    res = [r["errors"]["empty"] for r in run["results"]]
    sizes = res[0]["sizes"]
    assert sizes[-1] == 0
    case = worker.make_case(6, sizes, run["num_classes"], DIM)
    ref = objective_reference("circle", case, sizes, 1, dict(gamma=32.0))
    check_against(ref, [{"empty": r} for r in res], "empty", sizes, 1)
    assert float(res[-1]["loss"][0]) == 0.0 and res[-1]["w_grad"][0].abs().sum() > 0


def test_bad_input_on_one_rank_raises_on_every_rank(run):
    world, num_classes = run["world"], run["num_classes"]
    for rank, res in enumerate(r["errors"] for r in run["results"]):
        msg = res["label"]
        assert msg.startswith("ValueError") and f"label {num_classes + 2}" in msg, msg
        assert f"num_classes={num_classes}" in msg
        if rank != world - 1:
            assert f"on rank {world - 1}" in msg
        assert res["dim"].startswith("ValueError"), res["dim"]
        assert ("embedding_size" in res["dim"]) == (rank == 0)
        assert torch.isfinite(res["after"])  # the group is still in step


# ----------------------------------------------------------------------------- clipping
def clip_reference(run):
    """Single process, float64: backbone + SparseCircle objective on the full W, unclipped."""
    sizes, world = run["sizes"], run["world"]
    xs, ys, w = worker.make_case(8, sizes, run["num_classes"], DIM)
    params = [t.clone().requires_grad_(True) for t in worker.clip_model(DIM)]
    params.append(w.clone().requires_grad_(True))
    a, b, weight = params
    per = sparse_circle_loss(xs[0] @ a + b, weight, ys[0], 0.25, 32.0)
    (sum(per[worker.rows(sizes, r)].mean() for r in range(world)) / world).backward()
    return params


def torch_clip(params, grads, norm_type):
    for t, g in zip(params, grads):
        t.grad = None if g is None else g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, worker.CLIP_MAX_NORM, norm_type)
    return total, [t.grad for t in params]


def total_norm(tensors, norm_type):
    """``torch.nn.utils.get_total_norm`` (torch >= 2.6); the norm of the per-tensor norms
    (what it computes) on older torch."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(tensors, norm_type)
    norms = [torch.linalg.vector_norm(t.double(), norm_type) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type).to(tensors[0].dtype)


@pytest.mark.parametrize("norm_type", worker.CLIP_NORM_TYPES, ids=["p2", "inf", "p3"])
def test_clip_grad_norm_is_single_process_clip_over_model_and_full_w(run, norm_type):
    params = clip_reference(run)
    unclipped = [t.grad.clone() for t in params]
    for res in run["results"]:  # the step itself is the single-process one
        got = res["sharded"]["clip"]
        lo, hi = got["range"]
        close(got["grads"][0], unclipped[0])
        close(got["grads"][1], unclipped[1])
        close(got["grads"][2], unclipped[2][:, lo:hi])
    total, clipped = torch_clip(params, unclipped, norm_type)
    assert total > 2 * worker.CLIP_MAX_NORM  # the clip does scale the gradients down
    # Some rank's own part (model + its shard) has a smaller norm than the whole: a clip
    # that measured only the local part would show here.
    ranges = [res["sharded"]["clip"]["range"] for res in run["results"]]
    local = [total_norm([*unclipped[:2], unclipped[2][:, lo:hi]], norm_type) for lo, hi in ranges]
    assert min(local) < total * (1 - 1e-6), (local, total)
    for res in run["results"]:
        got = res["sharded"]["clip"]
        lo, hi = got["range"]
        close(got[norm_type]["total"], total)
        close(got[norm_type]["grads"][0], clipped[0])
        close(got[norm_type]["grads"][1], clipped[1])
        close(got[norm_type]["grads"][2], clipped[2][:, lo:hi])
    if norm_type == 2.0:
        for res in run["results"]:  # W listed in both: counted once, as a shard
            close(res["sharded"]["clip"]["all_in_parameters"], total)


def test_clip_grad_norm_rank_without_grads_empty_and_nonfinite(run):
    params = clip_reference(run)
    grads = [t.grad.clone() for t in params]
    hi0 = run["results"][0]["sharded"]["clip"]["range"][1]
    a, b, weight = params
    rest = weight[:, hi0:].detach().requires_grad_(True)  # W without rank 0's shard
    total, _ = torch_clip([a, b, rest], [grads[0], grads[1], grads[2][:, hi0:]], 2.0)
    for rank, res in enumerate(run["results"]):
        got = res["sharded"]["clip"]
        close(got["rank0_no_grad"], total)
        assert float(got["empty"]) == 0.0
        assert all(torch.isnan(t) for t in got["nan_total"]), (rank, got["nan_total"])
        msg = got["nan_error"]
        assert msg.startswith("RuntimeError") and "non-finite (nan)" in msg, msg


# ----------------------------------------------------------------------------- sampling
def sampled_reference(case, sizes, steps, sampled, kind="circle", kw=None):
    """The single-process loss restricted to the classes the ranks used, per step."""
    xs, ys, w = case
    world = len(sizes)
    weight = w.clone().requires_grad_(True)
    t = torch.zeros(1, dtype=F64)
    out = {"losses": [], "x_grad": [], "w_grad": [], "t": []}
    kw = kw or dict(gamma=32.0)
    for step in range(steps):
        cols = sampled[step]
        remap = torch.full((w.shape[1],), -1, dtype=torch.int64)
        remap[cols] = torch.arange(len(cols))
        x, y = xs[step].clone().requires_grad_(True), remap[ys[step]]
        assert (y >= 0).all()
        sub = weight[:, cols]
        if kind == "circle":
            per = sparse_circle_loss(x, sub, y, 0.25, kw["gamma"])
        else:
            t = update_t(t, target_cosine(F.normalize(x, dim=1), sub, y), kw["momentum"])
            per = curricular_face_loss(x, sub, y, t, 0.5, kw["scale"])
        rank_losses = [per[worker.rows(sizes, r)].mean() for r in range(world)]
        (sum(rank_losses) / world).backward()
        out["losses"].append(torch.stack(rank_losses).detach())
        out["x_grad"].append(x.grad.clone())
        out["w_grad"].append(weight.grad.clone())
        out["t"].append(t.clone())
        with torch.no_grad():
            weight -= worker.LR * weight.grad
        weight.grad = None
    return out


def _sampled(results, name, step):
    return torch.cat([res["sampling"][name]["sampled"][step] for res in results])


def test_sampling_is_reproducible_and_keeps_positives(run):
    results, sizes = run["results"], run["sizes"]
    case = worker.sampling_case(sizes, run["num_classes"], DIM)
    for step in range(3):
        for res in results:
            a, b = res["sampling"]["sampled_a"], res["sampling"]["sampled_b"]
            assert torch.equal(a["sampled"][step], b["sampled"][step])
            assert torch.equal(a["loss"][step], b["loss"][step])
            assert torch.equal(a["w_grad"][step], b["w_grad"][step])
            lo, hi = a["range"]
            shard = hi - lo
            positives = torch.unique(case[1][step][(case[1][step] >= lo) & (case[1][step] < hi)])
            kept = a["sampled"][step]
            assert set(positives.tolist()) <= set(kept.tolist())
            assert len(kept) == max(len(positives), -(-4 * shard // 10))  # ceil(0.4 * shard)
            assert ((kept >= lo) & (kept < hi)).all()
    a = [_sampled(results, "sampled_a", s) for s in range(3)]
    other = [_sampled(results, "sampled_other_seed", s) for s in range(3)]
    assert any(not torch.equal(x, y) for x, y in zip(a, a[1:]))  # steps differ
    assert any(not torch.equal(x, y) for x, y in zip(a, other))  # seeds differ


def test_sampled_grads_match_restricted_single_process_and_unsampled_are_zero(run):
    results, sizes = run["results"], run["sizes"]
    case = worker.sampling_case(sizes, run["num_classes"], DIM)
    sampled = [_sampled(results, "sampled_a", s) for s in range(3)]
    ref = sampled_reference(case, sizes, 3, sampled)
    check_against(ref, [r["sampling"] for r in results], "sampled_a", sizes, 3)
    for step in range(3):
        for res in results:
            got = res["sampling"]["sampled_a"]
            lo, hi = got["range"]
            unused = torch.ones(hi - lo, dtype=torch.bool)
            unused[got["sampled"][step] - lo] = False
            assert unused.any()
            assert torch.equal(got["w_grad"][step][:, unused], torch.zeros(DIM, int(unused.sum())))
    sampled = [_sampled(results, "sampled_curricular", s) for s in range(2)]
    kw = dict(scale=16.0, momentum=0.3)
    ref = sampled_reference(case, sizes, 2, sampled, "curricular", kw)
    check_against(ref, [r["sampling"] for r in results], "sampled_curricular", sizes, 2, True)


def test_sampling_that_keeps_every_class_equals_unsampled(run):
    for res in run["results"]:
        a, b = res["sampling"]["sampled_all_pos"], res["sampling"]["unsampled_all_pos"]
        lo, hi = a["range"]
        assert torch.equal(a["sampled"][0], torch.arange(lo, hi))
        assert b["sampled"][0] is None
        close(a["loss"][0], b["loss"][0], rtol=1e-13, atol=1e-13)
        close(a["x_grad"][0], b["x_grad"][0], rtol=1e-13, atol=1e-13)
        close(a["w_grad"][0], b["w_grad"][0], rtol=1e-13, atol=1e-13)
        assert res["sampling"]["sampled_eval"]["sampled"][0] is None  # eval: no sampling


# ----------------------------------------------------------------------------- wrappers
def concat_reference(loss, xs, ys, steps, lr=0.0, miner=None):
    out = {"loss": [], "x_grad": [], "p_grad": [], "state": []}
    for step in range(steps):
        x = xs[step].clone().requires_grad_(True)
        indices = miner(x, ys[step]) if miner is not None else None
        value = loss(x, ys[step], indices)
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


# ----------------------------------------------------------------------------- one process
def test_single_process_is_the_single_gpu_loss():
    """Without torch.distributed the sharded losses are the plain ones (one shard)."""
    torch.manual_seed(0)
    x = torch.randn(7, DIM, dtype=F64, requires_grad=True)
    y = torch.randint(0, 9, (7,))
    for sharded, plain in (
        # Explicit hyper-parameters: the single-GPU losses' defaults may depend on D.
        (
            ShardedSparseCircleLoss(9, DIM, m=0.25, gamma=32.0),
            SparseCircleLoss(9, DIM, m=0.25, gamma=32.0),
        ),
        (
            ShardedCurricularFaceLoss(9, DIM, margin=0.5, scale=64.0),
            CurricularFaceLoss(9, DIM, margin=0.5, scale=64.0),
        ),
    ):
        sharded, plain = sharded.double(), plain.double()
        with torch.no_grad():
            plain.W.copy_(sharded.W)
        a, b = sharded(x, y), plain(x, y)
        close(a, b)
        ga = torch.autograd.grad(a, [x, sharded.W])
        gb = torch.autograd.grad(b, [x, plain.W])
        close(ga[0], gb[0])
        close(ga[1], gb[1])
        close(sharded.gather_weight(), plain.W)
    plain.eval()  # CurricularFace: t must not move between the two calls
    close(DistributedLossWrapper(plain)(x, y), plain(x, y))


def test_constructor_and_state_dict_errors():
    with pytest.raises(ValueError, match="sample_rate"):
        ShardedSparseCircleLoss(10, 4, sample_rate=0.0)
    with pytest.raises(ValueError, match="sum to"):
        shard_ranges(10, 2, [3, 3])
    with pytest.raises(ValueError, match="at least one class"):
        shard_ranges(2, 3)
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    loss = ShardedCurricularFaceLoss(10, 4)
    state = loss.state_dict()
    assert sorted(state) == ["W", "class_range", "sample_step", "t"]
    state["class_range"] = torch.tensor([4, 7])
    with pytest.raises(RuntimeError, match=r"classes \[4, 7\)"):
        loss.load_state_dict(state)
    with pytest.raises(ValueError, match="label 10 is out of range for num_classes=10"):
        loss(torch.randn(3, 4), torch.tensor([0, 10, 1]))
    with pytest.raises(TypeError, match="distributes itself"):
        DistributedLossWrapper(loss)


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("circle", dict(gamma=0.0)),
        ("circle", dict(gamma=float("nan"))),
        ("circle", dict(impl="cuda")),
        ("circle", dict(chunk_size=0)),
        ("circle", dict(distance=LpDistance())),
        ("curricular", dict(momentum=1.5)),
        ("curricular", dict(scale=-1.0)),
    ],
)
def test_sharded_constructor_errors_are_the_single_gpu_ones(kind, kw):
    """One validation function serves both: same checks, same messages (but the name)."""
    single, sharded = {
        "circle": (SparseCircleLoss, ShardedSparseCircleLoss),
        "curricular": (CurricularFaceLoss, ShardedCurricularFaceLoss),
    }[kind]
    messages = []
    for cls in (single, sharded):
        with pytest.raises(ValueError) as info:
            cls(10, 4, **kw)
        messages.append(str(info.value).replace(cls.__name__, "LOSS"))
    assert messages[0] == messages[1] and messages[0].startswith("LOSS"), messages


def _params_with_grads(dtype=F64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.zeros(shape, dtype=dtype, requires_grad=True) for shape in [(5, 3), (4,), (2,)]]
    for t in params[:2]:  # the last one keeps grad None
        t.grad = (scale * torch.randn(t.shape, generator=g, dtype=F64)).to(dtype)
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 0.5, 3.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.3, 100.0])
def test_clip_grad_norm_without_process_group_is_torch_clip(norm_type, max_norm):
    ours, theirs = _params_with_grads(), _params_with_grads()
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    # one process: "sharded" tensors are just more parameters
    got = clip_grad_norm_(ours[:1], max_norm, norm_type, sharded=ours[1:])
    close(got, expected)
    assert got.dtype == F64
    for a, b in zip(ours, theirs):
        close(a.grad, b.grad)
    assert ours[2].grad is None


def test_clip_grad_norm_edge_cases():
    assert float(clip_grad_norm_([], 1.0)) == 0.0
    assert float(clip_grad_norm_(torch.zeros(3, requires_grad=True), 1.0, sharded=[])) == 0.0
    # fp16 gradients: the norm (~8.7e4) is taken in float32 (fp16 overflows past 65504)
    half = _params_with_grads(torch.float16, scale=1.0)
    for t in half[:2]:
        t.grad.fill_(20000.0)
    wide = [t.detach().float().requires_grad_(True) for t in half]
    for a, b in zip(wide, half):
        a.grad = None if b.grad is None else b.grad.float()
    expected = torch.nn.utils.clip_grad_norm_(wide, 1.0)
    assert expected > 65504
    got = clip_grad_norm_(half, 1.0)
    assert got.dtype == torch.float32
    close(got, expected, rtol=1e-6, atol=0)
    for a, b in zip(wide[:2], half[:2]):
        assert b.grad.dtype == torch.float16
        close(b.grad.float(), a.grad, rtol=2e-3, atol=0)
    # a non-finite norm: scaled like torch (NaN everywhere) or a clear error
    params = _params_with_grads()
    params[0].grad[1, 1] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert torch.isinf(clip_grad_norm_(params, 1.0, float("inf")))
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(params, 1.0, 0.0)
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_(params, 1.0, float("nan"))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(params, -1.0)


def test_clip_collective_device_is_the_shards_device(monkeypatch):
    """NCCL: the norm all-reduce runs on the shard's device, even where its grad is None
    (not torch.cuda.current_device(), which is cuda:0 without set_device)."""
    from pml_extras.distributed import clip as clip_module

    monkeypatch.setattr(clip_module.dist, "get_backend", lambda group=None: "nccl")
    shard = torch.empty(2, 3, device="meta", requires_grad=True)  # grad None
    model = torch.zeros(3, requires_grad=True)
    assert clip_module._collective_device(None, [shard, model]) == torch.device("meta")
    monkeypatch.setattr(clip_module.dist, "get_backend", lambda group=None: "gloo")
    assert clip_module._collective_device(None, [shard]) == torch.device("cpu")


def _fake_checkpoints(tmp_path, ranges, dim=3, adam=True):
    g = torch.Generator().manual_seed(0)
    num_classes = ranges[-1][1]
    full = {n: torch.randn(dim, num_classes, generator=g) for n in ("W", "exp_avg", "exp_avg_sq")}
    full["exp_avg_sq"] = full["exp_avg_sq"].abs()  # a second moment
    paths = []
    for r, (lo, hi) in enumerate(ranges):
        loss = {
            "W": full["W"][:, lo:hi].clone(),
            "class_range": torch.tensor([lo, hi]),
            "sample_step": torch.tensor(7),
            "t": torch.tensor([0.25]),
        }
        state = {"step": torch.tensor(7.0)}
        if adam:
            state.update(exp_avg=full["exp_avg"][:, lo:hi].clone())
            state.update(exp_avg_sq=full["exp_avg_sq"][:, lo:hi].clone())
        groups = torch.optim.Adam([torch.zeros(1)], lr=0.1).state_dict()["param_groups"]
        opt = {"state": {0: state}, "param_groups": groups}
        path = tmp_path / f"src{r}.pt"
        torch.save({"loss": loss, "loss_opt": opt, "model": {"a": torch.ones(2)}, "step": 3}, path)
        paths.append(path)
    return full, paths


@pytest.mark.parametrize("new_world, sizes", [(2, None), (4, [1, 5, 2, 2]), (1, None)])
def test_reshard_checkpoints_carries_w_t_sample_step_and_optimizer_state(
    tmp_path, new_world, sizes
):
    from pml_extras.distributed import reshard_checkpoints

    full, paths = _fake_checkpoints(tmp_path, shard_ranges(10, 3))
    out = reshard_checkpoints(paths, tmp_path / "dst", new_world, shard_sizes=sizes)
    new = [torch.load(p, weights_only=True) for p in out]
    ranges = shard_ranges(10, new_world, sizes)
    assert [n["loss"]["class_range"].tolist() for n in new] == [list(r) for r in ranges]
    assert torch.equal(torch.cat([n["loss"]["W"] for n in new], 1), full["W"])
    for name in ("exp_avg", "exp_avg_sq"):
        got = torch.cat([n["loss_opt"]["state"][0][name] for n in new], 1)
        assert torch.equal(got, full[name])
    for n in new:
        assert int(n["loss"]["sample_step"]) == 7 and float(n["loss"]["t"]) == 0.25
        assert float(n["loss_opt"]["state"][0]["step"]) == 7.0
        assert n["model"]["a"].sum() == 2 and n["step"] == 3
    if new_world == 1:  # loads into the one-process loss and its optimizer, then trains
        loss = ShardedCurricularFaceLoss(10, 3)
        loss.load_state_dict(new[0]["loss"])
        opt = torch.optim.Adam(loss.parameters(), lr=0.1)
        opt.load_state_dict(new[0]["loss_opt"])
        loss(torch.randn(4, 3), torch.tensor([0, 3, 9, 9])).backward()
        opt.step()
        assert torch.isfinite(loss.W).all() and float(opt.state[loss.W]["step"]) == 8.0


def test_reshard_checkpoints_refuses_what_it_cannot_carry(tmp_path):
    from pml_extras.distributed import reshard_checkpoints

    _, paths = _fake_checkpoints(tmp_path, [(0, 5), (5, 10)])
    bad = torch.load(paths[1], weights_only=True)
    bad["loss"]["t"] = torch.tensor([0.5])
    torch.save(bad, paths[1])
    with pytest.raises(ValueError, match="'loss.t' differs between rank 0"):
        reshard_checkpoints(paths, tmp_path / "a", 3)
    _, paths = _fake_checkpoints(tmp_path, [(0, 5), (5, 10)])
    for p in paths:
        ck = torch.load(p, weights_only=True)
        ck["loss_opt"]["state"][0]["factored"] = torch.zeros(4)
        torch.save(ck, p)
    with pytest.raises(ValueError, match="'factored' has shape \\(4,\\), neither W's"):
        reshard_checkpoints(paths, tmp_path / "b", 3)
    with pytest.raises(ValueError, match="do not tile"):
        reshard_checkpoints(paths[::-1], tmp_path / "c", 3)
