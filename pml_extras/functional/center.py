"""Center loss (Wen et al. 2016) and the standalone center loss.

Center loss: Wen, Zhang, Li and Qiao, "A Discriminative Feature Learning Approach for
Deep Face Recognition", ECCV 2016. Each class j has a center c_j and

    L_C = 1/B * sum_i d(x_i, c_{y_i})        d = squared Euclidean by default

(the paper writes 1/2 * sum; the 1/2 is absorbed into the balancing weight lambda). The
paper updates the centers with its own rule instead of the loss gradient:

    delta c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)        c_j <- c_j - alpha * delta c_j

Standalone center loss (the seed repository "standalone-center-loss"): the center
term plus a log inter-sample term instead of a softmax,

    intra = 1/B * sum_i ||x_i - c_{y_i}||^2
    inter = -1/B * sum_i sum_j [y_i != y_j] * log(||x_i - x_j||^2)      (README form)
    inter = -1/B * sum_i sum_j [y_i != y_j] * log(1 + ||x_i - x_j||^2)  (its code's form)

Its README states the first form; its code, which produced its result table, uses the
second, which stays finite when two points coincide.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops.fixed_order import add_rows_, gather_rows, scatter_add_rows
from ._numerics import working_dtype

# log(d) is evaluated at max(d, LOG_EPS): coincident points give a large but finite term.
LOG_EPS = 1e-12
INTER_FORMS = ("log", "log1p")


def _maybe_normalize(x: Tensor, p: float, normalize: bool) -> Tensor:
    return torch.nn.functional.normalize(x, p=p, dim=1) if normalize else x


def _lp_from_difference(diff: Tensor, p: float, power: float) -> Tensor:
    if p == 2 and power == 2:
        # Exact and smooth at 0, unlike sqrt-then-square.
        return (diff * diff).sum(1)
    return torch.linalg.vector_norm(diff, ord=p, dim=1) ** power


def center_distances(
    embeddings: Tensor,
    centers: Tensor,
    labels: Tensor,
    p: float = 2.0,
    power: float = 2.0,
    normalize_embeddings: bool = False,
) -> Tensor:
    """(B,) distance d(x_i, c_{y_i}) = ||x_i - c_{y_i}||_p ** power, in float32 or wider."""
    dtype = working_dtype(embeddings, centers)
    x = _maybe_normalize(embeddings.to(dtype), p, normalize_embeddings)
    # gather_rows: on CUDA the gradient of a class's center sums its samples' terms in a
    # fixed order (index_select's backward adds them with atomics).
    c = _maybe_normalize(gather_rows(centers, labels).to(dtype), p, normalize_embeddings)
    return _lp_from_difference(x - c, p, power)


def pairwise_distances(
    x: Tensor, ref: Tensor, p: float = 2.0, power: float = 2.0, normalize_embeddings=False
) -> Tensor:
    """(B, N) matrix of ||x_i - ref_j||_p ** power, in float32 or wider."""
    dtype = working_dtype(x, ref)
    x = _maybe_normalize(x.to(dtype), p, normalize_embeddings)
    ref = _maybe_normalize(ref.to(dtype), p, normalize_embeddings)
    if p == 2:
        sq = (x * x).sum(1)[:, None] + (ref * ref).sum(1)[None, :] - 2.0 * (x @ ref.t())
        sq = torch.clamp_min(sq, 0.0)
        if power == 2:
            return sq
        # sqrt of a clamped value: zero distance gets a zero, not an infinite, gradient.
        return torch.sqrt(torch.clamp_min(sq, LOG_EPS)) ** power
    return torch.cdist(x, ref, p=p) ** power


def center_loss(
    embeddings: Tensor,
    centers: Tensor,
    labels: Tensor,
    p: float = 2.0,
    power: float = 2.0,
    normalize_embeddings: bool = False,
) -> Tensor:
    """Per-sample center loss d(x_i, c_{y_i}); average it for Wen et al.'s L_C.

    Args:
        embeddings: (B, D). centers: (C, D). labels: (B,) int64 in [0, C).
        p, power, normalize_embeddings: the LpDistance settings (default: squared L2).
    """
    return center_distances(embeddings, centers, labels, p, power, normalize_embeddings)


@torch.no_grad()
def center_update(centers: Tensor, embeddings: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """Wen et al.'s center update; returns new centers and leaves the inputs untouched.

    delta c_j = sum_{y_i = j} (c_j - x_i) / (1 + n_j),   c_j <- c_j - alpha * delta c_j.
    Classes absent from the batch do not move.
    """
    # Counts and sums in float32 (float64 for float64 centers) whatever the centers'
    # dtype: in bfloat16, a count past 256 would stop growing (256 + 1 rounds to 256) and
    # a class's sum would lose its small addends. The result is returned in that dtype.
    acc = torch.promote_types(centers.dtype, torch.float32)
    c = centers.to(acc)
    x = embeddings.detach().to(acc)
    counts = torch.zeros(centers.shape[0], device=centers.device, dtype=acc)
    # index_add_ adds with atomics on CUDA, in a varying order, but every addend here is
    # 1: in any order the partial sums are 1, 2, 3, ..., exact in float32 up to 2^24, so
    # the counts are the same in every run and need no fixed-order add.
    counts.index_add_(0, labels, torch.ones_like(labels, dtype=acc))
    # The per-class sums do need one: add_rows_ sums a class's rows in a fixed order on
    # CUDA (identical runs give bit-identical centers) and is index_add_ on CPU.
    sum_x = add_rows_(torch.zeros_like(c), labels, x)
    # sum_{y_i=j} (c_j - x_i) = n_j * c_j - sum_{y_i=j} x_i
    delta = (counts[:, None] * c - sum_x) / (1.0 + counts[:, None])
    return (c - alpha * delta).to(centers.dtype)


def standalone_center_loss(
    embeddings: Tensor,
    centers: Tensor,
    labels: Tensor,
    *,
    inter_form: str = "log",
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    negative_pairs: Optional[Tuple[Tensor, Tensor]] = None,
    p: float = 2.0,
    power: float = 2.0,
    normalize_embeddings: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Per-sample (intra, inter) terms of the standalone center loss, unweighted.

    The means over the batch of the two returned tensors are the README's L_intra and
    L_inter (the inter sum runs over ordered pairs, so each unordered pair counts twice).

    Args:
        embeddings: (B, D). centers: (C, D). labels: (B,) int64.
        inter_form: "log" (the README's formula) or "log1p" (the seed code's formula).
        ref_emb, ref_labels: optional (N, D) / (N,) references for the inter term;
            by default the batch itself.
        negative_pairs: optional (anchors, refs) index tensors, e.g. the negative pairs
            of a PML pair miner; the inter term then sums over those pairs only
            (duplicates count once).
    """
    if inter_form not in INTER_FORMS:
        raise ValueError(f"inter_form must be one of {INTER_FORMS}, got {inter_form!r}")
    intra = center_distances(embeddings, centers, labels, p, power, normalize_embeddings)
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    batch, num_ref = embeddings.shape[0], ref_emb.shape[0]

    def log_term(d: Tensor) -> Tensor:
        if inter_form == "log1p":
            return torch.log1p(d)
        return torch.log(torch.clamp_min(d, LOG_EPS))

    if negative_pairs is None:
        d = pairwise_distances(embeddings, ref_emb, p, power, normalize_embeddings)
        different = labels[:, None] != ref_labels[None, :]
        inter = -(log_term(d) * different).sum(1)
        return intra, inter

    anchors, refs = (idx.long() for idx in negative_pairs)
    # Mined pairs may repeat; PML's masks count each pair once, and so do we.
    keys = torch.unique(anchors * num_ref + refs)
    anchors, refs = keys // num_ref, keys % num_ref
    dtype = working_dtype(embeddings, ref_emb)
    x = _maybe_normalize(embeddings.to(dtype), p, normalize_embeddings)
    r = _maybe_normalize(ref_emb.to(dtype), p, normalize_embeddings)
    # An anchor's many pairs: summed in a fixed order on CUDA, forward and backward.
    d = _lp_from_difference(gather_rows(x, anchors) - gather_rows(r, refs), p, power)
    inter = scatter_add_rows(batch, anchors, -log_term(d))
    return intra, inter
