"""Naive float64 references written from the papers' formulas.

Everything here loops over anchors (and, where it is cheap enough, over classes or pairs)
with plain torch scalar arithmetic, so that it shares no code, no vectorisation trick and
no numerical shortcut with the library. It must never import ``pml_extras``.

All functions take torch tensors, cast them to float64 and return float64 tensors that are
differentiable with respect to the inputs (so gradients can be compared too).
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

F64 = torch.float64
NEG_INF = float("-inf")


def _lse(values: Sequence[Tensor]) -> Tensor:
    """logsumexp of a list of 0-d tensors; -inf (a constant) when the list is empty."""
    if len(values) == 0:
        return torch.tensor(NEG_INF, dtype=F64)
    return torch.logsumexp(torch.stack(list(values)), dim=0)


def _unit(v: Tensor) -> Tensor:
    return v / torch.sqrt(torch.sum(v * v))


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine between two vectors, clamped to [-1, 1] like every cosine head does."""
    return torch.clamp(torch.dot(_unit(a), _unit(b)), -1.0, 1.0)


# --------------------------------------------------------------------------------------
# Circle loss, class level (Sun et al. 2020, eq. 4 with class proxies as the "pairs")
# --------------------------------------------------------------------------------------


def circle_from_similarities(sims: Tensor, positive: Tensor, m: float, gamma: float) -> Tensor:
    """Per-row Circle loss from a (B, C) similarity matrix and a (B, C) boolean positive mask.

    L_i = softplus( logsumexp_n gamma*a_n*(s_n - Delta_n) + logsumexp_p -gamma*a_p*(s_p - Delta_p) )
    with O_p = 1 + m, O_n = -m, Delta_p = 1 - m, Delta_n = m, a_p = [O_p - s_p]_+,
    a_n = [s_n - O_n]_+ (detached). Rows without a positive or a negative have loss 0.
    """
    sims = sims.to(F64)
    out: List[Tensor] = []
    for i in range(sims.shape[0]):
        pos_terms, neg_terms = [], []
        for j in range(sims.shape[1]):
            s = sims[i, j]
            if bool(positive[i, j]):
                a_p = torch.clamp(1.0 + m - s.detach(), min=0.0)
                pos_terms.append(-gamma * a_p * (s - (1.0 - m)))
            else:
                a_n = torch.clamp(s.detach() + m, min=0.0)
                neg_terms.append(gamma * a_n * (s - m))
        if not pos_terms or not neg_terms:
            out.append(sims[i].sum() * 0.0)
        else:
            out.append(F.softplus(_lse(neg_terms) + _lse(pos_terms)))
    return torch.stack(out) if out else torch.zeros(0, dtype=F64)


def class_circle_loss(
    embeddings: Tensor, weight: Tensor, labels: Tensor, m: float, gamma: float
) -> Tensor:
    """Per-anchor class-level Circle loss: positive = own proxy, negatives = all others.

    ``weight`` is (D, C); embeddings and proxies are L2-normalised.
    """
    x, w = embeddings.to(F64), weight.to(F64)
    num_classes = w.shape[1]
    out: List[Tensor] = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        pos_terms, neg_terms = [], []
        for j in range(num_classes):
            s = _cos(x[i], w[:, j])
            if j == y:
                a_p = torch.clamp(1.0 + m - s.detach(), min=0.0)
                pos_terms.append(-gamma * a_p * (s - (1.0 - m)))
            else:
                a_n = torch.clamp(s.detach() + m, min=0.0)
                neg_terms.append(gamma * a_n * (s - m))
        if not neg_terms:
            out.append((x[i].sum() + w.sum()) * 0.0)
        else:
            out.append(F.softplus(_lse(neg_terms) + _lse(pos_terms)))
    return torch.stack(out) if out else torch.zeros(0, dtype=F64)


# --------------------------------------------------------------------------------------
# CurricularFace (Huang et al. 2020), as the authors' code computes it
# --------------------------------------------------------------------------------------


def curricular_face_losses(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    t: float,
    margin: float = 0.5,
    scale: float = 64.0,
) -> Tensor:
    """Per-anchor CurricularFace cross-entropy with a given t.

    cos_theta_m = cos(theta_y + m) = c_y cos m - sin_y sin m
    target      = cos_theta_m if c_y > cos(pi - m) else c_y - m * sin(pi - m)
    negative j  = c_j * (t + c_j) if c_j > cos_theta_m (hard example) else c_j
    loss        = -log softmax(scale * logits)[y]
    """
    x, w = embeddings.to(F64), weight.to(F64)
    t = float(t)
    threshold = math.cos(math.pi - margin)
    mm = math.sin(math.pi - margin) * margin
    out: List[Tensor] = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        cos = [_cos(x[i], w[:, j]) for j in range(w.shape[1])]
        c_y = cos[y]
        sin_y = torch.sqrt(1.0 - c_y * c_y)
        cos_theta_m = c_y * math.cos(margin) - sin_y * math.sin(margin)
        if float(c_y.detach()) > threshold:
            target = cos_theta_m
        else:
            target = c_y - mm
        logits = []
        for j, c in enumerate(cos):
            if j == y:
                logits.append(target)
            elif float(c.detach()) > float(cos_theta_m.detach()):
                logits.append(c * (t + c))
            else:
                logits.append(c)
        z = scale * torch.stack(logits)
        out.append(torch.logsumexp(z, dim=0) - z[y])
    return torch.stack(out) if out else torch.zeros(0, dtype=F64)


def target_cosines(embeddings: Tensor, weight: Tensor, labels: Tensor) -> List[float]:
    x, w = embeddings.detach().to(F64), weight.detach().to(F64)
    return [float(_cos(x[i], w[:, int(labels[i])])) for i in range(x.shape[0])]


class CurricularFaceReference:
    """Keeps its own t and W copy; ``t`` is updated before use, in training mode only.

    t <- momentum * mean_i cos(theta_{y_i}) + (1 - momentum) * t
    """

    def __init__(self, weight: Tensor, margin=0.5, scale=64.0, momentum=0.01, t=0.0):
        self.W = weight.detach().to(F64).clone().requires_grad_(True)
        self.margin, self.scale, self.momentum = margin, scale, momentum
        self.t = float(t)

    def loss(self, embeddings: Tensor, labels: Tensor, training: bool = True) -> Tensor:
        if training and embeddings.shape[0] > 0:
            cos_y = target_cosines(embeddings, self.W, labels)
            self.t = self.momentum * (sum(cos_y) / len(cos_y)) + (1.0 - self.momentum) * self.t
        losses = curricular_face_losses(embeddings, self.W, labels, self.t, self.margin, self.scale)
        return losses.mean()

    def sgd_step(self, lr: float) -> None:
        with torch.no_grad():
            self.W -= lr * self.W.grad
        self.W.grad = None


# --------------------------------------------------------------------------------------
# Center loss (Wen et al. 2016) and the standalone center loss
# --------------------------------------------------------------------------------------


def lp_distance(
    a: Tensor, b: Tensor, p: float = 2.0, power: float = 2.0, normalize: bool = False
) -> Tensor:
    """||a - b||_p ** power for two vectors (PML's LpDistance, with optional p-normalising)."""
    a, b = a.to(F64), b.to(F64)
    if normalize:
        a = a / torch.sum(torch.abs(a) ** p) ** (1.0 / p)
        b = b / torch.sum(torch.abs(b) ** p) ** (1.0 / p)
    diff = a - b
    if p == 2 and power == 2:
        return torch.sum(diff * diff)
    return torch.sum(torch.abs(diff) ** p) ** (power / p)


def center_losses(
    embeddings: Tensor,
    centers: Tensor,
    labels: Tensor,
    p: float = 2.0,
    power: float = 2.0,
    normalize: bool = False,
) -> Tensor:
    """Per-sample d(x_i, c_{y_i}); L_C is their mean."""
    out = [
        lp_distance(embeddings[i], centers[int(labels[i])], p, power, normalize)
        for i in range(embeddings.shape[0])
    ]
    return torch.stack(out) if out else torch.zeros(0, dtype=F64)


def center_update_paper(
    centers: Tensor, embeddings: Tensor, labels: Tensor, alpha: float
) -> Tensor:
    """Wen et al. eq. (4): c_j <- c_j - alpha * sum_{y_i=j} (c_j - x_i) / (1 + n_j)."""
    c = centers.detach().to(F64).clone()
    x = embeddings.detach().to(F64)
    new = c.clone()
    for j in range(c.shape[0]):
        members = [i for i in range(x.shape[0]) if int(labels[i]) == j]
        delta = torch.zeros(c.shape[1], dtype=F64)
        for i in members:
            delta = delta + (c[j] - x[i])
        delta = delta / (1.0 + len(members))
        new[j] = c[j] - alpha * delta
    return new


def standalone_center_terms(
    embeddings: Tensor,
    centers: Tensor,
    labels: Tensor,
    inter_form: str = "log",
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    negative_pairs: Optional[Iterable[Tuple[int, int]]] = None,
    p: float = 2.0,
    power: float = 2.0,
    normalize: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Per-sample (intra_i, inter_i) of the standalone center loss (unweighted).

    intra_i = d(x_i, c_{y_i})
    inter_i = - sum_j [y_i != y_j] * log(d(x_i, x_j))        ("log", README)
    inter_i = - sum_j [y_i != y_j] * log(1 + d(x_i, x_j))    ("log1p", seed code)
    so that mean_i intra_i = L_intra and mean_i inter_i = L_inter (1/m, m = batch size).
    With ``negative_pairs`` the inner sum runs over that *set* of (i, j) pairs instead.
    """
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels

    def log_term(d):
        return torch.log1p(d) if inter_form == "log1p" else torch.log(d)

    if negative_pairs is not None:
        pair_set = set((int(a), int(n)) for a, n in negative_pairs)
    intra, inter = [], []
    for i in range(embeddings.shape[0]):
        intra.append(lp_distance(embeddings[i], centers[int(labels[i])], p, power, normalize))
        total = torch.zeros((), dtype=F64)
        for j in range(ref_emb.shape[0]):
            if negative_pairs is None:
                use = int(labels[i]) != int(ref_labels[j])
            else:
                use = (i, j) in pair_set
            if use:
                total = total - log_term(
                    lp_distance(embeddings[i], ref_emb[j], p, power, normalize)
                )
        inter.append(total)
    if not intra:
        empty = torch.zeros(0, dtype=F64)
        return empty, empty
    return torch.stack(intra), torch.stack(inter)


# --------------------------------------------------------------------------------------
# Dense version of the blockwise class logsumexp (for tests/ops/test_class_lse_op.py)
# --------------------------------------------------------------------------------------


def dense_class_logsumexp(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    kind: str,
    p0: float,
    p1: float = 0.0,
    row_param: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(lse, cos_y) from the full (B, C) cosine matrix, in float64 with plain autograd.

    c_ij = clamp(<x_i, w_j / ||w_j||>, -1, 1); z_ij = g(c_ij); lse_i = logsumexp over
    j != target_i (-inf when there is nothing left); cos_y_i = c_{i, target_i}, 0 for -1.
    """
    x, w = x.to(F64), weight.to(F64)
    norms = torch.sqrt(torch.sum(w * w, dim=0))
    c = torch.clamp((x @ w) / norms, -1.0, 1.0)
    if kind == "circle":
        z = p0 * torch.clamp(c.detach() + p1, min=0.0) * (c - p1)
    elif kind == "curricular":
        hard = c.detach() > row_param.to(F64)[:, None]
        z = p0 * torch.where(hard, c * (p1 + c), c)
    elif kind == "scaled":
        z = p0 * c
    else:
        raise ValueError(kind)
    lse, cos_y = [], []
    for i in range(x.shape[0]):
        y = int(target[i])
        keep = [j for j in range(w.shape[1]) if j != y]
        lse.append(torch.logsumexp(z[i, keep], 0) if keep else torch.tensor(NEG_INF, dtype=F64))
        cos_y.append(c[i, y] if y >= 0 else torch.zeros((), dtype=F64))
    return torch.stack(lse), torch.stack(cos_y)


# --------------------------------------------------------------------------------------
# ArcFace (Deng et al. 2019) and CosFace (Wang et al. 2018)
# --------------------------------------------------------------------------------------


def _margin_target(c_y: Tensor, kind: str, margin: float) -> Tensor:
    """The target logit before scaling.

    ArcFace: cos(theta_y + m) with theta_y = arccos(c_y), while theta_y + m <= pi; past
    that, c_y - m*sin(m) (the monotonic fallback pytorch-metric-learning uses).
    CosFace: c_y - m.
    """
    if kind == "cosface":
        return c_y - margin
    if kind != "arcface":
        raise ValueError(kind)
    theta = torch.acos(c_y)
    if float(theta.detach()) <= math.pi - margin:
        return torch.cos(theta + margin)
    return c_y - margin * math.sin(margin)


def margin_softmax_losses(
    embeddings: Tensor, weight: Tensor, labels: Tensor, kind: str, margin: float, scale: float
) -> Tensor:
    """Per-anchor ArcFace / CosFace loss, one class at a time.

    logits_j = s * c_j for j != y, logits_y = s * f(c_y); loss = -log softmax(logits)[y].
    ``margin`` is in radians for ArcFace. ``weight`` is (D, C).
    """
    x, w = embeddings.to(F64), weight.to(F64)
    out: List[Tensor] = []
    for i in range(x.shape[0]):
        y = int(labels[i])
        logits = []
        for j in range(w.shape[1]):
            c = _cos(x[i], w[:, j])
            logits.append(scale * (_margin_target(c, kind, margin) if j == y else c))
        z = torch.stack(logits)
        out.append(torch.logsumexp(z, dim=0) - z[y])
    return torch.stack(out) if out else torch.zeros(0, dtype=F64)


def margin_softmax_losses_dense(
    embeddings: Tensor, weight: Tensor, labels: Tensor, kind: str, margin: float, scale: float
) -> Tensor:
    """The same loss from the full (B, C) cosine matrix and torch's cross-entropy (for the
    larger shapes, where the per-class loop is too slow)."""
    x, w = embeddings.to(F64), weight.to(F64)
    cos = torch.clamp(F.normalize(x, dim=1) @ F.normalize(w, dim=0), -1.0, 1.0)
    rows = torch.arange(x.shape[0])
    c_y = cos[rows, labels]
    if kind == "cosface":
        target = c_y - margin
    elif kind == "arcface":
        theta = torch.acos(c_y)
        target = torch.where(
            theta.detach() <= math.pi - margin,
            torch.cos(theta + margin),
            c_y - margin * math.sin(margin),
        )
    else:
        raise ValueError(kind)
    onehot = F.one_hot(labels, w.shape[1]).to(torch.bool)
    logits = scale * torch.where(onehot, target[:, None], cos)
    return F.cross_entropy(logits, labels, reduction="none")
