"""Scatter-adds and gathers whose sums have a fixed order on CUDA.

On CUDA, ``Tensor.index_add_`` (and so the backward of ``index_select``, which autograd
computes with it) adds with atomics: rows with one index (a batch's samples of one label,
a row's many pairs) are summed in whatever order the threads arrive, and the rounded
float32 / bfloat16 sums vary between identical runs. Every scatter-add of the package with
possibly repeated indices goes through this module instead:

* :func:`add_columns_` / :func:`add_rows_` (in place), :func:`scatter_add_rows`
  (out of place, differentiable): ``index_put_(accumulate=True)`` on CUDA;
* :func:`gather_rows`: ``src[index]`` on CUDA, whose backward autograd computes with
  ``index_put_(accumulate=True)`` as well.

Elsewhere (CPU) they are ``index_add_`` / ``index_select``, which are deterministic
there, so CPU values stay bit-identical to what the plain calls gave. A leaf module:
imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Why index_put_(accumulate=True) has a fixed order on CUDA, for every torch the package
# declares (>= 2.4, CI: 2.4.1 and 2.13.0): aten's _index_put_impl_
# (aten/src/ATen/native/TensorAdvancedIndexing.cpp) sends a CUDA tensor with accumulate=True
# to index_put_with_sort_stub, which sorts the flattened indices (a stable radix sort) and
# sums each run of equal indices in that sorted order (aten/src/ATen/native/cuda/Indexing.cu),
# with no atomics. PyTorch itself relies on it: under torch.use_deterministic_algorithms(True),
# CUDA's index_add_ (index_add_cuda_impl) calls index_put_(indices, source * alpha, True)
# instead of its atomic kernel, and that function's docstring (torch/__init__.py, 2.13.0)
# lists index_add on CUDA as made deterministic by the flag, and index_put with
# accumulate=True as nondeterministic only on CPU.


def uses_sorted_add(out: Tensor) -> bool:
    """Whether :func:`add_columns_` / :func:`add_rows_` take the deterministic form for
    ``out``: on CUDA, where ``index_add_`` adds with atomics. One function, so that tests on
    CPU can make a tensor count as CUDA and run the modules' CUDA branch."""
    return out.is_cuda


def add_columns_deterministic_(out: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """out[:, index[i]] += src[:, i] for every i, in place; returns ``out``.

    Duplicate indices (several rows of a batch with one label) are summed in a fixed
    order: ``index_put_(accumulate=True)`` on the transposed view, which CUDA runs as a
    sort-based kernel, not with atomics (``index_add_``'s CUDA kernel adds with atomics,
    so in bfloat16 the order of the additions, and so the rounded sum, varied between
    runs)."""
    out.t().index_put_((index,), src.t(), accumulate=True)
    return out


def add_columns_(out: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """out[:, index[i]] += src[:, i]: :func:`add_columns_deterministic_` on CUDA;
    ``index_add_`` elsewhere (deterministic on CPU, and the CPU path's values stay
    bit-identical to what they were)."""
    if uses_sorted_add(out):
        return add_columns_deterministic_(out, index, src)
    return out.index_add_(1, index, src)


def add_rows_deterministic_(out: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """out[index[i]] += src[i] for every i, in place; returns ``out``.

    ``out`` (N, ...), ``index`` (K,) integers in [0, N), ``src`` (K, ...) of out's dtype.
    Rows with one index (a batch's samples of one label, a row's many pairs) are summed
    in a fixed order: ``index_put_(accumulate=True)``, a sort-based kernel on CUDA (see
    the note above :func:`uses_sorted_add`), where ``index_add_``'s atomics let the rounded
    float32 / bfloat16 sums vary between identical runs."""
    out.index_put_((index.to(torch.long),), src, accumulate=True)
    return out


def add_rows_(out: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """out[index[i]] += src[i], i.e. ``out.index_add_(0, index, src)``:
    :func:`add_rows_deterministic_` on CUDA; ``index_add_`` elsewhere (deterministic on
    CPU, and the CPU values stay bit-identical to what they were)."""
    if uses_sorted_add(out):
        return add_rows_deterministic_(out, index, src)
    return out.index_add_(0, index, src)


def scatter_add_rows(size: int, index: Tensor, src: Tensor) -> Tensor:
    """A new (size, ...) tensor with out[index[i]] += src[i]: ``zeros.index_add(0, index,
    src)`` with a fixed order on CUDA (:func:`add_rows_`). Differentiable in ``src`` (its
    gradient is a gather, deterministic everywhere)."""
    out = src.new_zeros((size,) + tuple(src.shape[1:]))
    return add_rows_(out, index, src)


def gather_rows(src: Tensor, index: Tensor) -> Tensor:
    """``src.index_select(0, index)`` whose backward sums repeated indices in a fixed order
    on CUDA: there it is ``src[index]``, whose backward autograd computes as
    ``_index_put_impl_(zeros, indices, grad, accumulate=True)`` (``index_backward`` in
    torch/csrc/autograd/FunctionsManual.cpp), the sort-based kernel above, where
    ``index_select``'s backward is an atomic ``index_add_``. The forward values are the
    same either way."""
    if uses_sorted_add(src):
        return src[index.to(torch.long)]
    return src.index_select(0, index)


__all__ = [
    "add_columns_",
    "add_columns_deterministic_",
    "add_rows_",
    "add_rows_deterministic_",
    "gather_rows",
    "scatter_add_rows",
    "uses_sorted_add",
]
