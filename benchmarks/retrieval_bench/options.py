"""Options of the retrieval benchmark: the argument parser, its defaults and the seed list.

``python benchmarks/retrieval.py --help`` prints them; :mod:`.cli` runs what they ask for.
"""

from __future__ import annotations

import argparse
from typing import List

from .data import DATASETS, SPLITS
from .evaluation import AMP_DTYPES
from .losses import LOSSES
from .models import MODELS

__all__ = ["DEFAULT_EPOCHS", "IMAGE_DATASETS", "build_parser", "parse_seeds"]

DEFAULT_EPOCHS = {"digits": 40, "fashion-mnist": 8, "idx": 8}
IMAGE_DATASETS = ("folder", "cub200", "cars196", "sop")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where they say nothing (None, flags)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parse_seeds(text: str) -> List[int]:
    """``'0,1,2'`` or ``'0-4'`` (inclusive) or a mix -> distinct non-negative ints in order."""
    out: List[int] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        lo, _, hi = tok.partition("-")
        try:
            vals = list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        except ValueError:
            vals = []
        if not vals:
            raise SystemExit(
                f"--seeds: {tok!r} is not a non-negative integer or a range a-b (e.g. 0,1,2 or 0-4)"
            )
        out += [v for v in vals if v not in out]
    if not out:
        raise SystemExit("--seeds: empty list")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(
            "Train one embedding model per loss (and seed) and evaluate retrieval (P@1, "
            "R-precision, MAP@R via PML's AccuracyCalculator) on held-out images: of the "
            "training classes (--split samples, plus classification accuracy) or of unseen "
            "classes (--split classes)."
        ),
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits: scikit-learn's bundled 8x8 digits; fashion-mnist: IDX files in "
        "--data-dir; idx: any MNIST-form IDX set (e.g. MNIST) in --data-dir; folder: "
        "--data-dir/CLASS/IMAGE files; cub200 / cars196 / sop: CUB-200-2011 "
        "(images.txt, image_class_labels.txt, images/), Cars196 (cars_annos.mat, car_ims/), "
        "Stanford Online Products (Ebay_train.txt, Ebay_test.txt) in --data-dir",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="dataset directory; fashion-mnist default /usr/share/datasets/fashion-mnist "
        "(Debian package dataset-fashion-mnist). Nothing is downloaded",
    )
    g.add_argument(
        "--split",
        choices=SPLITS,
        default="auto",
        help="samples: closed set (test images of the training classes; also classification "
        "accuracy); classes: class-disjoint (train on one half of the classes, retrieve "
        "among the other: digits/fashion-mnist 0-4/5-9, CUB 1-100/101-200, Cars 1-98/99-196, "
        "SOP its own lists); both; auto: both for digits, samples for fashion-mnist/idx, "
        "classes for the image datasets",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="image datasets: crop size (train: random resized crop + flip; test: resize to "
        "size*256/224, center crop)",
    )
    g.add_argument(
        "--workers", type=int, default=4, help="image datasets: DataLoader worker processes"
    )
    g.add_argument(
        "--on-bad-image",
        choices=("stop", "skip"),
        default="stop",
        help="image datasets: a file that is not a readable image stops the run (naming it) "
        "or is skipped with a warning",
    )
    g = p.add_argument_group("losses")
    g.add_argument(
        "--losses", default="all", help="comma list of: all, ours, pml, " + ", ".join(LOSSES)
    )
    g.add_argument(
        "--loss-args",
        default=None,
        metavar="SPEC",
        help="keyword arguments per loss, e.g. 'SparseCircleLoss:m=0.4,gamma=80;"
        "ArcFaceLoss:margin=28.6;CircleLoss:miner.epsilon=0.2' (miner.KEY: the loss's miner; "
        "CenterLoss+Softmax also takes weight_cent); checked against each constructor",
    )
    g.add_argument(
        "--center-update",
        choices=("gradient", "paper"),
        default="gradient",
        help="CenterLoss+Softmax: centers trained by the optimizer (gradient) or by "
        "the paper's non-gradient update rule",
    )
    g = p.add_argument_group("model and training")
    g.add_argument(
        "--model",
        choices=MODELS,
        default="mlp",
        help="mlp: flatten -> 128 -> emb (digits) / 784 -> 256 -> 128 -> emb (28x28); "
        "cnn: two conv blocks (16, 32 channels) -> 128 -> emb, ~15x slower on CPU; "
        "resnet18/resnet50: torchvision's ResNet + a linear embedding layer",
    )
    g.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="resnet: a local state_dict (of torchvision's resnet, or of a saved embedding "
        "model); default random initialisation",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="resnet: torchvision's ImageNet weights through torchvision's cache (downloads "
        "on first use where the network allows)",
    )
    g.add_argument("--embedding-dim", type=int, default=128, help="2 or 3 also plot the embeddings")
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()) + ", else 20",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batches from PML's MPerClassSampler; default 32 for the image datasets (the "
        "reality check's), 128 in memory",
    )
    g.add_argument(
        "--m-per-class",
        type=int,
        default=None,
        help="images per class in a batch; default 4 for the image datasets (the reality "
        "check's), in memory the smallest divisor m of the batch with m*classes >= batch",
    )
    g.add_argument(
        "--folds",
        type=int,
        default=None,
        help="--split classes: K class-disjoint validation folds on the training classes; "
        "the final runs train one model per fold and report the K models' embeddings "
        "concatenated (e.g. 4 x 128 = 512-D) and separated (128-D, averaged); default 4 "
        "for the image datasets (the reality check's) where every seed's training split "
        "has >= 8 classes (else off, with a note), 0 (off) in memory",
    )
    g.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="N",
        help="N optuna (TPE) trials per loss over its documented search space, scored by "
        "mean MAP@R on the validation folds (the test classes untouched); the final runs "
        "use the best trial's values. Needs --folds",
    )
    g.add_argument(
        "--freeze-bn",
        action="store_true",
        help="BatchNorm layers in eval mode and not trained (as with a pretrained trunk; "
        "the reality check's setting)",
    )
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="test images embedded per batch (no_grad); default 2048 in memory, 128 from disk",
    )
    g.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the model (cosine decay)")
    g.add_argument(
        "--loss-lr",
        type=float,
        default=None,
        help="Adam lr of the loss parameters (proxies/centers/classifier); default 10 x --lr",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seeds torch, numpy (sampler), random; per loss"
    )
    g.add_argument(
        "--seeds",
        default=None,
        help="several seeds, e.g. 0,1,2 or 0-4: each loss runs once per seed (initialisation, "
        "batches and, with --split classes on a dataset without an official class split, "
        "the class partition); tables show mean ± std and 95 %% t-intervals, same-seed "
        "differences against --reference, plots the spread (overrides --seed)",
    )
    g.add_argument(
        "--reference",
        default=None,
        help="the loss (or baseline name) the same-seed differences are taken against; "
        "default the best baseline by MAP@R",
    )
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    g.add_argument(
        "--amp",
        choices=("none", *AMP_DTYPES),
        default="none",
        help="mixed precision: torch.autocast in bf16 or fp16 (fp16 with a GradScaler), "
        "training and test embedding; works on CPU too",
    )
    g.add_argument(
        "--knn",
        choices=("auto", "faiss", "torch"),
        default="auto",
        help="k-NN for AccuracyCalculator: auto = on CUDA faiss-gpu if it imports, else PML "
        "CustomKNN on the GPU; on CPU faiss-cpu if it imports, else CustomKNN",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; default 1 for digits (tiny model: threads only add "
        "overhead), else torch's default",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        default=None,
        help="output directory (default: results/retrieval/latest next to this script)",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no tqdm progress bars"
    )
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNGs")
    g.add_argument(
        "--plot-only",
        metavar="DIR",
        default=None,
        help="only (re)make the PNGs from DIR/results.json and exit",
    )
    g.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        default=None,
        help="combine the results.json of runs made separately (e.g. one process per seed) "
        "into --out: runs, baselines and class partitions concatenated, statistics, tables "
        "and plots remade with this code; with one DIR and no --out, remake its tables",
    )
    return p
