"""Embedding the test set and scoring retrieval with PML's ``AccuracyCalculator``.

k-NN backend (``--knn auto``): on a CUDA device faiss's GPU index when faiss imports with GPU
support (``pip install 'pml-extras[gpu]'``), else PML's ``CustomKNN`` on that GPU (never
faiss on the CPU behind a GPU's back); on the CPU faiss-cpu when it imports, else
``CustomKNN``.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .env import _try_import_faiss

__all__ = [
    "METRICS",
    "METRIC_SHORT",
    "select_knn",
    "remap_labels",
    "retrieval_metrics",
    "classification_accuracy",
    "embed",
    "autocast",
]

METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
METRIC_SHORT = {
    "precision_at_1": "P@1",
    "r_precision": "R-Prec",
    "mean_average_precision_at_r": "MAP@R",
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``--amp bf16|fp16`` (CPU too), a no-op context without it."""
    if not amp or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def select_knn(device: torch.device, backend: str = "auto"):
    """Pick the k-NN function for AccuracyCalculator: ``(knn_func, eval_device, name)``.

    ``auto``: see the module docstring. ``faiss``: faiss, GPU index if it has GPUs, else CPU.
    ``torch``: PML's ``CustomKNN`` (L2, batched) on ``device``. faiss is only imported here.
    """
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    faiss = _try_import_faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise SystemExit("--knn faiss: faiss is not importable (pip install faiss-cpu)")
    if faiss is not None:
        from pytorch_metric_learning.utils.inference import FaissKNN

        num_gpus = 0
        if device.type == "cuda":
            try:
                num_gpus = int(faiss.get_num_gpus())
            except AttributeError:  # faiss-cpu builds have no GPU API
                num_gpus = 0
        if num_gpus > 0:
            return FaissKNN(gpus=[device.index or 0]), device, "faiss-gpu"
        if device.type != "cuda" or backend == "faiss":
            return FaissKNN(), torch.device("cpu"), "faiss-cpu"
    # the test split of fashion-mnist is 10k x 10k: batch the distance matrix
    knn = CustomKNN(LpDistance(normalize_embeddings=False, p=2, power=1), batch_size=2048)
    return knn, device, "pml-customknn"


def remap_labels(labels) -> np.ndarray:
    """Map arbitrary labels to 0..C-1 (PML casts labels to float32; large ids would collide)."""
    labels = np.asarray(labels)
    _, inv = np.unique(labels, return_inverse=True)
    return inv.reshape(-1).astype(np.int64)


def retrieval_metrics(
    embeddings,
    labels,
    knn=None,
    device: Optional[torch.device] = None,
    normalize: bool = False,
) -> Dict[str, float]:
    """P@1, R-precision and MAP@R of ``embeddings`` against themselves (leave-one-out)."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    if knn is None:
        knn, device, _ = select_knn(device or torch.device("cpu"))
    device = device or torch.device("cpu")
    emb = torch.as_tensor(embeddings).float()
    if normalize:
        emb = F.normalize(emb, dim=1)
    lab = torch.as_tensor(remap_labels(np.asarray(torch.as_tensor(labels).cpu())))
    calc = AccuracyCalculator(
        include=METRICS, k="max_bin_count", device=device, knn_func=knn, avg_of_avgs=False
    )
    acc = calc.get_accuracy(emb.to(device), lab.to(device))
    return {m: float(acc[m]) for m in METRICS}


def classification_accuracy(logits, labels) -> float:
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(np.asarray(labels))
    return float((logits.argmax(dim=1).cpu() == labels.cpu()).float().mean())


@torch.no_grad()
def embed(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    amp: Optional[str] = None,
) -> torch.Tensor:
    """Embed ``batches`` (an iterable of input tensors) in eval mode under no_grad (and
    autocast with ``amp``); float32 embeddings, concatenated, on ``device``."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for x in batches:
            with autocast(device, amp):
                out.append(model(x.to(device, non_blocking=True)).float())
    finally:
        model.train(was_training)
    return torch.cat(out)
