"""The mined path's chunked pair similarity and gather loss (pml_extras.ops.pair_gather): equal
to the direct (P, D) gather, chunk-size independent, never materialising (P, D)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pair_circle_cases import (
    HYPO,
    MINED_PATHS,
    assert_close,
    grads,
    make_batch,
    random_subset_miner,
)
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from sorted_add import record_only, take_cuda_branch

from pml_extras.ops.fixed_order import add_rows_, add_rows_deterministic_
from pml_extras.ops.pair_circle import (
    mined_pairs_circle_loss,
    pair_similarity,
    resolve_pair_chunk,
)

# ---------------------------------------------------------------------------------------------
# Chunked pair similarity of the mined path: equal to the direct (P, D) gather


def direct_similarity(x, y, rows, cols):
    """The O(P * D) formula the chunked op replaces."""
    return (x[rows] * y[cols]).sum(dim=1)


def pair_case(num_pairs, same, seed, dtype=torch.float64, batch=9, num_refs=7, dim=5):
    """Random pairs with repeats and, when y is x, self-pairs (i, i) forced in."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    y = x if same else torch.randn(num_refs, dim, generator=gen, dtype=torch.float64).to(dtype)
    rows = torch.randint(0, batch, (num_pairs,), generator=gen)
    cols = torch.randint(0, y.shape[0], (num_pairs,), generator=gen)
    if num_pairs >= 6:
        rows[:3], cols[:3] = 1, y.shape[0] - 1  # one pair three times
        if same:
            cols[3:6] = rows[3:6]  # self-pairs
    return x, y, rows, cols


def check_against_direct(x, y, rows, cols, chunk, rel=1e-12):
    """Values and gradients (w.r.t. x and, if separate, y) against the direct gather."""
    same = y is x
    xs = x.detach().clone().requires_grad_()
    ys = xs if same else y.detach().clone().requires_grad_()
    xd = x.detach().double().requires_grad_()
    yd = xd if same else y.detach().double().requires_grad_()
    s = pair_similarity(xs, ys, rows, cols, chunk_size=chunk)
    ref = direct_similarity(xd, yd, rows, cols)
    assert s.shape == ref.shape and s.dtype == torch.promote_types(x.dtype, torch.float32)
    assert_close(s, ref, rel)
    # a non-uniform upstream gradient, so each pair's contribution is checked
    w = torch.linspace(-1.0, 2.0, len(rows), dtype=torch.float64)
    ours_in, ref_in = ([xs], [xd]) if same else ([xs, ys], [xd, yd])
    for a, b in zip(grads((s.double() * w).sum(), ours_in), grads((ref * w).sum(), ref_in)):
        assert a.dtype == x.dtype
        assert_close(a, b, rel)
    return s


@pytest.mark.parametrize("same", [False, True], ids=["x_y", "y_is_x"])
@pytest.mark.parametrize("chunk", [1, 7, 41, 100, None], ids=lambda c: f"chunk{c}")
def test_pair_similarity_matches_direct_gather(chunk, same):
    # P = 41 pairs: 7 does not divide it, 41 is exactly P, 100 exceeds it
    x, y, rows, cols = pair_case(41, same, seed=20)
    assert (rows[:3] == 1).all() and ((rows == cols).any() or not same)
    check_against_direct(x, y, rows, cols, chunk)


@HYPO
@given(
    st.integers(0, 30),
    st.integers(1, 35),
    st.booleans(),
    st.integers(0, 2**16),
    st.integers(1, 6),
)
def test_hypothesis_pair_similarity_any_chunk(num_pairs, chunk, same, seed, dim):
    x, y, rows, cols = pair_case(num_pairs, same, seed, batch=5, num_refs=4, dim=dim)
    check_against_direct(x, y, rows, cols, chunk)


def test_pair_similarity_only_one_side_requires_grad():
    x, y, rows, cols = pair_case(23, False, seed=21)
    y.requires_grad_()
    s = pair_similarity(x, y, rows, cols, chunk_size=4)
    (g,) = grads((s * torch.arange(23.0, dtype=torch.float64)).sum(), [y])
    yd = y.detach().requires_grad_()
    ref = direct_similarity(x, yd, rows, cols)
    (g_ref,) = grads((ref * torch.arange(23.0, dtype=torch.float64)).sum(), [yd])
    assert_close(g, g_ref)
    assert x.grad is None


def test_pair_similarity_gradcheck():
    x, y, rows, cols = pair_case(11, False, seed=22, batch=4, num_refs=3, dim=3)
    x.requires_grad_()
    y.requires_grad_()
    # chunks of 4 over 11 pairs with repeats: the scatter-add must sum across chunks
    assert torch.autograd.gradcheck(
        lambda a, b: pair_similarity(a, b, rows, cols, chunk_size=4), (x, y)
    )
    xs, _, rs, cs = pair_case(11, True, seed=23, batch=4, dim=3)
    xs.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pair_similarity(a, a, rs, cs, chunk_size=3), (xs,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pair_similarity_no_pairs(dtype):
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    s = pair_similarity(x, x, empty, empty, chunk_size=2)
    assert s.shape == (0,) and s.dtype == torch.promote_types(dtype, torch.float32)
    s.sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# The gradient scatter's fixed-order add (CUDA branch), run on CPU


@HYPO
@given(
    st.integers(0, 40),  # K rows to add: 0 is the empty index
    st.integers(1, 5),  # N output rows: few, so that indices repeat
    st.integers(1, 6),  # D
    st.sampled_from(["contiguous", "transposed", "strided"]),
    st.booleans(),  # an int32 index, which index_add_ also takes
    st.integers(0, 2**31 - 1),
)
def test_deterministic_row_add_matches_index_add(K, N, D, layout, int32, seed):
    """add_rows_deterministic_ (index_put_ with accumulate=True: the CUDA branch of
    add_rows_), called directly on CPU, equals index_add_ along dim 0 in float64 with
    repeated indices, an empty index and non-contiguous src; it writes in place and
    returns its output."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(N, D, dtype=torch.float64, generator=g)
    index = torch.randint(0, N, (K,), generator=g)
    if int32:
        index = index.int()
    if layout == "transposed":
        src = torch.randn(D, K, dtype=torch.float64, generator=g).t()
    elif layout == "strided":
        src = torch.randn(K, 2 * D, dtype=torch.float64, generator=g)[:, ::2]
    else:
        src = torch.randn(K, D, dtype=torch.float64, generator=g)
    if layout != "contiguous" and K > 1 and D > 1:
        assert not src.is_contiguous()
    ref = out.clone().index_add_(0, index, src)
    got = out.clone()
    assert add_rows_deterministic_(got, index, src) is got
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if K == 0:
        assert torch.equal(got, out)


def test_row_add_is_index_add_on_cpu():
    """On CPU add_rows_ is index_add_ bit for bit (the CPU numbers do not change); the
    deterministic form agrees in bf16 to its rounding."""
    g = torch.Generator().manual_seed(3)
    index = torch.tensor([0, 2, 2, 0, 1, 2, 2, 2, 2])
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.randn(3, 5, generator=g).to(dtype)
        src = torch.randn(9, 5, generator=g).to(dtype)
        got = add_rows_(out.clone(), index, src)
        assert got.dtype == dtype and torch.equal(got, out.clone().index_add_(0, index, src))
    exact = out.double().index_add_(0, index, src.double())
    det = add_rows_deterministic_(out.clone(), index, src)
    assert det.dtype == torch.bfloat16
    torch.testing.assert_close(det.double(), exact, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("same", [False, True], ids=["x_y", "y_is_x"])
def test_pair_similarity_backward_uses_the_sorted_add_on_cuda(monkeypatch, same):
    """With the tensors counted as CUDA, the backward scatters every chunk of pair
    gradients through add_rows_deterministic_ (one call per chunk and side) and still
    equals the float64 direct gather; on CPU it never calls it."""
    x, y, rows, cols = pair_case(41, same, seed=25)
    cpu_calls = record_only(monkeypatch, "add_rows_deterministic_")
    check_against_direct(x, y, rows, cols, chunk=7)
    assert cpu_calls == []
    calls = take_cuda_branch(monkeypatch, "add_rows_deterministic_")
    check_against_direct(x, y, rows, cols, chunk=7)
    sides = 2  # grad_x and grad_y (one shared buffer when y is x)
    assert len(calls) == sides * 6  # ceil(41 / 7) = 6 chunks
    assert all(c.dtype == torch.float64 and c.src_shape[1] == x.shape[1] for c in calls)
    assert torch.equal(torch.cat([c.index for c in calls[0::2]]), rows)  # into grad_x
    assert torch.equal(torch.cat([c.index for c in calls[1::2]]), cols)  # into grad_y


def half_accumulation_case(dtype, same):
    """Random pairs plus 2000 pairs on anchor 0, whose gradient then sums 2000 terms."""
    x, y, rows, cols = pair_case(300, same, seed=24, dtype=dtype, batch=6, num_refs=5, dim=16)
    rows = torch.cat([rows, torch.zeros(2000, dtype=torch.long)])
    cols = torch.cat([cols, torch.arange(2000) % y.shape[0]])
    return x, y, rows, cols


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("same", [False, True], ids=["x_y", "y_is_x"])
def test_pair_similarity_half_accumulates_in_float32(dtype, same):
    # Same half-precision values in float64: the dot products and the scatter-adds differ only
    # by float32 rounding, then the gradient is rounded once to the half dtype.
    x, y, rows, cols = half_accumulation_case(dtype, same)
    xs = x.clone().requires_grad_()
    ys = xs if same else y.clone().requires_grad_()
    s = pair_similarity(xs, ys, rows, cols, chunk_size=8)
    assert s.dtype == torch.float32
    xd = x.double().requires_grad_()
    yd = xd if same else y.double().requires_grad_()
    ref = direct_similarity(xd, yd, rows, cols)
    torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=1e-6)
    ours_in, ref_in = ([xs], [xd]) if same else ([xs, ys], [xd, yd])
    for a, b in zip(grads(s.sum(), ours_in), grads(ref.sum(), ref_in)):
        assert a.dtype == dtype
        # within one half-precision rounding of the exact gradient
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(a.double(), b, rtol=ulp, atol=ulp * b.abs().max().item())


def test_pair_similarity_half_is_not_accumulated_in_half():
    # guards the test above: chunk-by-chunk scatter-adds into a half-precision buffer (what
    # the op would do without its float32 buffer) miss that tolerance on the same data
    x, y, rows, cols = half_accumulation_case(torch.float16, same=False)
    terms = y[cols]
    half_acc = torch.zeros_like(x)
    for c0 in range(0, len(rows), 8):
        half_acc.index_add_(0, rows[c0 : c0 + 8], terms[c0 : c0 + 8])
    exact = torch.zeros(x.shape, dtype=torch.float64).index_add_(0, rows, terms.double())
    err = (half_acc.double() - exact).abs().max().item()
    assert err > 2 * torch.finfo(torch.float16).eps * exact.abs().max().item()


def test_pair_similarity_bad_input():
    x = torch.randn(4, 3)
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="chunk_size"):
        pair_similarity(x, x, idx, idx, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        resolve_pair_chunk(2.5, 10, 3)
    with pytest.raises(ValueError, match=r"col index 4 is out of range \[0, 4\)"):
        pair_similarity(x, x, idx, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="row index -1"):
        pair_similarity(x, x, torch.tensor([-1, 0]), idx)
    with pytest.raises(ValueError, match="equal lengths"):
        pair_similarity(x, x, idx, torch.tensor([0]))
    with pytest.raises(ValueError, match="x and y"):
        pair_similarity(x, torch.randn(4, 2), idx, idx)
    assert resolve_pair_chunk(None, 10, 3) == 10
    assert resolve_pair_chunk(None, 10**9, 128) * 128 <= 1 << 22


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_mined_loss_chunk_size_independent(chunk):
    emb, labels = make_batch(13, 6, 3, seed=26)
    ref_emb, ref_labels = make_batch(11, 6, 3, seed=27)
    indices = lmu.get_all_triplets_indices(labels, ref_labels)  # (a, p) pairs repeat
    pairs = lmu.convert_to_pairs(indices, labels, ref_labels)

    def loss(chunk_size):
        x = torch.nn.functional.normalize(emb, dim=1)
        y = torch.nn.functional.normalize(ref_emb, dim=1)
        return mined_pairs_circle_loss(x, y, *pairs, m=0.25, gamma=128.0, chunk_size=chunk_size)

    base, out = loss(None), loss(chunk)
    assert (base > 0).any()
    assert_close(out, base)
    w = torch.linspace(0.5, 1.5, 13, dtype=torch.float64)
    for a, b in zip(
        grads((out * w).sum(), [emb, ref_emb]), grads((base * w).sum(), [emb, ref_emb])
    ):
        assert_close(a, b)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("path", MINED_PATHS)
@pytest.mark.parametrize("same", [False, True], ids=["ref_emb", "self"])
def test_mined_loss_never_materialises_pairs_by_dim(same, path):
    # Deterministic stand-in for the memory benchmark: with every pair mined, no tensor of
    # the forward or backward may be as large as the (P, D) gathers of the direct formula;
    # the dense path's largest are its (B, N) boolean masks.
    batch, dim, chunk = 40, 32, 16
    emb, labels = make_batch(batch, dim, 5, seed=28)
    if same:
        ref_emb, ref_labels = emb, labels
        pairs = lmu.get_all_pairs_indices(labels)
    else:
        ref_emb, ref_labels = make_batch(batch, dim, 5, seed=29)
        pairs = lmu.get_all_pairs_indices(labels, ref_labels)
    num_pairs = sum(len(t) for t in pairs[::2])
    x = torch.nn.functional.normalize(emb, dim=1)
    y = x if same else torch.nn.functional.normalize(ref_emb, dim=1)
    mode = _LargestTensor()
    with mode:
        losses = mined_pairs_circle_loss(
            x, y, *pairs, chunk_size=chunk, block_size=(8, 16), path=path
        )
        losses.sum().backward()
    assert (losses > 0).any() and emb.grad.abs().sum() > 0
    bound = max(num_pairs, batch * batch, batch * dim, chunk * dim)
    assert num_pairs * dim > 4 * bound  # the bound separates O(P) from O(P * D)
    assert mode.largest <= bound


def test_deprecated_sparse_path_is_the_gather_path():
    """path="sparse" (the gather path's old name) still works, warns, and gives the
    gather path's numbers bit for bit; "sparse" now names only the class-level loss."""
    emb, labels = make_batch(17, 8, 3, seed=41)
    a1, p, a2, n = random_subset_miner(0.05, seed=42, duplicates=True)(emb, labels)
    x = torch.nn.functional.normalize(emb, dim=1)
    new = mined_pairs_circle_loss(x, x, a1, p, a2, n, m=0.25, gamma=64.0, path="gather")
    with pytest.warns(DeprecationWarning, match="path='gather'"):
        old = mined_pairs_circle_loss(x, x, a1, p, a2, n, m=0.25, gamma=64.0, path="sparse")
    assert torch.equal(old, new) and (new > 0).any()
    with pytest.raises(ValueError, match="'blockwise'"):
        mined_pairs_circle_loss(x, x, a1, p, a2, n, path="blockwise")
