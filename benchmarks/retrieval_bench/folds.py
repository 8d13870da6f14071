"""Class-disjoint validation folds on the training classes (the reality check's protocol,
Musgrave et al., ECCV 2020, Sec. 4): ``--folds K`` splits the training classes of a
class-disjoint protocol into K groups; fold k trains on the other K-1 groups and is
validated on group k (retrieval among the held-out classes' training images, test against
test). The test classes are never part of a fold.

Final runs with folds train one model per fold (on that fold's training classes) and
evaluate each on the test classes; the table then reports, as the reality check does,

* **concatenated** (``metrics``): the K models' L2-normalised embeddings concatenated (K x
  ``--embedding-dim``, e.g. 4 x 128 = 512-D) and L2-normalised again;
* **separated** (``metrics_separated``): each model's own ``--embedding-dim`` embeddings,
  the metric averaged over the K models.
"""

from __future__ import annotations

import time
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import Protocol
from .evaluation import retrieval_metrics

__all__ = ["class_folds", "fold_protocol", "validation_protocol", "train_with_folds"]


def class_folds(num_classes: int, k: int, seed: int) -> List[Tuple[List[int], List[int]]]:
    """K (train, validation) partitions of the training class indices 0..num_classes-1: the
    classes shuffled by ``seed`` and dealt into K groups of near-equal size."""
    if k < 2:
        raise SystemExit(f"error: --folds {k}: must be >= 2")
    if num_classes < 2 * k:
        raise SystemExit(
            f"error: --folds {k} needs at least {2 * k} training classes (2 per fold to "
            f"retrieve among), the training split has {num_classes}"
        )
    rng = np.random.RandomState(np.random.SeedSequence([int(seed), 11]).generate_state(4))
    order = rng.permutation(num_classes)
    groups = [sorted(int(c) for c in g) for g in np.array_split(order, k)]
    return [
        (sorted(c for j, g in enumerate(groups) if j != i for c in g), groups[i]) for i in range(k)
    ]


def _select(source, classes: Sequence[int], train: bool):
    """The samples of ``classes`` in ``source``, relabelled 0..len(classes)-1."""
    labels = np.asarray(source.labels)
    lut = {int(c): i for i, c in enumerate(classes)}
    idx = [i for i in range(len(labels)) if int(labels[i]) in lut]
    return source.subset(idx, [lut[int(labels[i])] for i in idx], train=train)


def validation_protocol(protocol: Protocol, fold: Tuple[List[int], List[int]], k: int) -> Protocol:
    """Fold ``k`` for tuning: train on its training classes, retrieve among the training
    images of its held-out classes. Built from ``protocol.train`` alone."""
    tr, va = fold
    return Protocol(
        "classes",
        _select(protocol.train, tr, train=True),
        _select(protocol.train, va, train=False),
        [protocol.train_classes[c] for c in tr],
        [protocol.train_classes[c] for c in va],
        protocol.image_shape,
        f"validation fold {k}: train on {len(tr)} training classes, retrieve among the "
        f"training images of the {len(va)} others",
    )


def fold_protocol(protocol: Protocol, fold: Tuple[List[int], List[int]], k: int) -> Protocol:
    """Fold ``k`` for the final runs: train on its training classes, test on the test
    classes (``protocol.test``)."""
    tr, _ = fold
    return Protocol(
        protocol.split,
        _select(protocol.train, tr, train=True),
        protocol.test,
        [protocol.train_classes[c] for c in tr],
        list(protocol.test_classes),
        protocol.image_shape,
        f"fold {k} model: {len(tr)} of the {protocol.num_classes} training classes; "
        + protocol.description,
    )


def train_with_folds(train_one, protocol: Protocol, k: int, seed: int, knn, knn_device):
    """One model per fold via ``train_one(fold_protocol) -> (result, test_embeddings)``;
    returns one result with the concatenated and the separated metrics."""
    t0 = time.perf_counter()
    folds = class_folds(protocol.num_classes, k, seed)
    results, embs = [], []
    for i, fold in enumerate(folds):
        res, emb = train_one(fold_protocol(protocol, fold, i))
        results.append(res)
        embs.append(emb)
    out = dict(results[0])
    out["folds"] = [
        {
            "train_classes": [protocol.train_classes[c] for c in f[0]],
            "metrics": r["metrics"],
            "diverged": r["diverged"],
            "epoch_losses": r["epoch_losses"],
        }
        for f, r in zip(folds, results)
    ]
    out["step_losses"] = results[0]["step_losses"]
    out["timings_s"] = {
        "train": float(sum(r["timings_s"].get("train", 0.0) for r in results)),
        "total": time.perf_counter() - t0,
    }
    bad = [r["diverged"] for r in results if r["diverged"]]
    out["diverged"] = bad[0] if bad else None
    out["metrics"], out["metrics_separated"] = {}, {}
    if not bad and all(e is not None for e in embs):
        cat = torch.cat([F.normalize(torch.as_tensor(e).float(), dim=1) for e in embs], dim=1)
        out["metrics"] = retrieval_metrics(
            F.normalize(cat, dim=1), protocol.test.labels, knn=knn, device=knn_device
        )
        out["metrics_separated"] = {
            m: float(np.mean([r["metrics"][m] for r in results])) for m in results[0]["metrics"]
        }
        out["embedding_dim_concatenated"] = int(cat.shape[1])
    return out, (cat.numpy() if not bad else None)
