"""Shared by the ArcFace / CosFace tests (tests/losses/test_margin_losses*.py,
test_proxy_loss_base.py): our and PML's modules by kind, and comparison helpers."""

from __future__ import annotations

import math
import os

import torch
from pytorch_metric_learning import losses as pml_losses

from pml_extras.functional import arcface_loss, cosface_loss
from pml_extras.losses import ArcFaceLoss, CosFaceLoss

F64 = torch.float64
KINDS = ("arcface", "cosface")
OURS = {"arcface": ArcFaceLoss, "cosface": CosFaceLoss}
PML = {"arcface": pml_losses.ArcFaceLoss, "cosface": pml_losses.CosFaceLoss}
# The module's margin argument (degrees for ArcFace, as in PML) and the functional's.
PAPER_MARGIN = {"arcface": 28.6, "cosface": 0.35}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def functional_margin(kind, margin):
    """The functional's margin (radians for ArcFace) from the module's."""
    return math.radians(margin) if kind == "arcface" else margin


def functional(kind):
    return arcface_loss if kind == "arcface" else cosface_loss


def make_loss(kind, W, pml=False, margin=None, **kwargs):
    D, C = W.shape
    cls = PML[kind] if pml else OURS[kind]
    margin = PAPER_MARGIN[kind] if margin is None else margin
    loss_fn = cls(C, D, margin=margin, **kwargs).to(W.dtype)
    with torch.no_grad():
        loss_fn.W.copy_(W)
    return loss_fn


def per_sample(loss_fn, x, y, indices_tuple=None):
    return loss_fn.compute_loss(x, y, indices_tuple, x, y)["loss"]["losses"]


def value_and_grads(fn, *inputs, seed=123):
    """fn(*inputs) -> (B,); value and gradients of a randomly weighted sum of it."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(out.shape, generator=g, dtype=F64) + 0.5).to(out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    return out.detach(), grads


def assert_close(a, b, rtol, atol=None, what=""):
    a, b = torch.as_tensor(a).detach().to(F64), torch.as_tensor(b).detach().to(F64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if atol is None:  # relative to the largest entry of the expected tensor
        atol = rtol * max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def boundary_labels(y, C, chunk):
    """Put labels on the first/last class of a chunk and of the whole range."""
    y = y.clone()
    special = [0, chunk - 1, chunk, 2 * chunk - 1, C - 1]
    for i, lab in enumerate(special[: y.shape[0]]):
        y[i] = min(lab, C - 1)
    return y


B_, D_, C_ = 24, 8, 5


def clustered_batch(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(B_) % C_
    centers = torch.randn(C_, D_, generator=g, dtype=F64)
    x = torch.randn(B_, D_, generator=g, dtype=F64) + 2.0 * centers[y]
    return x.to(dtype), y
