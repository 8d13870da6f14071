"""Sharded losses against the single-process losses (and class sampling).

Two process groups are spawned per session (``run`` in tests/distributed/conftest.py; the
harness in tests/helpers/_dist_harness.py): 2 ranks with even shards and batches, 3 ranks
with C=10 split 4/3/3 and local batches 4/3/5; every rank runs all scenarios of
``_dist_worker.py`` and saves its tensors. The parent recomputes each scenario in one
process in float64 with the single-process losses of ``pml_extras.losses`` and checks the
contract stated in ``pml_extras.distributed.sharded``: with N ranks and L = (1/N) sum_r L_r
(L_r = what rank r returns), rank r's loss is L_r, its embeddings get N * dL/dx_r, its W
shard gets dL/dW_r, and t is the single-process t. With equal local batches L is the
single-process mean loss on the concatenated batch.
"""

from __future__ import annotations

import _dist_worker as worker  # noqa: E402
import pytest
import torch
import torch.nn.functional as F
from _dist_harness import (  # noqa: E402
    CIRCLE_KW,
    CURRICULAR_KW,
    DIM,
    F64,
    check_against,
    close,
    module_reference,
    objective_reference,
    objective_step,
)
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.regularizers import LpRegularizer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_extras.distributed import (
    DistributedLossWrapper,
    ShardedCurricularFaceLoss,
    ShardedSparseCircleLoss,
    shard_ranges,
)
from pml_extras.functional.circle import sparse_circle_loss
from pml_extras.functional.curricular import curricular_face_loss, update_t
from pml_extras.losses import (
    CurricularFaceLoss,
    SparseCircleLoss,
)
from pml_extras.ops.class_lse import target_cosine


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
        objective_step(out, rank_losses, x, weight, t)
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
