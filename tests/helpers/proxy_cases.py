"""Embeddings, proxies and labels for the class-level loss tests: random problems, rows
placed on proxies (the cos = +-1 cases) and rows facing away from their own proxy.

One home for tests/losses/test_class_circle.py, test_curricular_face.py and
test_margin_losses.py (issue 19: the same builders stood in two or three of them). Plain
torch and hypothesis; it never imports ``pml_extras``.

Example:
    >>> W = torch.eye(3)
    >>> rows_on_proxies(W, torch.tensor([0, 1]), torch.tensor([2, 2]), ["own", "minus_other"], 2.0)
    tensor([[ 2.,  0.,  0.],
            [-0., -0., -2.]])
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor

F64 = torch.float64


def make_data(B: int, D: int, C: int, seed: int, dtype=F64) -> Tuple[Tensor, Tensor, Tensor]:
    """(x (B, D), W (D, C), labels (B,)) drawn in float64 at ``seed``, then cast to
    ``dtype`` (so every dtype rounds the same values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=F64).to(dtype)
    W = torch.randn(D, C, generator=g, dtype=F64).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return x, W, y


def facing_away(
    x: Tensor, W: Tensor, labels: Tensor, rows: int, noise: float, seed: int = 5
) -> Tuple[Tensor, Tensor]:
    """Sets ``x``'s first ``rows`` rows (in place) to minus their own unit proxy plus
    ``noise`` times Gaussian noise drawn at ``seed``: targets past pi - m for the margin
    losses' fallback branch. Returns (x, the cosines of all rows to their own proxy)."""
    g = torch.Generator().manual_seed(seed)
    w_y = F.normalize(W[:, labels].t(), dim=1)
    x[:rows] = -w_y[:rows] + noise * torch.randn(rows, x.shape[1], generator=g, dtype=x.dtype)
    return x, (F.normalize(x, dim=1) * w_y).sum(1)


PLACEMENTS = ("own", "minus_own", "other", "minus_other")
#: Which proxy each row sits on (cycled over the rows): its own class's, another class's,
#: or the opposite of either.
placement_patterns = st.lists(st.sampled_from(PLACEMENTS), min_size=6)


def rows_on_proxies(
    W: Tensor, labels: Tensor, others: Tensor, pattern: Sequence[str], magnitude: float
) -> Tensor:
    """(B, D) embeddings: row i is ``+-magnitude * W[:, c]`` with c = ``labels[i]`` for
    "own" and ``others[i]`` for "other", negated for "minus_*"; ``pattern`` cycles over
    the rows. Its cosine to that proxy is exactly +-1 (up to the proxy's own rounding)."""
    rows = []
    for i in range(len(labels)):
        which = pattern[i % len(pattern)]
        col = labels[i] if which.endswith("own") else others[i]
        sign = -1.0 if which.startswith("minus") else 1.0
        rows.append(sign * magnitude * W[:, col])
    return torch.stack(rows)


def fp16_rows_on_own_proxy(D: int, sign: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The fp16 regression case (x = +-0.05 * w_y in fp16 gave NaN gradients while the
    unit vector was computed in fp16): W (D, 6) drawn at seed D, labels [4, 1].

    Returns (x: fp16, requires grad; labels; W in fp16)."""
    g = torch.Generator().manual_seed(D)
    W = torch.randn(D, 6, generator=g)
    y = torch.tensor([4, 1])
    x = (sign * 0.05 * W[:, y].t()).half().requires_grad_(True)
    return x, y, W.half()
