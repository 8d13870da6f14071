"""clip_grad_norm_ over a model and class-sharded W: on 2 and 3 gloo ranks against
torch's clip in one process (float64), and without a process group (the workers and the
``run`` fixture: tests/helpers/_dist_harness.py, tests/distributed/conftest.py)."""

from __future__ import annotations

import _dist_worker as worker  # noqa: E402
import pytest
import torch
from _dist_harness import (  # noqa: E402
    DIM,
    F64,
    close,
)

from pml_extras.distributed import (
    clip_grad_norm_,
)
from pml_extras.functional.circle import sparse_circle_loss


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
