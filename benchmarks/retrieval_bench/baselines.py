"""Baselines every table carries, scored on the same test split by the same code as the
losses (L2-normalised embeddings, PML's ``AccuracyCalculator``):

* ``raw input``: the test inputs as the model sees them, flattened and L2-normalised (image
  files: the test transform's image average-pooled to at most 32 x 32);
* ``untrained network``: the model at the initialisation every loss starts from at that
  seed (same ``seed_everything`` then ``model_for``), in eval mode;
* ``frozen backbone`` (``--weights``): the backbone's features before the embedding layer.

A trained loss that does not beat the best of them has learnt nothing that transfers.
"""

from __future__ import annotations

import time
from typing import List

import torch
import torch.nn.functional as F

from .env import seed_everything
from .evaluation import embed, retrieval_metrics
from .models import model_for

__all__ = ["BASELINES", "RAW", "UNTRAINED", "FROZEN", "baseline_runs", "is_baseline"]

RAW = "baseline: raw input"
UNTRAINED = "baseline: untrained network"
FROZEN = "baseline: frozen backbone"
BASELINES = (RAW, UNTRAINED, FROZEN)


def is_baseline(name: str) -> bool:
    return name in BASELINES


def _entry(name: str, protocol, seed: int, metrics: dict, what: str, t0: float) -> dict:
    return {
        "loss": name,
        "source": "baseline",
        "seed": seed,
        "split": protocol.split,
        "what": what,
        "metrics": metrics,
        "diverged": None,
        "epoch_losses": [],
        "step_losses": [],
        "epochs_completed": 0,
        "normalize_eval": True,
        "timings_s": {"train": 0.0, "total": time.perf_counter() - t0},
    }


def baseline_runs(protocol, args, device, knn, knn_device, seed: int) -> List[dict]:
    """The baselines' result entries for one (protocol, seed)."""
    out = []
    labels = protocol.test.labels

    def add(name: str, emb: torch.Tensor, what: str, t0: float) -> None:
        """Scores L2-normalised ``emb`` and appends its entry (time since ``t0``)."""
        metrics = retrieval_metrics(F.normalize(emb, dim=1), labels, knn=knn, device=knn_device)
        out.append(_entry(name, protocol, seed, metrics, what, t0))

    t0 = time.perf_counter()
    raw = torch.cat([x.reshape(len(x), -1).float() for x in protocol.test.raw_batches(512)])
    add(RAW, raw, f"flattened test inputs ({raw.shape[1]} values), L2-normalised", t0)
    del raw
    t0 = time.perf_counter()
    seed_everything(seed)  # the initialisation each loss's run starts from at this seed
    model, info = model_for(args, protocol.image_shape)
    model = model.to(device)
    amp = getattr(args, "amp", None)
    emb = embed(model, protocol.test.eval_batches(args.eval_batch_size, device), device, amp)
    what = (
        f"the {args.model} at its seed-{seed} initialisation ({info['weights']}), "
        f"{args.embedding_dim}-D, eval mode"
    )
    add(UNTRAINED, emb, what, t0)
    if getattr(args, "weights", None) and hasattr(model, "backbone"):
        t0 = time.perf_counter()
        head, model.embedding = model.embedding, torch.nn.Identity()  # features, not the head
        try:
            feats = embed(
                model, protocol.test.eval_batches(args.eval_batch_size, device), device, amp
            )
        finally:
            model.embedding = head
        add(FROZEN, feats, f"backbone features ({feats.shape[1]}-D) of {info['weights']}", t0)
    return out
