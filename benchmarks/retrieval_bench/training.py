"""Training one model with one loss, then evaluating it: the benchmark's inner loop.

Batches come from PML's ``MPerClassSampler`` driven by a generator of the run's (seed, epoch)
alone, and each sample's augmentation by a seed of its own (:func:`batch_stream`): the same
batches and crops for every loss at a given seed, whatever ``--workers`` is. Adam with a
cosine decay, optional ``torch.autocast`` (``--amp bf16|fp16``, with a
``GradScaler`` for fp16). Divergence (a non-finite loss, embedding or parameter) stops the
run and is reported instead of a number.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .env import seed_everything
from .evaluation import autocast, classification_accuracy, embed, retrieval_metrics
from .losses import LOSSES, build_method
from .models import model_for

__all__ = [
    "choose_m_per_class",
    "check_batching",
    "batch_stream",
    "freeze_batchnorm",
    "make_scaler",
    "train_and_evaluate",
]


def choose_m_per_class(batch_size: int, num_classes: int) -> int:
    """Smallest m >= 2 that divides batch_size with m * num_classes >= batch_size
    (MPerClassSampler). At least 2, so that every class in a batch has a positive pair even
    with many classes (SOP: 11,318 training classes)."""
    for m in range(max(2, math.ceil(batch_size / num_classes)), batch_size + 1):
        if batch_size % m == 0:
            return m
    return batch_size


def check_batching(n_samples: int, num_classes: int, batch_size: int, m: int, what: str) -> None:
    """Refuse, with a message naming the values, what PML's ``MPerClassSampler`` would reject
    with a bare ``AssertionError`` (checked before any sampler is built)."""
    problems = []
    if m < 1:
        problems.append(f"--m-per-class {m} must be >= 1")
    elif batch_size % m:
        problems.append(f"--m-per-class {m} does not divide --batch-size {batch_size}")
    elif m * num_classes < batch_size:
        problems.append(
            f"--batch-size {batch_size} needs at least {math.ceil(batch_size / m)} classes at "
            f"--m-per-class {m}, but {what} has {num_classes}"
        )
    if n_samples < batch_size:
        problems.append(
            f"{what} has {n_samples} training samples, fewer than --batch-size {batch_size}"
        )
    if problems:
        raise SystemExit(
            "error: " + "; ".join(problems) + ": lower --batch-size (or change --m-per-class)"
        )


def resolve_m(args, num_classes: int) -> int:
    """``--m-per-class``, or the smallest workable m for the batch (in-memory data sets)."""
    m = getattr(args, "m_per_class", None)
    return m if m else choose_m_per_class(args.batch_size, num_classes)


def batch_stream(labels: np.ndarray, batch_size: int, m: int, seed: int, epoch: int):
    """One epoch's batches: ``(index_batches (steps, batch) int64, aug_seeds (steps, batch)
    int64)``. Everything is drawn from generators of this (seed, epoch) alone, never from the
    global RNGs, so that every loss sees the same batches and the same augmentations whatever
    building it consumed, and whatever the number of DataLoader workers."""
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils import common_functions as c_f

    n = len(labels)
    sampler = MPerClassSampler(labels, m=m, batch_size=batch_size, length_before_new_iter=n)
    steps = len(sampler) // batch_size
    ss = np.random.SeedSequence([int(seed), int(epoch)])
    batch_ss, aug_ss = ss.spawn(2)
    saved = c_f.NUMPY_RANDOM
    c_f.NUMPY_RANDOM = np.random.RandomState(batch_ss.generate_state(4))  # the sampler's RNG
    try:
        idx = np.asarray(list(iter(sampler)), dtype=np.int64)
    finally:
        c_f.NUMPY_RANDOM = saved
    idx = idx[: steps * batch_size].reshape(steps, batch_size)
    aug = aug_ss.generate_state(steps * batch_size, dtype=np.uint32).astype(np.int64)
    return torch.as_tensor(idx), torch.as_tensor(aug.reshape(steps, batch_size))


def freeze_batchnorm(model: torch.nn.Module) -> List[str]:
    """``--freeze-bn``: BatchNorm layers in eval mode (running statistics frozen, as with a
    pretrained trunk) and their affine parameters not trained. Returns the layers' names."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)
            names.append(name)
    return names


def make_scaler(device: torch.device, amp: Optional[str]):
    """A GradScaler for fp16 (its gradients underflow without one); None otherwise."""
    if amp == "fp16":
        return torch.amp.GradScaler(device.type)
    return None


def _downsample(xs: List[float], n: int) -> List[float]:
    if len(xs) <= n:
        return list(xs)
    k = math.ceil(len(xs) / n)
    return [float(np.mean(xs[i : i + k])) for i in range(0, len(xs), k)]


def train_and_evaluate(
    name: str,
    protocol,
    args,
    device: torch.device,
    knn,
    knn_device: torch.device,
    seed: int,
    overrides: Optional[Dict[str, Dict[str, object]]] = None,
) -> Tuple[dict, Optional[np.ndarray]]:
    """Train one model with loss ``name`` on ``protocol.train`` and score it on
    ``protocol.test``; return (result dict, test embeddings as numpy or None)."""
    spec = LOSSES[name]
    seed_everything(seed)  # identical init + batches for every loss, whatever the order
    t0 = time.perf_counter()
    model, model_info = model_for(args, protocol.image_shape)
    model = model.to(device)
    freeze_bn = bool(getattr(args, "freeze_bn", False))
    if freeze_bn:
        freeze_batchnorm(model)
    method = build_method(name, protocol.num_classes, args.embedding_dim, overrides).to(device)
    loss_params = list(method.parameters())
    frozen = [n for n, p in method.named_parameters() if not p.requires_grad]
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": args.lr}]
    if loss_params:
        groups.append({"params": loss_params, "lr": args.loss_lr})
    opt = torch.optim.Adam(groups)
    amp = getattr(args, "amp", None)
    scaler = make_scaler(device, amp)

    labels = protocol.train.labels
    m = resolve_m(args, protocol.num_classes)
    check_batching(len(labels), protocol.num_classes, args.batch_size, m, "the training split")
    steps_per_epoch = len(labels) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps)))
    )
    before = [p.detach().clone() for p in method.parameters()]

    epoch_losses: List[float] = []
    step_losses: List[float] = []
    diverged = None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        desc=f"{name:>20s} s{seed}",
        disable=not args.progress,
        leave=True,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    t_train = time.perf_counter()
    cpu_train = time.process_time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        if freeze_bn:
            freeze_batchnorm(model)
        method.train()
        idx, aug = batch_stream(labels, args.batch_size, m, seed, epoch)
        running = []
        for x, y in protocol.train.train_batches(idx, device, aug_seeds=aug):
            with autocast(device, amp):
                emb = model(x)
                loss = method(emb, y)
            if not torch.isfinite(loss) or not torch.isfinite(emb).all():
                what = "loss" if not torch.isfinite(loss) else "embeddings"
                diverged = {"epoch": epoch, "step": len(step_losses) + 1, "what": what}
                break
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
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
        "source": spec.source,
        "seed": seed,
        "split": protocol.split,
        "hparams": method.hparams,
        "model": model_info,
        "m_per_class": m,
        "steps_per_epoch": steps_per_epoch,
        "epochs_completed": len(epoch_losses),
        "epoch_losses": epoch_losses,
        "step_losses": _downsample(step_losses, 2000),
        "normalize_eval": True,  # every embedding is L2-normalised before k-NN
        "normalizes_internally": method.normalize_eval,
        "freeze_bn": freeze_bn,
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
        method.eval()
        emb = embed(model, protocol.test.eval_batches(args.eval_batch_size, device), device, amp)
        if not torch.isfinite(emb).all():
            result["diverged"] = {"epoch": args.epochs, "step": None, "what": "test embeddings"}
        else:
            # the reality check (Musgrave et al., ECCV 2020): every embedding L2-normalised
            # before k-NN; losses that do not normalise internally also get their raw score
            test_labels = protocol.test.labels
            result["metrics"] = retrieval_metrics(
                F.normalize(emb, dim=1), test_labels, knn=knn, device=knn_device
            )
            if not method.normalize_eval:
                result["metrics_unnormalized"] = retrieval_metrics(
                    emb, test_labels, knn=knn, device=knn_device
                )
            if protocol.classification:  # only where the test classes were trained
                with torch.no_grad():
                    for col, fn in method.classifiers.items():
                        result["metrics"][col] = classification_accuracy(
                            fn(emb).float(), test_labels
                        )
            test_emb = emb.cpu().numpy()
    result["timings_s"]["eval"] = time.perf_counter() - t_eval
    result["timings_s"]["total"] = time.perf_counter() - t0
    return result, test_emb
