"""Spread class proxies: C unit vectors in R^D with a large minimum pairwise angle.

Class-proxy losses started from random Gaussian proxies can fold several classes onto one
direction when D is small (2-D, 3-D): the layouts that random starts reach have higher
loss than a spread one, and at the papers' scales the optimiser does not leave them.
Starting from a spread layout removes that trap. In high dimensions random Gaussian
proxies are already nearly orthogonal, so this only matters where D is small for C.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

# Above this many classes the O(C^2 D) repulsion is too slow for a constructor; the
# proxies stay normalised Gaussian (see spread_proxies).
MAX_REPULSION_CLASSES = 2048


def spread_proxies(
    num_classes: int,
    embedding_size: int,
    steps: int = 400,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """(D, C) float64 unit columns spread over the sphere S^(D-1).

    - D >= C: orthonormal columns (QR of a Gaussian matrix), pairwise angle 90 degrees.
    - D = 2: the regular C-gon at a random rotation (the optimum, 360/C degrees apart).
    - otherwise, C <= 2048: a short repulsion from a Gaussian start, projected gradient
      descent on the soft maximum of the pairwise cosines,
      ``(1/tau) * log sum_{i<j} exp(tau * <w_i, w_j>)``, with tau rising from 10 to 400
      (a smooth form of the Tammes problem: maximise the minimum angle). It reaches the
      known optima of small cases: 6 points in 3-D give the octahedron (90 degrees), 12
      the icosahedron (63.43 degrees).
    - otherwise: normalised Gaussian columns.

    Random draws come from ``generator`` (default: torch's global generator), so
    ``torch.manual_seed`` makes the layout reproducible, as with PML's default init.

    Example:
        >>> w = spread_proxies(10, 3)  # (3, 10), minimum angle ~66 degrees (Tammes)
    """
    c, d = int(num_classes), int(embedding_size)
    g = torch.randn(d, max(c, 1), dtype=torch.float64, generator=generator)[:, :c]
    if c == 0:
        return g
    if d >= c:
        q, r = torch.linalg.qr(g)
        # Sign fix: makes the draw a uniformly random orthonormal frame.
        return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
    if d == 1:
        return torch.sign(g).where(g != 0, 1.0)
    if d == 2:
        phase = float(torch.rand((), dtype=torch.float64, generator=generator)) * 2 * math.pi
        angles = phase + 2 * math.pi * torch.arange(c, dtype=torch.float64) / c
        return torch.stack([torch.cos(angles), torch.sin(angles)])
    w = torch.nn.functional.normalize(g, dim=0)
    if c > MAX_REPULSION_CLASSES:
        return w
    return _repel(w, steps)


def _repel(w: Tensor, steps: int) -> Tensor:
    """Projected gradient descent of the soft max of pairwise cosines over unit columns."""
    c = w.shape[1]
    off = ~torch.eye(c, dtype=torch.bool)
    w = w.clone().requires_grad_(True)
    with torch.enable_grad():  # spread_init_ runs under no_grad, as PML's inits do
        return _descend(w, steps, off)


def _descend(w: Tensor, steps: int, off: Tensor) -> Tensor:
    for step in range(steps):
        tau = 10.0 * 40.0 ** (step / max(1, steps - 1))
        cos = (w.t() @ w)[off]
        energy = torch.logsumexp(tau * cos, 0) / tau
        (grad,) = torch.autograd.grad(energy, w)
        with torch.no_grad():
            # Tangent component only; a step of at most ~1 degree per column, shrinking.
            grad = grad - (grad * w).sum(0, keepdim=True) * w
            norm = grad.norm(dim=0, keepdim=True).max().clamp_min(1e-30)
            lr = 0.02 * (1.0 - 0.9 * step / max(1, steps - 1))
            w -= lr * grad / norm
            w.copy_(torch.nn.functional.normalize(w, dim=0))
    return w.detach()


def min_pairwise_angle(w: Tensor) -> float:
    """Smallest angle in degrees between two columns of ``w`` (D, C)."""
    u = torch.nn.functional.normalize(w.detach().to(torch.float64), dim=0)
    cos = u.t() @ u
    cos.fill_diagonal_(-1.0)
    return math.degrees(math.acos(float(cos.max().clamp(-1.0, 1.0))))


@torch.no_grad()
def spread_init_(weight: Tensor, length: Optional[float] = None) -> Tensor:
    """PML ``weight_init_func``: fill proxies ``weight`` (D, C) in place with a spread
    layout (:func:`spread_proxies`), keeping its dtype and device.

    Only the directions are spread. ``length=None`` gives each column the length of a
    ``normal_`` draw (~sqrt(D)), as PML's init does; a number gives every column that
    length. The length sets how fast a proxy turns: Adam moves it by ~lr per coordinate,
    so its angular step is ~lr * sqrt(D) / |w|. The low-dimensional rule uses short
    proxies (:data:`~pml_extras.losses._low_dim.LOW_DIM_PROXY_LENGTH`, see
    :func:`~pml_extras.losses.auto_proxy_init_`).

    Example:
        >>> loss_fn = pml_extras.losses.ArcFaceLoss(10, 3, weight_init_func=spread_init_)
    """
    d, c = weight.shape
    directions = spread_proxies(c, d)
    if length is None:
        lengths = torch.randn(d, c, dtype=torch.float64).norm(dim=0, keepdim=True)
    else:
        if not (isinstance(length, (int, float)) and math.isfinite(length) and length > 0):
            raise ValueError(f"spread_init_: length must be a positive number, got {length!r}")
        lengths = float(length)
    weight.copy_((directions * lengths).to(weight.dtype))
    return weight
