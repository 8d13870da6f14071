"""Embeddings placed on class proxies: the cos = +-1 cases of the class-level loss tests.

One home for tests/losses/test_class_circle.py, test_curricular_face.py and
test_margin_losses.py (issue 19: the same row-building loop stood in all three). Plain
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
from hypothesis import strategies as st
from torch import Tensor

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
