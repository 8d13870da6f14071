"""Shared by the pair-level Circle tests (tests/losses/test_pair_circle_*.py,
tests/ops/test_pair_gather.py): PML's CircleLoss as the reference, and batch makers."""

from __future__ import annotations

import torch
from hypothesis import settings
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_extras.losses.circle_loss import CircleLoss

PAPER_SETTINGS = [(0.25, 256.0), (0.25, 128.0), (0.4, 80.0)]  # face, re-ID, fine-grained
# example counts and derandomisation come from the profile in conftest.py
HYPO = settings(deadline=None)


def per_element(out, batch_size):
    """Per-anchor losses from a DoNothingReducer output, as a flat (B,) tensor."""
    losses = out["loss"]["losses"]
    if not torch.is_tensor(losses):  # PML's zero_losses() shortcut
        return torch.zeros(batch_size, dtype=torch.float64)
    return losses.reshape(-1)


def grads(value, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(value, tensors, allow_unused=True, materialize_grads=True)


def assert_close(actual, expected, rel=1e-9):
    """Elementwise closeness with an absolute slack scaled to the tensor's magnitude."""
    actual, expected = actual.double(), expected.double()
    scale = 1.0 + expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def compare_with_pml(
    emb,
    labels,
    *,
    m=0.4,
    gamma=80.0,
    block_size=None,
    indices_tuple=None,
    ref_emb=None,
    ref_labels=None,
    rel=1e-9,
    pml_emb=None,
    pml_ref_emb=None,
    mined_path="auto",
):
    """Check per-element losses, reduced loss and their gradients against PML's CircleLoss.

    ``pml_emb`` / ``pml_ref_emb`` let PML run on a float32 copy of half-precision inputs;
    ``mined_path`` forces the dense or gather evaluation of mined pairs.
    """
    pml_emb = emb if pml_emb is None else pml_emb
    pml_ref_emb = ref_emb if pml_ref_emb is None else pml_ref_emb
    ours_in, pml_in = [emb, ref_emb], [pml_emb, pml_ref_emb]
    kw = dict(indices_tuple=indices_tuple, ref_labels=ref_labels)
    batch = emb.shape[0]

    ours = ours_loss(m, gamma, block_size, mined_path, reducer=reducers.DoNothingReducer())
    theirs = pml_losses.CircleLoss(m=m, gamma=gamma, reducer=reducers.DoNothingReducer())
    la = per_element(ours(emb, labels, ref_emb=ref_emb, **kw), batch)
    lb = per_element(theirs(pml_emb, labels, ref_emb=pml_ref_emb, **kw), batch)
    assert la.shape == (batch,)
    assert_close(la, lb, rel)
    if la.requires_grad and lb.requires_grad:
        # a weighted sum exercises every row's gradient, not just their total
        w = torch.linspace(0.5, 1.5, batch, dtype=torch.float64)
        ga = grads((la.double() * w).sum(), ours_in)
        gb = grads((lb.double() * w).sum(), pml_in)
        for a, b in zip(ga, gb):
            assert a.dtype == emb.dtype
            assert_close(a, b, rel)

    ra = ours_loss(m, gamma, block_size, mined_path)(emb, labels, ref_emb=ref_emb, **kw)
    rb = pml_losses.CircleLoss(m=m, gamma=gamma)(pml_emb, labels, ref_emb=pml_ref_emb, **kw)
    assert ra.ndim == 0
    assert_close(ra, rb, rel)
    if ra.requires_grad:
        for a, b in zip(grads(ra, ours_in), grads(rb, pml_in)):
            assert_close(a, b, rel)
    return la


def ours_loss(m, gamma, block_size, mined_path, **kwargs):
    fn = CircleLoss(m=m, gamma=gamma, block_size=block_size, **kwargs)
    fn._mined_path = mined_path
    return fn


def make_batch(batch, dim, num_classes, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return emb.requires_grad_(), labels


MINED_PATHS = ["dense", "gather"]


def random_subset_miner(density, seed, duplicates=True):
    """Keeps each of all the pairs with probability ``density``; re-mines some of them."""

    def mine(emb, labels, ref_emb=None, ref_labels=None):
        gen = torch.Generator().manual_seed(seed)
        picked = []
        for rows, cols in (
            lmu.get_all_pairs_indices(labels, ref_labels)[i : i + 2] for i in (0, 2)
        ):
            keep = torch.rand(len(rows), generator=gen) < density
            rows, cols = rows[keep], cols[keep]
            if duplicates and len(rows):
                again = torch.randint(0, len(rows), (len(rows) // 3,), generator=gen)
                rows, cols = torch.cat([rows, rows[again]]), torch.cat([cols, cols[again]])
            picked += [rows, cols]
        return tuple(picked)

    return mine
