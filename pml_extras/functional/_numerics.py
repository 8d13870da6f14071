"""Small numerically careful building blocks shared by the functional losses."""

from __future__ import annotations

import torch
from torch import Tensor


def working_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: reductions never run in half."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def masked_logsumexp(z: Tensor, keep: Tensor, dim: int = 1) -> Tensor:
    """logsumexp over the entries where ``keep`` is true; -inf (with zero gradient) if none.

    ``torch.logsumexp`` of an all -inf row has a NaN gradient, so the empty case is
    routed through a ``where`` whose unselected branch has a finite derivative.
    """
    z = z.masked_fill(~keep, float("-inf"))
    peak = z.amax(dim=dim, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(z - peak).sum(dim=dim)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    return torch.where(
        nonempty, torch.log(safe_total) + peak.squeeze(dim), torch.full_like(total, float("-inf"))
    )
