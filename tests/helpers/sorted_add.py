"""Run the CUDA branch of the fixed-order scatter-adds on CPU and record that it ran.

``pml_extras.ops.fixed_order.add_rows_`` / ``add_columns_`` take their deterministic
form (``index_put_`` with accumulate=True) where ``uses_sorted_add(out)`` is true, i.e. on
CUDA. :func:`take_cuda_branch` makes every tensor count as CUDA and wraps the deterministic
form so that each call is recorded; the wrapped function still does the addition, so the
values stay checkable against the float64 references. Without the branch (or with a
module that bypasses the helper) the record stays empty.
"""

from __future__ import annotations

from typing import List, NamedTuple

import torch

from pml_extras.ops import fixed_order


class Call(NamedTuple):
    out_shape: tuple
    index: torch.Tensor
    src_shape: tuple
    dtype: torch.dtype


def record_only(monkeypatch, name: str) -> List[Call]:
    """Record the calls of ``fixed_order.<name>`` without changing the device check."""
    real = getattr(fixed_order, name)
    calls: List[Call] = []

    def recorded(out, index, src):
        calls.append(Call(tuple(out.shape), index.clone(), tuple(src.shape), out.dtype))
        return real(out, index, src)

    monkeypatch.setattr(fixed_order, name, recorded)
    return calls


def take_cuda_branch(monkeypatch, name: str) -> List[Call]:
    """Make ``uses_sorted_add`` true and record every call of ``fixed_order.<name>``
    (``add_rows_deterministic_`` or ``add_columns_deterministic_``); returns the record."""
    monkeypatch.setattr(fixed_order, "uses_sorted_add", lambda out: True)
    return record_only(monkeypatch, name)
