"""StandaloneCenterLoss returns a float32 loss under autocast, like the other losses.

PML's MultipleReducers adds the two sub-losses (intra, inter) in a tensor of the
embeddings' dtype; with bf16 embeddings that rounded the float32 terms to bf16.
"""

from __future__ import annotations

import torch

from pml_extras.losses import StandaloneCenterLoss


def _case():
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 6)
    x = torch.randn(12, 7)
    y = torch.arange(12) % 4
    loss = StandaloneCenterLoss(4, 6, intra_weight=1.0, inter_weight=0.37)
    return model, x, y, loss


def test_float32_loss_under_cpu_bf16_autocast_equals_the_float64_sum():
    model, x, y, loss = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model(x)
        assert emb.dtype == torch.bfloat16  # the case that rounded
        value = loss(emb, y)
    assert value.dtype == torch.float32
    # Reference: the same two float32 terms, added in float64 (no bf16 rounding).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss.compute_loss(emb, y, None, emb, y)
    expected = sum(terms[k]["losses"].double().mean() for k in ("intra_loss", "inter_loss"))
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6)
    value.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
    assert loss.centers.dtype == torch.float32  # the user's parameters are untouched


def test_bf16_embeddings_without_autocast_still_float32():
    _, _, y, loss = _case()
    emb = torch.randn(12, 6).bfloat16().requires_grad_(True)
    value = loss(emb, y)
    assert value.dtype == torch.float32
    value.backward()
    assert emb.grad.dtype == torch.bfloat16
