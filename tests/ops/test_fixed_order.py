"""pml_extras/ops/fixed_order.py: the gathers and out-of-place scatter-adds whose sums
have a fixed order on CUDA, and the modules that use them (the center losses' center
gathers and mined inter term, the mined pair loss's per-bin logsumexp).

The CUDA branch runs here on CPU (tests/helpers/sorted_add.py makes every tensor count as
CUDA); the references are float64 sums written out with Python loops or plain
``index_select`` / ``index_add`` in float64. The in-place row and column adds have their
own tests (tests/ops/test_pair_gather.py, tests/ops/test_class_lse_gpu_path.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sorted_add import record_only, take_cuda_branch

from pml_extras.functional import center_loss, standalone_center_loss
from pml_extras.ops import fixed_order
from pml_extras.ops.pair_gather import scatter_logsumexp

F64 = torch.float64


def _loop_scatter(size, index, src):
    out = torch.zeros((size,) + tuple(src.shape[1:]), dtype=F64)
    for i, j in enumerate(index.tolist()):
        out[j] += src[i].double()
    return out


@pytest.mark.parametrize("cuda_branch", [False, True], ids=["cpu", "cuda_branch"])
def test_gather_rows_values_and_gradient(monkeypatch, cuda_branch):
    """Values are index_select's; the gradient sums repeated rows (float64 loop); on the
    CUDA branch the backward is advanced indexing's (index_put_ accumulate), on CPU
    index_select's, so CPU gradients stay what they were."""
    if cuda_branch:
        monkeypatch.setattr(fixed_order, "uses_sorted_add", lambda t: True)
    g = torch.Generator().manual_seed(0)
    src = torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True)
    index = torch.tensor([4, 0, 4, 4, 2, 0])
    out = fixed_order.gather_rows(src, index)
    assert torch.equal(out, src.detach().index_select(0, index))
    want_fn = "IndexBackward0" if cuda_branch else "IndexSelectBackward0"
    assert out.grad_fn.name() == want_fn
    w = torch.randn(6, 3, generator=g, dtype=F64)
    (grad,) = torch.autograd.grad((out * w).sum(), src)
    assert torch.allclose(grad, _loop_scatter(5, index, w), rtol=0, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(1, 6),
    picks=st.lists(st.integers(0, 5), min_size=0, max_size=12),
    cuda_branch=st.booleans(),
)
def test_scatter_add_rows_matches_a_loop(size, picks, cuda_branch):
    """Values and the gradient with respect to src (a gather) against float64 loops, with
    repeated, missing and no indices, on both branches."""
    index = torch.tensor([p % size for p in picks], dtype=torch.long)
    src = torch.randn(len(picks), 2, dtype=F64, requires_grad=True)
    with pytest.MonkeyPatch.context() as mp:
        if cuda_branch:
            mp.setattr(fixed_order, "uses_sorted_add", lambda t: True)
        out = fixed_order.scatter_add_rows(size, index, src)
    assert out.shape == (size, 2) and out.dtype == F64
    assert torch.allclose(out, _loop_scatter(size, index, src.detach()), rtol=0, atol=1e-14)
    if len(picks):
        w = torch.randn(size, 2, dtype=F64)
        (grad,) = torch.autograd.grad((out * w).sum(), src)
        assert torch.equal(grad, w[index])


def test_center_losses_take_the_fixed_order_forms_on_cuda(monkeypatch):
    """center_loss's center gather, the standalone loss's mined pairs (gathers and the
    per-anchor sum) and the center gradient: on the CUDA branch they run through
    index_put_ with accumulate (recorded), and the values and gradients equal the CPU
    branch's in float64 (repeated labels and anchors)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g, dtype=F64, requires_grad=True)
    centers = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 2, 1, 0, 3])
    anchors = torch.tensor([0, 0, 1, 1, 1, 5, 0])
    refs = torch.tensor([1, 4, 0, 4, 6, 2, 1])  # (0, 1) twice: counted once

    def run():
        per = center_loss(x, centers, labels)
        intra, inter = standalone_center_loss(x, centers, labels, negative_pairs=(anchors, refs))
        total = per.sum() + intra.sum() + inter.sum()
        return (per, intra, inter), torch.autograd.grad(total, (x, centers))

    cpu_values, cpu_grads = run()
    calls = take_cuda_branch(monkeypatch, "add_rows_deterministic_")
    cuda_values, cuda_grads = run()
    assert len(calls) == 1 and calls[0].out_shape == (7,)  # the inter term's per-anchor sum
    assert torch.equal(calls[0].index, torch.unique(anchors * 7 + refs) // 7)
    for a, b in zip(cpu_values + cpu_grads, cuda_values + cuda_grads):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)
    # The center gradient: 2 (c_j - x_i) summed over each class's samples, twice (center
    # loss and the intra term).
    want = torch.zeros(4, 3, dtype=F64)
    for i, j in enumerate(labels.tolist()):
        want[j] += 4.0 * (centers[j] - x[i]).detach()
    assert torch.allclose(cuda_grads[1], want, rtol=1e-13, atol=1e-13)


def test_scatter_logsumexp_takes_the_fixed_order_sum_on_cuda(monkeypatch):
    """The mined pair loss's per-bin logsumexp: the bins' sums go through the fixed-order
    add on CUDA (recorded), the values and the gradient (softmax within each bin) equal a
    float64 reference."""
    values = torch.tensor([0.5, -1.0, 2.0, 0.25, 3.0], dtype=F64, requires_grad=True)
    index = torch.tensor([2, 0, 2, 2, 0])
    calls = take_cuda_branch(monkeypatch, "add_rows_deterministic_")
    lse, has = scatter_logsumexp(values, index, 4)
    assert len(calls) == 1 and torch.equal(calls[0].index, index)
    v = values.detach()
    want = torch.stack(
        [torch.logsumexp(v[[1, 4]], 0), torch.tensor(0.0, dtype=F64),
         torch.logsumexp(v[[0, 2, 3]], 0), torch.tensor(0.0, dtype=F64)]
    )  # fmt: skip
    assert has.tolist() == [True, False, True, False]
    assert torch.allclose(lse, want, rtol=0, atol=1e-14)
    (grad,) = torch.autograd.grad(lse.sum(), values)
    soft = torch.empty(5, dtype=F64)
    soft[[1, 4]] = torch.softmax(v[[1, 4]], 0)
    soft[[0, 2, 3]] = torch.softmax(v[[0, 2, 3]], 0)
    assert torch.allclose(grad, soft, rtol=0, atol=1e-14)


def test_cpu_branch_never_calls_the_sorted_add(monkeypatch):
    """On CPU every one of these is the plain index_add_ / index_select."""
    calls = record_only(monkeypatch, "add_rows_deterministic_")
    x = torch.randn(5, 2, dtype=F64, requires_grad=True)
    fixed_order.scatter_add_rows(3, torch.tensor([0, 2, 2, 1, 0]), x).sum().backward()
    assert fixed_order.gather_rows(x, torch.tensor([1, 1])).grad_fn.name() == "IndexSelectBackward0"
    assert calls == []
