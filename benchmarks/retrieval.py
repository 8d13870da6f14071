#!/usr/bin/env python
"""Retrieval benchmark: train one small embedding model per loss, evaluate on a held-out split.

For every loss in ``--losses`` a fresh model (same seed, same initial weights, same batches) is
trained on the training split, then the test split is embedded and evaluated with
pytorch-metric-learning's ``AccuracyCalculator`` (precision_at_1, r_precision,
mean_average_precision_at_r, ``k="max_bin_count"``; queries and references are both the test
split, leave-one-out). Classification-style losses are also scored by classification accuracy
(argmax of ``get_logits`` / of the linear classifier) and center losses by nearest-center
accuracy.

Examples::

    python benchmarks/retrieval.py                       # digits, all losses, < 3 min on CPU
    python benchmarks/retrieval.py --dataset fashion-mnist --embedding-dim 2 --threads 1
    python benchmarks/retrieval.py --dataset idx --data-dir ~/mnist   # any MNIST-form IDX set
    python benchmarks/retrieval.py --losses ours,softmax,triplet --epochs 5
    python benchmarks/retrieval.py --plot-only benchmarks/results/retrieval/fashion-mnist-2d

Nothing is downloaded. Outputs (in ``--out``, default benchmarks/results/retrieval/latest):
results.md, results.json, loss_curves.png and, for 2-D/3-D embeddings, embeddings.png
(+ embeddings_test.npz that the plots are made from).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Other processes on a small machine make OpenMP's default busy-waiting very slow (measured
# 100x on 2 shared cores); must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _data import DATASETS, Dataset, DatasetNotFoundError, IDXError, load_dataset  # noqa: E402

METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
METRIC_SHORT = {
    "precision_at_1": "P@1",
    "r_precision": "R-Prec",
    "mean_average_precision_at_r": "MAP@R",
}
DEFAULT_EPOCHS = {"digits": 40, "fashion-mnist": 8, "idx": 8}


# --------------------------------------------------------------------------------------------
# reproducibility / environment
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy (also drives PML's MPerClassSampler via c_f.NUMPY_RANDOM) and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def enable_determinism(device: torch.device) -> None:
    """CPU kernels used here are deterministic for a fixed thread count, so nothing is needed
    there (``torch.use_deterministic_algorithms`` costs seconds at first call: it imports
    torch._inductor). On CUDA ask for deterministic kernels (warn where none exists)."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {cpu} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cpus)"


def _try_import_faiss():
    try:
        import faiss  # noqa: F401

        return faiss
    except ImportError:  # includes sys.modules["faiss"] = None (used by the tests)
        return None


def versions() -> Dict[str, str]:
    import pytorch_metric_learning

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "numpy": np.__version__,
    }
    try:
        import pml_extras

        v["pml_extras"] = getattr(pml_extras, "__version__", "unknown")
    except Exception as e:  # the package may be mid-edit; record why
        v["pml_extras"] = f"unavailable ({type(e).__name__}: {e})"
    faiss = _try_import_faiss()
    if faiss is not None:
        v["faiss"] = getattr(faiss, "__version__", "unknown")
    try:
        import sklearn

        v["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    return v


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=_HERE,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def git_modified(paths: Sequence[str]) -> Optional[bool]:
    """True when ``paths`` differ from the checked-out commit (results made by uncommitted code)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=_HERE,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# k-NN backend + evaluation
# --------------------------------------------------------------------------------------------


def select_knn(device: torch.device, backend: str = "auto"):
    """Pick the k-NN function for AccuracyCalculator.

    Returns ``(knn_func, eval_device, name)``. With faiss (and, on a CUDA device, faiss GPU
    support) a faiss index; faiss-cpu only -> faiss on CPU; without faiss (or ``backend="torch"``)
    PML's ``CustomKNN`` with an L2 distance on the training device. faiss is only imported here,
    so nothing requires it to be installed.
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
            except AttributeError:
                num_gpus = 0
        if num_gpus > 0:
            return FaissKNN(gpus=[device.index or 0]), device, "faiss-gpu"
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
    emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if normalize:
        emb = F.normalize(emb, dim=1)
    lab = torch.as_tensor(remap_labels(labels))
    calc = AccuracyCalculator(
        include=METRICS, k="max_bin_count", device=device, knn_func=knn, avg_of_avgs=False
    )
    acc = calc.get_accuracy(emb.to(device), lab.to(device))
    return {m: float(acc[m]) for m in METRICS}


def classification_accuracy(logits, labels) -> float:
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(np.asarray(labels))
    return float((logits.argmax(dim=1).cpu() == labels.cpu()).float().mean())


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def make_model(kind: str, image_shape: Sequence[int], embedding_dim: int) -> nn.Module:
    """Small embedding nets (BatchNorm + ReLU between layers, linear embedding layer).

    ``mlp``: flatten -> 128 -> emb for inputs of <= 256 values (digits: 64 -> 128 -> emb),
    else flatten -> 256 -> 128 -> emb (28x28: 784 -> 256 -> 128 -> emb).
    ``cnn``: two 3x3 conv blocks (16, 32 channels, max-pool) -> 128 -> emb; closer to the
    seeds' CNNs but ~15x slower than the MLP on a CPU.
    """
    c, h, w = image_shape
    if kind == "mlp":
        d = c * h * w
        hidden = [128] if d <= 256 else [256, 128]
        layers: List[nn.Module] = [nn.Flatten()]
        for hdim in hidden:
            layers += [nn.Linear(d, hdim), nn.BatchNorm1d(hdim), nn.ReLU()]
            d = hdim
        layers.append(nn.Linear(d, embedding_dim))
        return nn.Sequential(*layers)
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, embedding_dim),
        )
    raise ValueError(f"unknown model {kind!r}")


# --------------------------------------------------------------------------------------------
# losses under test
# --------------------------------------------------------------------------------------------


class Method(nn.Module):
    """One loss under test: trainable loss-side modules + how to score classification.

    ``forward(emb, labels)`` returns the scalar training loss. ``classifiers`` maps an accuracy
    column (``"acc"`` = argmax of the loss's logits / linear classifier, ``"center_acc"`` =
    nearest center) to a function embeddings -> logits. ``normalize_eval``: retrieval uses
    L2-normalised embeddings (cosine geometry) for losses that normalise internally.
    """

    def __init__(
        self,
        loss: nn.Module,
        miner: Optional[nn.Module] = None,
        classifier: Optional[nn.Module] = None,
        aux_loss: Optional[nn.Module] = None,
        aux_weight: float = 1.0,
        normalize_eval: bool = True,
        classifiers: Optional[Dict[str, Callable]] = None,
        hparams: Optional[dict] = None,
    ):
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.classifier = classifier
        self.aux_loss = aux_loss
        self.aux_weight = aux_weight
        self.normalize_eval = normalize_eval
        self.classifiers = classifiers or {}
        self.hparams = hparams or {}

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.classifier is not None:  # TrainWithClassifier-style: CE on a linear head
            total = F.cross_entropy(self.classifier(emb), labels)
            if self.loss is not None:
                total = total + self.aux_weight * self.loss(emb, labels)
            return total
        indices_tuple = self.miner(emb, labels) if self.miner is not None else None
        return self.loss(emb, labels, indices_tuple)


def _ours(name: str):
    try:
        from pml_extras import losses as ours
    except Exception as e:
        raise RuntimeError(f"cannot import pml_extras.losses ({type(e).__name__}: {e})") from e
    cls = getattr(ours, name, None)
    if cls is None:
        raise RuntimeError(f"pml_extras.losses has no {name} (not implemented yet?)")
    return cls


def _logits_of(module):
    return lambda emb: module.get_logits(emb)


def build_sparse_circle(c: int, d: int) -> Method:
    hp = {"m": 0.25, "gamma": 256}
    loss = _ours("SparseCircleLoss")(c, d, **hp)
    return Method(loss, classifiers={"acc": _logits_of(loss)}, hparams=hp)


def build_curricularface(c: int, d: int) -> Method:
    hp = {"margin": 0.5, "scale": 64.0, "momentum": 0.01}
    loss = _ours("CurricularFaceLoss")(c, d, **hp)
    return Method(loss, classifiers={"acc": _logits_of(loss)}, hparams=hp)


CENTER_UPDATE = {"rule": "gradient"}  # set from --center-update


def build_center_softmax(c: int, d: int) -> Method:
    hp = {"weight_cent": 1.0, "update_rule": CENTER_UPDATE["rule"]}
    center = _ours("CenterLoss")(c, d, update_rule=hp["update_rule"])
    clf = nn.Linear(d, c)
    return Method(
        center,
        classifier=clf,
        aux_weight=hp["weight_cent"],
        normalize_eval=False,
        classifiers={"acc": clf, "center_acc": _logits_of(center)},
        hparams=hp,
    )


def build_standalone_center(c: int, d: int) -> Method:
    hp = {"intra_weight": 1.0, "inter_weight": 0.1}
    loss = _ours("StandaloneCenterLoss")(c, d, **hp)
    return Method(
        loss, normalize_eval=False, classifiers={"center_acc": _logits_of(loss)}, hparams=hp
    )


def build_pml_circle(c: int, d: int) -> Method:
    from pytorch_metric_learning import losses, miners

    hp = {"m": 0.25, "gamma": 256, "miner": "MultiSimilarityMiner(epsilon=0.1)"}
    return Method(
        losses.CircleLoss(m=0.25, gamma=256),
        miner=miners.MultiSimilarityMiner(epsilon=0.1),
        hparams=hp,
    )


def build_arcface(c: int, d: int) -> Method:
    from pytorch_metric_learning import losses

    hp = {"margin_degrees": 28.6, "scale": 64}
    loss = losses.ArcFaceLoss(c, d, margin=28.6, scale=64)
    return Method(loss, classifiers={"acc": _logits_of(loss)}, hparams=hp)


def build_cosface(c: int, d: int) -> Method:
    from pytorch_metric_learning import losses

    hp = {"margin": 0.35, "scale": 64}
    loss = losses.CosFaceLoss(c, d, margin=0.35, scale=64)
    return Method(loss, classifiers={"acc": _logits_of(loss)}, hparams=hp)


def build_multisimilarity(c: int, d: int) -> Method:
    from pytorch_metric_learning import losses, miners

    hp = {"alpha": 2, "beta": 50, "base": 0.5, "miner": "MultiSimilarityMiner(epsilon=0.1)"}
    return Method(
        losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
        miner=miners.MultiSimilarityMiner(epsilon=0.1),
        hparams=hp,
    )


def build_triplet(c: int, d: int) -> Method:
    from pytorch_metric_learning import losses, miners

    hp = {"margin": 0.2, "miner": "TripletMarginMiner(margin=0.2, type_of_triplets='semihard')"}
    return Method(
        losses.TripletMarginLoss(margin=0.2),
        miner=miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
        hparams=hp,
    )


def build_softmax(c: int, d: int) -> Method:
    clf = nn.Linear(d, c)
    return Method(None, classifier=clf, normalize_eval=False, classifiers={"acc": clf})


# name -> (source, builder, aliases)
LOSSES: Dict[str, Tuple[str, Callable[[int, int], Method], Tuple[str, ...]]] = {
    "SparseCircleLoss": ("ours", build_sparse_circle, ("sparsecircle", "circle-class")),
    "CurricularFaceLoss": ("ours", build_curricularface, ("curricularface",)),
    "CenterLoss+Softmax": ("ours", build_center_softmax, ("centerloss", "center")),
    "StandaloneCenterLoss": ("ours", build_standalone_center, ("standalone",)),
    "CircleLoss": ("PML", build_pml_circle, ("circle", "circle-pair")),
    "ArcFaceLoss": ("PML", build_arcface, ("arcface",)),
    "CosFaceLoss": ("PML", build_cosface, ("cosface",)),
    "MultiSimilarityLoss": ("PML", build_multisimilarity, ("multisimilarity", "ms")),
    "TripletMarginLoss": ("PML", build_triplet, ("triplet", "tripletmargin")),
    "Softmax": ("PML", build_softmax, ("softmax", "xent", "ce", "crossentropy")),
}


def parse_losses(spec: str) -> List[str]:
    """Comma list of loss names/aliases (case-insensitive) or groups ``all``/``ours``/``pml``."""
    lookup = {}
    for name, (_, _, aliases) in LOSSES.items():
        for key in (name, *aliases):
            lookup[key.lower()] = name
    out: List[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        low = tok.lower()
        if low == "all":
            names = list(LOSSES)
        elif low in ("ours", "pml"):
            names = [n for n, (src, _, _) in LOSSES.items() if src.lower() == low]
        elif low in lookup:
            names = [lookup[low]]
        else:
            raise SystemExit(
                f"--losses: unknown loss {tok!r}; choose from all, ours, pml, " + ", ".join(LOSSES)
            )
        out += [n for n in names if n not in out]
    if not out:
        raise SystemExit("--losses: empty list")
    return out


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def choose_m_per_class(batch_size: int, num_classes: int) -> int:
    """Smallest m that divides batch_size with m * num_classes >= batch_size (MPerClassSampler)."""
    for m in range(max(1, math.ceil(batch_size / num_classes)), batch_size + 1):
        if batch_size % m == 0:
            return m
    return batch_size


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 2048):
    model.eval()
    out = [model(x[i : i + batch_size].to(device)).float() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def _loss_param_snapshot(method: Method) -> List[torch.Tensor]:
    return [p.detach().clone() for p in method.parameters()]


def train_and_evaluate(
    name: str,
    ds: Dataset,
    args: argparse.Namespace,
    device: torch.device,
    knn,
    knn_device: torch.device,
) -> Tuple[dict, Optional[np.ndarray]]:
    """Train one model with loss ``name``; return (result dict, test embeddings as numpy)."""
    source, builder, _ = LOSSES[name]
    seed_everything(args.seed)  # identical init + batches for every loss, whatever the order
    t0 = time.perf_counter()
    model = make_model(args.model, ds.image_shape, args.embedding_dim).to(device)
    method = builder(ds.num_classes, args.embedding_dim).to(device)
    loss_params = [p for p in method.parameters()]
    frozen = [n for n, p in method.named_parameters() if not p.requires_grad]
    groups = [{"params": list(model.parameters()), "lr": args.lr}]
    if loss_params:
        groups.append({"params": loss_params, "lr": args.loss_lr})
    opt = torch.optim.Adam(groups)

    from pytorch_metric_learning.samplers import MPerClassSampler

    ytr = torch.as_tensor(ds.y_train)
    m = choose_m_per_class(args.batch_size, ds.num_classes)
    sampler = MPerClassSampler(
        ds.y_train, m=m, batch_size=args.batch_size, length_before_new_iter=len(ds.y_train)
    )
    steps_per_epoch = len(sampler) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps)))
    )
    xtr = torch.as_tensor(ds.x_train).to(device)
    ytr = ytr.to(device)
    before = _loss_param_snapshot(method)

    epoch_losses: List[float] = []
    step_losses: List[float] = []
    diverged = None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        desc=f"{name:>20s}",
        disable=not args.progress,
        leave=True,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    t_train = time.perf_counter()
    cpu_train = time.process_time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        method.train()
        idx = torch.as_tensor(list(iter(sampler)), dtype=torch.long)
        idx = idx[: steps_per_epoch * args.batch_size].view(steps_per_epoch, args.batch_size)
        running = []
        for b in idx:
            b = b.to(device)
            emb = model(xtr[b])
            loss = method(emb, ytr[b])
            if not torch.isfinite(loss) or not torch.isfinite(emb).all():
                what = "loss" if not torch.isfinite(loss) else "embeddings"
                diverged = {"epoch": epoch, "step": len(step_losses) + 1, "what": what}
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            lv = float(loss.detach())
            running.append(lv)
            step_losses.append(lv)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{lv:.4g}", refresh=False)
        if diverged is None and not all(torch.isfinite(p).all() for p in model.parameters()):
            diverged = {"epoch": epoch, "step": len(step_losses), "what": "model parameters"}
        if diverged is not None:
            break
        epoch_losses.append(float(np.mean(running)) if running else float("nan"))
    bar.close()
    train_s = time.perf_counter() - t_train
    train_cpu_s = time.process_time() - cpu_train

    result = {
        "loss": name,
        "source": source,
        "hparams": method.hparams,
        "m_per_class": m,
        "steps_per_epoch": steps_per_epoch,
        "epochs_completed": len(epoch_losses),
        "epoch_losses": epoch_losses,
        "step_losses": _downsample(step_losses, 2000),
        "normalize_eval": method.normalize_eval,
        "n_loss_params": int(sum(p.numel() for p in loss_params)),
        "frozen_loss_params": frozen,
        # None: the loss has no parameters (pair losses)
        "loss_params_updated": (
            all(not torch.equal(a, b.detach()) for a, b in zip(before, method.parameters()))
            if loss_params
            else None
        ),
        "diverged": diverged,
        "metrics": {},
        "timings_s": {"train": train_s, "train_cpu": train_cpu_s},
    }
    if loss_params and not result["loss_params_updated"] and diverged is None:
        print(
            f"WARNING: {name}: some loss parameters were not updated by training", file=sys.stderr
        )

    test_emb = None
    t_eval = time.perf_counter()
    if diverged is None:
        model.eval()
        method.eval()
        emb = embed(model, torch.as_tensor(ds.x_test), device)
        if not torch.isfinite(emb).all():
            result["diverged"] = {"epoch": args.epochs, "step": None, "what": "test embeddings"}
        else:
            eval_emb = F.normalize(emb, dim=1) if method.normalize_eval else emb
            result["metrics"] = retrieval_metrics(
                eval_emb.cpu().numpy(), ds.y_test, knn=knn, device=knn_device
            )
            with torch.no_grad():
                for col, fn in method.classifiers.items():
                    logits = fn(emb)
                    result["metrics"][col] = classification_accuracy(logits, ds.y_test)
            test_emb = emb.cpu().numpy()
    result["timings_s"]["eval"] = time.perf_counter() - t_eval
    result["timings_s"]["total"] = time.perf_counter() - t0
    return result, test_emb


def _downsample(xs: List[float], n: int) -> List[float]:
    if len(xs) <= n:
        return list(xs)
    k = math.ceil(len(xs) / n)
    return [float(np.mean(xs[i : i + k])) for i in range(0, len(xs), k)]


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def results_table(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"Dataset **{cfg['dataset']}** ({results['dataset']['n_train']} train / "
        f"{results['dataset']['n_test']} test, {results['dataset']['num_classes']} classes), "
        f"model `{cfg['model']}`, embedding dim {cfg['embedding_dim']}, {cfg['epochs']} epochs, "
        f"batch {cfg['batch_size']}, lr {cfg['lr']} (loss params {cfg['loss_lr']}), "
        f"seed {cfg['seed']}, device {results['device_name']}, k-NN `{results['knn_backend']}`.",
        "",
        "| Loss | Source | P@1 | R-Prec | MAP@R | Acc (logits) | Acc (nearest center) "
        "| Train s | Status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["losses"]:
        met = r["metrics"]
        if r.get("error"):
            status = f"error: {r['error']}"
        elif r["diverged"]:
            d = r["diverged"]
            status = f"diverged (epoch {d['epoch']}, non-finite {d['what']})"
        else:
            status = "ok"
        lines.append(
            f"| {r['loss']} | {r['source']} | "
            + " | ".join(_fmt(met.get(k)) for k in (*METRICS, "acc", "center_acc"))
            + f" | {r['timings_s'].get('train', 0.0):.1f} | {status} |"
        )
    lines += [
        "",
        "P@1 / R-Prec / MAP@R: pytorch-metric-learning AccuracyCalculator, k=max_bin_count, test "
        "split against itself (leave-one-out); L2-normalised embeddings for losses that normalise "
        "(all but Softmax and the center losses). Acc (logits): argmax of the loss's get_logits "
        "or of the linear classifier; Acc (nearest center): argmax of the center loss's "
        "get_logits (= -distance to the centers).",
    ]
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name)


def plot_results(out_dir: str) -> List[str]:
    """Make the PNGs from ``results.json`` (+ ``embeddings_test.npz``) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    written = []
    runs = [r for r in results["losses"] if r.get("step_losses")]
    title = (
        f"{results['config']['dataset']}, {results['config']['embedding_dim']}-D, "
        f"{results['config']['epochs']} epochs"
    )
    if runs:
        n = len(runs)
        cols = min(5, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, r in zip(axes.flat, runs):
            y = np.asarray(r["step_losses"], dtype=float)
            x = np.linspace(0, max(r["epochs_completed"], 1e-9), num=len(y), endpoint=True)
            ax.plot(x, y, lw=0.6, alpha=0.5, color="C0", label="step")
            if r["epoch_losses"]:
                ex = np.arange(1, len(r["epoch_losses"]) + 1)
                ax.plot(ex, r["epoch_losses"], "o-", ms=3, color="C3", label="epoch mean")
            if r["diverged"]:
                ax.axvline(r["diverged"]["epoch"], color="k", ls="--", lw=0.8)
            ax.set_title(r["loss"] + (" (diverged)" if r["diverged"] else ""), fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"Training loss — {title}", fontsize=10)
        fig.tight_layout()
        p = os.path.join(out_dir, "loss_curves.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    npz_path = os.path.join(out_dir, "embeddings_test.npz")
    dim = results["config"]["embedding_dim"]
    if dim in (2, 3) and os.path.exists(npz_path):
        data = np.load(npz_path)
        labels = data["labels"]
        runs = [r for r in results["losses"] if r.get("metrics") or r.get("diverged")]
        if runs:
            n = len(runs)
            cols = min(5, n)
            rows = math.ceil(n / cols)
            kw = {"projection": "3d"} if dim == 3 else {}
            fig = plt.figure(figsize=(3.2 * cols, 3.5 * rows + 0.4))
            cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
            for i, r in enumerate(runs):
                ax = fig.add_subplot(rows, cols, i + 1, **kw)
                key = "emb_" + _safe(r["loss"])
                if key not in data:  # diverged: nothing to draw
                    d = r.get("diverged") or {}
                    ax.set_title(r["loss"], fontsize=8)
                    ax.text(
                        0.5,
                        0.5,
                        f"diverged\n(epoch {d.get('epoch')})",
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        fontsize=10,
                        color="C3",
                    )
                    ax.set_xticks([])
                    ax.set_yticks([])
                    continue
                e = data[key].astype(np.float64)
                e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
                rng = np.random.default_rng(0)
                sel = rng.permutation(len(e))[: min(len(e), 5000)]
                c = cmap(labels[sel] % cmap.N)
                if dim == 2:
                    # small radial offset per class so the classes do not hide each other
                    rad = 1.0 + 0.015 * (labels[sel] - labels.max() / 2.0)
                    ax.scatter(e[sel, 0] * rad, e[sel, 1] * rad, c=c, s=2, alpha=0.6, linewidths=0)
                    ax.set_aspect("equal")
                    ax.set_xlim(-1.2, 1.2)
                    ax.set_ylim(-1.2, 1.2)
                else:
                    ax.scatter(e[sel, 0], e[sel, 1], e[sel, 2], c=c, s=2, alpha=0.6)
                p1 = r["metrics"].get("precision_at_1")
                ax.set_title(f"{r['loss']}\nP@1 {_fmt(p1)}", fontsize=8)
                ax.tick_params(labelsize=6)
            names = results["dataset"].get("class_names") or []
            handles = [
                plt.Line2D([], [], ls="", marker="o", ms=4, color=cmap(k % cmap.N), label=nm)
                for k, nm in enumerate(names[: int(labels.max()) + 1])
            ]
            fig.suptitle(f"Normalised test embeddings by class — {title}", fontsize=10)
            if handles:
                fig.legend(
                    handles=handles,
                    loc="lower center",
                    ncol=min(10, len(handles)),
                    fontsize=7,
                    frameon=False,
                )
            fig.tight_layout(rect=(0, 0.04 if handles else 0, 1, 0.97), h_pad=1.5)
            p = os.path.join(out_dir, "embeddings.png")
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(p)
    return written


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where they say nothing (None, flags)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Train one small embedding model per loss and evaluate retrieval (P@1, R-precision, "
            "MAP@R via PML's AccuracyCalculator) plus classification / nearest-center accuracy "
            "on a held-out split."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits: scikit-learn's bundled 8x8 digits; fashion-mnist: IDX files in "
        "--data-dir; idx: any MNIST-form IDX set (e.g. MNIST) in --data-dir",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte"
        "[.gz], t10k-*; fashion-mnist default /usr/share/datasets/fashion-mnist "
        "(Debian package dataset-fashion-mnist)",
    )
    p.add_argument(
        "--losses", default="all", help="comma list of: all, ours, pml, " + ", ".join(LOSSES)
    )
    p.add_argument("--embedding-dim", type=int, default=128, help="2 or 3 also plot the embeddings")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()),
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="batches from PML's MPerClassSampler (m = smallest divisor with m*classes >= batch)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the model (cosine decay)")
    p.add_argument(
        "--loss-lr",
        type=float,
        default=None,
        help="Adam lr of the loss parameters (proxies/centers/classifier); default 10 x --lr",
    )
    p.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="mlp: flatten -> 128 -> emb (digits) / 784 -> 256 -> 128 -> emb (28x28); "
        "cnn: two conv blocks (16, 32 channels) -> 128 -> emb, ~15x slower on CPU",
    )
    p.add_argument(
        "--center-update",
        choices=("gradient", "paper"),
        default="gradient",
        help="CenterLoss+Softmax: centers trained by the optimizer (gradient) or by "
        "the paper's non-gradient update rule",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds torch, numpy (sampler), random; per loss"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--knn",
        choices=("auto", "faiss", "torch"),
        default="auto",
        help="k-NN for AccuracyCalculator: auto = faiss (GPU index on a GPU with "
        "faiss-gpu, else CPU) if importable, else PML CustomKNN on --device",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; default 1 for digits (tiny model: threads only add "
        "overhead), else torch's default",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: results/retrieval/latest next to this script)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no tqdm progress bars"
    )
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNGs")
    p.add_argument(
        "--plot-only",
        metavar="DIR",
        default=None,
        help="only (re)make the PNGs from DIR/results.json and exit",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.plot_only:
        for path in plot_results(args.plot_only):
            print(path)
        return {}
    if (
        args.embedding_dim < 1
        or args.batch_size < 2
        or (args.epochs is not None and args.epochs < 1)
    ):
        raise SystemExit("--embedding-dim >= 1, --batch-size >= 2 and --epochs >= 1 required")
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.dataset]
    if args.out is None:
        args.out = os.path.join(_HERE, "results", "retrieval", "latest")
    if args.loss_lr is None:
        args.loss_lr = 10 * args.lr
    if args.threads is None and args.dataset == "digits":
        args.threads = 1
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:  # main() is also called from tests: leave the process as we found it
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> dict:
    names = parse_losses(args.losses)
    CENTER_UPDATE["rule"] = args.center_update
    device = resolve_device(args.device)
    enable_determinism(device)

    try:
        ds = load_dataset(args.dataset, args.data_dir)
    except (DatasetNotFoundError, IDXError) as e:
        raise SystemExit(f"error: {e}") from e
    if ds.num_classes < 2:
        raise SystemExit("need at least 2 classes")

    knn, knn_device, knn_name = select_knn(device, args.knn)
    os.makedirs(args.out, exist_ok=True)
    results = {
        "config": {k: v for k, v in vars(args).items() if k not in ("plot_only",)},
        "losses_requested": names,
        "seed": args.seed,
        "dataset": ds.summary(),
        "device": str(device),
        "device_name": device_name(device),
        "knn_backend": knn_name,
        "versions": versions(),
        "git_commit": git_commit(),
        "benchmark_code_modified_since_commit": git_modified(
            [os.path.abspath(__file__), os.path.join(_HERE, "_data.py")]
        ),
        "command": "python "
        + " ".join([os.path.relpath(__file__)] + list(sys.argv[1:] if argv is None else argv)),
        "losses": [],
    }
    embeddings = {}
    t_all = time.perf_counter()
    for name in names:
        try:
            res, emb = train_and_evaluate(name, ds, args, device, knn, knn_device)
        except Exception as e:  # e.g. a loss of ours not implemented yet: keep going
            traceback.print_exc()
            print(f"ERROR: {name}: {type(e).__name__}: {e}", file=sys.stderr)
            res = {
                "loss": name,
                "source": LOSSES[name][0],
                "error": str(e),
                "diverged": None,
                "metrics": {},
                "timings_s": {},
                "epoch_losses": [],
                "step_losses": [],
            }
            emb = None
        results["losses"].append(res)
        if emb is not None and args.embedding_dim <= 3:
            embeddings["emb_" + _safe(name)] = emb.astype(np.float32)
    results["timings_s"] = {"total": time.perf_counter() - t_all}

    table = results_table(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    if embeddings:
        np.savez_compressed(
            os.path.join(args.out, "embeddings_test.npz"), labels=ds.y_test, **embeddings
        )
    print(table)
    if args.plots:
        for path in plot_results(args.out):
            print(f"wrote {path}", file=sys.stderr)
    print(f"results in {args.out} ({results['timings_s']['total']:.1f} s)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
