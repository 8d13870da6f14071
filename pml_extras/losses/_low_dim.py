"""The low-dimensional rule: when the papers' logit scales stop working, and what replaces them.

The papers' scales (CircleLoss gamma=256, CurricularFace/ArcFace/CosFace s=64) were tuned
for face recognition, where the embedding is high-dimensional for its number of classes:
C random proxies in R^D are then nearly orthogonal, so every non-target logit starts near
cos = 0 (the assumption of AdaCos's derivation too). In 2-D or 3-D no layout of 10 proxies
is nearly orthogonal; at those scales the loss saturates while classes are still folded
onto shared directions and training stops there (digits 3-D: 0.68 accuracy vs softmax's
0.91). AdaCos's fixed scale keeps every sample's gradient alive instead.

The rule ("auto"):

    low-dimensional  <=>  sqrt(2 * ln(C * (C - 1)) / D) > cos(45 deg)
                     <=>  D < 4 * ln(C * (C - 1))

The left side is the Gaussian estimate of the largest |cos| among the C(C-1)/2 pairs of
C random proxies (each cosine ~ N(0, 1/D)); above cos(45 deg) some random classes start
closer than the angle at which AdaCos puts the target's probability at 1/2. Then

    scale = sqrt(2) * ln(C - 1)     (AdaCos fixed scale, Zhang et al., CVPR 2019)

With c* the largest pairwise cosine of the best spread of C points on S^(D-1) and
theta* = acos(c*) its smallest angle, Circle loss's margin becomes
m = min(max(0.25, c*), 1/2) (:func:`resolve_circle_margin`), CurricularFace's angular
margin min(0.5, theta*/2) (:func:`resolve_angular_margin`; it changes only in 2-D for
C=10), and the proxies start spread (CurricularFace's short, :func:`auto_proxy_init_`,
so that they take the class arrangement the network gives; SparseCircle's with
``normal_`` lengths, :func:`circle_proxy_init_`). Otherwise the paper's values are used
and the proxies start as PML's (normal_). Examples: C=10 is low-dimensional below D=18
(s = 3.11); C=1M, D=512 is not (threshold 110.5), so face recognition keeps s=64 /
gamma=256 and the Gaussian init exactly; 128-D stays on the paper path up to C ~ 9M.

Measured (3 seeds, benchmarks/results/lowdim), accuracy against softmax's: 3-D digits
CurricularFace 0.925 and SparseCircle 0.897 vs 0.909 (paper values 0.681, 0.677);
Fashion-MNIST 2-D CurricularFace 0.846 vs 0.869 (paper values 0.432); 128-D identical
to the paper values (the same code path). Recommended: keep "auto"; pass the paper's
numbers to reproduce a paper.

Example:
    >>> resolve_scale("auto", 64.0, 10, 3, "CurricularFaceLoss")  # AdaCos: 3.107...
    >>> resolve_scale("auto", 64.0, 10**6, 512, "CurricularFaceLoss")  # 64.0
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import _common
from ._spread import MAX_REPULSION_CLASSES, spread_init_, spread_proxies

AUTO = "auto"

# Length of every proxy the rule's init draws when low-dimensional (auto_proxy_init_).
LOW_DIM_PROXY_LENGTH = 0.05


def low_dim_threshold(num_classes: int) -> float:
    """D below which C classes count as low-dimensional: 4 * ln(C * (C - 1)); 0 for C=1."""
    c = int(num_classes)
    return 4.0 * math.log(c * (c - 1)) if c >= 2 else 0.0


def is_low_dimensional(num_classes: int, embedding_size: int) -> bool:
    """True when D < 4 * ln(C * (C - 1)) (module docstring)."""
    return embedding_size < low_dim_threshold(num_classes)


def adacos_scale(num_classes: int) -> float:
    """AdaCos fixed scale sqrt(2) * ln(C - 1), floored at sqrt(2) (C = 2, 3 would give
    0 and 0.98: a scale that low cannot separate even two classes)."""
    return math.sqrt(2.0) * max(math.log(max(int(num_classes) - 1, 1)), 1.0)


def cap_fraction(radius: float, embedding_size: int) -> float:
    """Fraction of the sphere S^(D-1) within angle ``radius`` of a point:
    int_0^r sin^(D-2) t dt / int_0^pi sin^(D-2) t dt (trapezoid, 4097 nodes)."""
    d = int(embedding_size)
    t = torch.linspace(0.0, math.pi, 4097, dtype=torch.float64)
    f = torch.sin(t) ** (d - 2)
    part = torch.trapezoid(f * (t <= radius), t)
    return float(part / torch.trapezoid(f, t))


def packing_bound_cosine(num_classes: int, embedding_size: int) -> float:
    """cos(theta) for the largest theta at which C caps of angular radius theta/2 fit in
    the sphere by area, C * cap_fraction(theta/2) = 1 (bisection). An upper bound on the
    Tammes angle; exact in 2-D (360/C degrees)."""
    c, d = int(num_classes), int(embedding_size)
    lo, hi = 0.0, math.pi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if c * cap_fraction(mid / 2, d) <= 1.0 else (lo, mid)
    return math.cos(lo)


@functools.lru_cache(maxsize=256)
def separation_cosine(num_classes: int, embedding_size: int) -> float:
    """c*: the largest pairwise cosine of the best spread of C unit vectors in R^D we
    construct. 0 when D >= C (orthonormal), cos(360/C deg) in 2-D, the result of
    :func:`~pml_extras.losses._spread.spread_proxies` (fixed seed) for C <= 2048, the
    area bound :func:`packing_bound_cosine` beyond; 1 when D = 1 and C > 2."""
    c, d = int(num_classes), int(embedding_size)
    if c < 2 or d >= c:
        return 0.0
    if d == 1:
        return 1.0 if c > 2 else -1.0
    if d == 2:
        return math.cos(2 * math.pi / c)
    if c > MAX_REPULSION_CLASSES:
        return packing_bound_cosine(c, d)
    w = spread_proxies(c, d, generator=torch.Generator().manual_seed(0))
    cos = w.t() @ w
    cos.fill_diagonal_(-1.0)
    return float(cos.max())


def is_auto(value, name: str, owner: str) -> bool:
    """True for ``"auto"``, False for a number; ValueError naming ``name`` otherwise."""
    if isinstance(value, str):
        if value != AUTO:
            raise ValueError(f"{owner}: {name} must be a number or 'auto', got {value!r}")
        return True
    return False


def resolve_scale(
    value: Union[float, str],
    paper: float,
    num_classes: int,
    embedding_size: int,
    owner: str,
    name: str = "scale",
) -> float:
    """``"auto"`` -> AdaCos scale when low-dimensional, else ``paper``; numbers unchanged.
    ``name`` is the argument's name in errors (``gamma`` for Circle loss)."""
    if not is_auto(value, name, owner):
        return float(value)
    _common.check_proxy_args(num_classes, embedding_size, owner)
    if is_low_dimensional(num_classes, embedding_size):
        return adacos_scale(num_classes)
    return float(paper)


def resolve_circle_margin(
    value: Union[float, str], paper: float, num_classes: int, embedding_size: int, owner: str
) -> float:
    """``"auto"`` -> min(max(paper, c*), 1/2) when low-dimensional (c*:
    :func:`separation_cosine`), else ``paper``; numbers unchanged.

    Why c*: Circle loss's negative threshold is Delta_n = m. With m = c*, a sample on its
    own proxy of the spread layout has every other class at or below Delta_n, so the
    spread layout is inside the decision region s_n^2 + (s_p - 1)^2 < 2 m^2 with a factor
    sqrt(2) to spare. Why at most 1/2: the zero-loss region s_p > 1 - m, s_n < m then
    holds correctly classified samples only (s_p > 1 - m >= m > s_n); past 1/2 it admits
    misclassified ones. Measured (digits, 3 seeds): 3-D m = 0.41 gives 0.90 accuracy,
    2-D m = c* = 0.81 gives 0.64 and m = 0.46 0.70."""
    if not is_auto(value, "m", owner):
        return float(value)
    _common.check_proxy_args(num_classes, embedding_size, owner)
    if is_low_dimensional(num_classes, embedding_size):
        return min(max(float(paper), separation_cosine(num_classes, embedding_size)), 0.5)
    return float(paper)


def resolve_angular_margin(
    value: Union[float, str], paper: float, num_classes: int, embedding_size: int, owner: str
) -> float:
    """``"auto"`` -> min(paper, theta*/2) when low-dimensional, theta* = acos(c*) the
    smallest pairwise angle of the best spread of C points on S^(D-1)
    (:func:`separation_cosine`), else ``paper``; numbers unchanged. In radians.

    Why theta*/2: an additive angular margin m asks theta_y + m < theta_j. Between two
    proxies theta* apart, the points that meet it against the neighbour lie within
    (theta* - m)/2 of their own proxy, out of the theta*/2 that the class's cell spans;
    m <= theta*/2 keeps at least half the cell. C=10: 2-D pi/10 = 0.314 (the paper's
    0.5 would leave a fifth of it), 3-D theta* = 66 deg, so 0.5 stays. Measured
    (CurricularFace, Fashion-MNIST 2-D, short spread proxies, 3 seeds, sweeps.md Sweep
    E): 0.838 with 0.5, 0.846 with pi/10."""
    if not is_auto(value, "margin", owner):
        return float(value)
    _common.check_proxy_args(num_classes, embedding_size, owner)
    if is_low_dimensional(num_classes, embedding_size):
        theta = math.acos(max(-1.0, min(1.0, separation_cosine(num_classes, embedding_size))))
        return min(float(paper), 0.5 * theta)
    return float(paper)


def _spread_if_low_dimensional(weight: Tensor, length, num_classes: Optional[int]) -> Tensor:
    """spread_init_(weight, length) when low-dimensional for (D, C), else normal_; C is
    ``num_classes``, or the columns of ``weight`` when None."""
    d, c = weight.shape
    if is_low_dimensional(c if num_classes is None else num_classes, d):
        return spread_init_(weight, length=length)
    return torch.nn.init.normal_(weight)


@torch.no_grad()
def auto_proxy_init_(weight: Tensor, num_classes: Optional[int] = None) -> Tensor:
    """PML ``weight_init_func`` of the rule: when low-dimensional, spread directions of
    length :data:`LOW_DIM_PROXY_LENGTH` (:func:`~pml_extras.losses.spread_init_`); else
    ``torch.nn.init.normal_`` exactly as PML's default (same random draws).
    ``num_classes``: the C that decides "low-dimensional" when ``weight`` is one class
    shard of a larger W (the sharded losses pass theirs); default: its columns.

    Why short: in 2-D the proxies' cyclic order is fixed once they have length, since
    two proxies cannot pass each other without one class's arc shrinking to nothing, so
    the order the init draws at random is the one training ends with. Adam turns a proxy
    by ~lr * sqrt(D) / |w| per step, so short proxies turn tens of degrees in their
    first steps and take the order (in 3-D, the arrangement) the embedding network
    already gives the classes; their length then grows with training and their steps
    shrink. Measured (Fashion-MNIST 2-D, CurricularFace, 3 seeds): 0.846 with the rule
    (length 0.05, margin pi/10) against 0.790 before it (``normal_`` lengths, margin
    0.5); per-variant figures, including proxies placed in the order of a trained
    softmax's classes, in benchmarks/results/lowdim/sweeps.md (Sweep E).

    Example:
        >>> loss_fn = pml_extras.losses.ArcFaceLoss(
        ...     10, 3, scale="auto", weight_init_func=auto_proxy_init_)
    """
    return _spread_if_low_dimensional(weight, LOW_DIM_PROXY_LENGTH, num_classes)


@torch.no_grad()
def circle_proxy_init_(weight: Tensor, num_classes: Optional[int] = None) -> Tensor:
    """SparseCircleLoss's default init: when low-dimensional, spread directions with the
    lengths of a ``normal_`` draw (:func:`~pml_extras.losses.spread_init_`); else
    ``torch.nn.init.normal_`` exactly as PML's default. ``num_classes``: as in
    :func:`auto_proxy_init_`.

    Why not the short proxies of :func:`auto_proxy_init_`: class-level Circle loss gives
    a negative proxy no gradient once its cosine is below -m (alpha_n = [s_n + m]_+), so
    nothing keeps fast early proxies apart. Measured (3 seeds, benchmarks/results/lowdim):
    short proxies give Fashion-MNIST 2-D 0.659 against 0.765 with these lengths (digits
    2-D 0.752 against 0.696)."""
    return _spread_if_low_dimensional(weight, None, num_classes)
