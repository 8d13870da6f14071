"""Input checks that fail with a ValueError naming the offending value.

Labels are checked on the host with one synchronisation, so that an out-of-range label
is a readable ValueError on CPU and CUDA alike rather than a device-side assert.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_embeddings(embeddings: Tensor, embedding_size: Optional[int], owner: str) -> None:
    if not torch.is_tensor(embeddings):
        raise TypeError(f"{owner}: embeddings must be a tensor, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(
            f"{owner}: embeddings must have shape (batch_size, embedding_size), "
            f"got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"{owner}: embeddings must be floating point, got {embeddings.dtype}")
    if embedding_size is not None and embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"{owner}: embeddings have size {embeddings.shape[1]} in dim 1, "
            f"but the loss was built with embedding_size={embedding_size}"
        )


def check_labels(
    labels: Optional[Tensor], num_classes: int, batch_size: int, owner: str, check_range=True
) -> Tensor:
    """Return ``labels`` as int64 after checking shape, dtype and range [0, num_classes).

    ``check_range=False`` leaves out the range check (a host sync), for callers that check
    the range themselves (the sharded losses, inside a collective they make anyway)."""
    if labels is None:
        raise ValueError(f"{owner}: labels are required")
    if not torch.is_tensor(labels):
        labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != batch_size:
        raise ValueError(
            f"{owner}: labels must have shape ({batch_size},) to match the embeddings, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{owner}: labels must be an integer tensor, got dtype {labels.dtype}")
    if check_range and batch_size > 0:
        _check_label_range(labels, num_classes, owner)
    return labels.long()


def _compile_opt_out(reason: str):
    """``torch.compiler.disable``, with a reason for fullgraph errors where torch has one."""

    def wrap(fn):
        try:
            return torch.compiler.disable(fn, reason=reason)
        except TypeError:  # torch < 2.7: no reason=
            return torch.compiler.disable(fn)

    return wrap


# Under torch.compile this host-synchronising check opts out of the graph (one graph
# break, run eagerly) instead of being traced. Traced, ``.tolist()`` breaks the graph
# anyway, and the resumed code then guarded on the Python ints min/max, so a batch with
# a new label minimum or maximum recompiled. Returning None keeps the label values out
# of the compiled code; with fullgraph=True, compilation stops here with the reason.
@_compile_opt_out(
    "pml_extras checks the label range on the host (one sync), so that a bad label is "
    "a ValueError naming it rather than a device-side assert"
)
def _check_label_range(labels: Tensor, num_classes: int, owner: str) -> None:
    lo, hi = torch.stack([labels.min(), labels.max()]).tolist()
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{owner}: label {bad} is out of range for num_classes={num_classes} "
            f"(labels must lie in [0, {num_classes}))"
        )


def check_no_ref(embeddings, labels, ref_emb, ref_labels, owner: str, why: str) -> None:
    """PML's forward sets ref_emb to the embeddings themselves when the user gave none."""
    if ref_emb is not embeddings or ref_labels is not labels:
        raise ValueError(f"{owner} does not support ref_emb/ref_labels: {why}")


def check_positive(name: str, value: float, owner: str, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: {name} must be {bound}, got {value}")
