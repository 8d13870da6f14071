"""Command line of the retrieval benchmark: parse, run every (protocol, loss, seed), write
results.md / results.json / embeddings_test.npz and the plots.

``python benchmarks/retrieval.py --help`` lists the options; benchmarks/retrieval.py is the
entry point and calls :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .baselines import baseline_runs
from .data import (
    DATASETS,
    SPLITS,
    DatasetNotFoundError,
    IDXError,
    default_split,
    has_official_split,
    load_dataset,
    make_protocol,
)
from .env import (
    _HERE,
    device_name,
    enable_determinism,
    git_commit,
    git_modified,
    resolve_device,
    versions,
)
from .evaluation import AMP_DTYPES, select_knn
from .folds import class_folds, train_with_folds
from .images import ImageDataError
from .losses import LOSSES, parse_loss_args, parse_losses, preload
from .merge import merge_results
from .models import MODELS
from .plots import embedding_key, labels_key, plot_results
from .report import aggregate, rank, results_table
from .training import check_batching, resolve_m, train_and_evaluate
from .tuning import tune

__all__ = ["build_parser", "main", "parse_seeds"]

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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.plot_only:
        for path in plot_results(args.plot_only):
            print(path)
        return {}
    if args.merge:
        ref = args.reference
        if ref:
            with open(os.path.join(args.merge[0], "results.json")) as f:
                ref = _reference(ref, json.load(f)["losses_requested"])
        return merge_results(args.merge, args.out or args.merge[0], args.plots, ref)
    if args.embedding_dim < 2:
        raise SystemExit(
            f"error: --embedding-dim {args.embedding_dim}: must be >= 2 (in 1-D every "
            "L2-normalised embedding is +1 or -1)"
        )
    image_data = args.dataset in IMAGE_DATASETS
    if args.batch_size is None:
        args.batch_size = 32 if image_data else 128
    if args.m_per_class is None and image_data:
        args.m_per_class = 4
    if args.folds is not None and (args.folds == 1 or args.folds < 0):
        raise SystemExit(f"error: --folds {args.folds}: must be 0 (off) or >= 2")
    if args.tune < 0:
        raise SystemExit(f"error: --tune {args.tune}: must be >= 0")
    if args.tune and args.folds is not None and not args.folds:
        raise SystemExit("error: --tune needs --folds K (>= 2): trials are scored on folds")
    if args.batch_size < 2:
        raise SystemExit(f"error: --batch-size {args.batch_size}: must be >= 2")
    if args.m_per_class is not None and args.m_per_class < 1:
        raise SystemExit(f"error: --m-per-class {args.m_per_class}: must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(f"error: --epochs {args.epochs}: must be >= 1")
    if args.workers < 0 or args.image_size < 8:
        raise SystemExit("error: --workers >= 0 and --image-size >= 8 required")
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS.get(args.dataset, 20)
    if args.eval_batch_size is None:
        args.eval_batch_size = 128 if args.dataset in IMAGE_DATASETS else 2048
    if args.amp == "none":
        args.amp = None
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


def _final_run(name, protocol, args, device, knn, knn_device, seed, overrides):
    """One (loss, seed): tuned on the validation folds first with ``--tune``, then one
    model, or one per fold with ``--folds`` on the class-disjoint protocol."""

    def one(p, ov):
        return train_and_evaluate(name, p, args, device, knn, knn_device, seed=seed, overrides=ov)

    trials = []
    folds = args.folds if protocol.split == "classes" else 0
    if args.tune and folds:
        best, trials = tune(
            name, protocol, args, lambda vp, ov: one(vp, ov)[0], seed, args.tune, folds, overrides
        )
        if best is not None:
            overrides = best
    if folds:
        res, emb = train_with_folds(
            lambda fp: one(fp, overrides), protocol, folds, seed, knn, knn_device
        )
    else:
        res, emb = one(protocol, overrides)
    if args.tune:
        res["tuning"] = {"trials": trials, "best": overrides if trials else None}
    return res, emb


def _reference(text: str, names: List[str]) -> str:
    """``--reference``: a loss under test (name or alias) or a baseline (raw, untrained,
    frozen, or its full name)."""
    from .baselines import BASELINES

    low = text.strip().lower()
    for b in BASELINES:
        if low in (b.lower(), b.split(": ")[1].split()[0]):
            return b
    try:
        (name,) = parse_losses(text)
    except SystemExit:
        name = None
    if name is None or name not in names:
        raise SystemExit(
            f"--reference {text!r}: not a loss in --losses ({', '.join(names)}) nor a baseline "
            "(raw, untrained, frozen)"
        )
    return name


def _loss_args(args) -> Dict[str, Dict[str, Dict[str, object]]]:
    parsed = parse_loss_args(args.loss_args)
    if args.center_update != "gradient":
        entry = parsed.setdefault("CenterLoss+Softmax", {"loss": {}, "miner": {}, "extras": {}})
        entry["loss"].setdefault("update_rule", args.center_update)
    return parsed


def _run(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> dict:
    names = parse_losses(args.losses)
    preload(names)
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    if args.reference:
        args.reference = _reference(args.reference, names)
    overrides = _loss_args(args)
    not_run = [n for n in overrides if n not in names and n != "CenterLoss+Softmax"]
    if not_run:
        print(f"note: --loss-args for {', '.join(not_run)}, not in --losses", file=sys.stderr)
    split = default_split(args.dataset) if args.split == "auto" else args.split
    splits = ["samples", "classes"] if split == "both" else [split]
    device = resolve_device(args.device)
    if args.amp and device.type == "cuda" and args.amp == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise SystemExit("--amp bf16: this GPU has no bf16 support; use --amp fp16")
    enable_determinism(device)

    vary_partition = not has_official_split(args.dataset)
    try:
        ds = load_dataset(
            args.dataset,
            args.data_dir,
            image_size=args.image_size,
            workers=args.workers,
            on_bad_image=args.on_bad_image,
        )
        # one protocol per (split, seed): --seeds also draws the class partition where the
        # data set has no official one
        protocols_by_seed = {
            (s, seed): make_protocol(
                ds, s, seed=0, partition_seed=seed if (vary_partition and s == "classes") else None
            )
            for s in splits
            for seed in seeds
        }
    except (DatasetNotFoundError, IDXError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    protocols = {s: protocols_by_seed[(s, seeds[0])] for s in splits}
    if args.folds is None:  # auto: the reality check's 4 folds where the classes allow
        fewest = (
            min(p.num_classes for (s, _), p in protocols_by_seed.items() if s == "classes")
            if "classes" in splits
            else 0
        )
        auto = args.dataset in IMAGE_DATASETS and "classes" in splits
        args.folds = 4 if auto and fewest >= 8 else 0
        if auto and not args.folds:
            print(
                f"note: --folds off: {fewest} training classes are too few for 4 "
                "class-disjoint validation folds (8 needed)",
                file=sys.stderr,
            )
    if args.tune and not args.folds:
        raise SystemExit("error: --tune needs --folds K (>= 2): trials are scored on folds")
    for (s, seed), p in protocols_by_seed.items():
        if p.num_classes < 2 or len(p.test_classes) < 2:
            raise SystemExit(f"--split {p.split}: need at least 2 training and 2 test classes")
        # the batch against the data, before any sampler is built or anything trains
        m = resolve_m(args, p.num_classes)
        check_batching(
            len(p.train.labels), p.num_classes, args.batch_size, m, f"--split {s} (seed {seed})"
        )
        if args.folds and s == "classes":  # every fold's training split, too
            labels = np.asarray(p.train.labels)
            for k, (tr, _) in enumerate(class_folds(p.num_classes, args.folds, seed)):
                check_batching(
                    int(np.isin(labels, tr).sum()),
                    len(tr),
                    args.batch_size,
                    resolve_m(args, len(tr)),
                    f"validation fold {k} of --split {s} (seed {seed})",
                )
    if args.tune and "classes" not in splits:
        raise SystemExit("error: --tune needs --split classes (folds of the training classes)")
    args.m_per_class_used = {s: resolve_m(args, p.num_classes) for s, p in protocols.items()}

    knn, knn_device, knn_name = select_knn(device, args.knn)
    os.makedirs(args.out, exist_ok=True)
    results = {
        "config": {k: v for k, v in vars(args).items() if k not in ("plot_only",)},
        "losses_requested": names,
        "seed": seeds[0],
        "seeds": seeds,
        "splits": splits,
        "loss_args": overrides,
        "loss_args_flat": {
            n: {**o["loss"], **o["extras"], **{f"miner.{k}": v for k, v in o["miner"].items()}}
            for n, o in overrides.items()
        },
        "dataset": {"name": args.dataset, **protocols[splits[0]].summary()},
        "protocols": {s: p.summary() for s, p in protocols.items()},
        "class_partitions": {
            f"{s}/seed{seed}": {"train": p.train_classes, "test": p.test_classes}
            for (s, seed), p in protocols_by_seed.items()
            if s == "classes"
        },
        "device": str(device),
        "device_name": device_name(device),
        "knn_backend": knn_name,
        "versions": versions(),
        "git_commit": git_commit(),
        "benchmark_code_modified_since_commit": git_modified(
            [os.path.join(_HERE, "retrieval.py"), os.path.join(_HERE, "retrieval_bench")]
        ),
        # the losses under test: numbers made with uncommitted library code say so
        "package_modified_since_commit": git_modified(
            [os.path.join(os.path.dirname(_HERE), "pml_extras")]
        ),
        "command": "python "
        + " ".join(
            [os.path.relpath(os.path.join(_HERE, "retrieval.py"))]
            + list(sys.argv[1:] if argv is None else argv)
        ),
        "losses": [],
        "baselines": [],
    }
    embeddings: Dict[str, np.ndarray] = {}
    failures: List[str] = []
    t_all = time.perf_counter()
    for split in splits:
        protocol = protocols[split]
        print(f"--split {split}: {protocol.description}", file=sys.stderr)
        if args.embedding_dim <= 3:
            embeddings[labels_key(split, len(splits))] = protocol.test.labels
        for seed in seeds:  # the baselines, on each seed's test split
            results["baselines"] += baseline_runs(
                protocols_by_seed[(split, seed)], args, device, knn, knn_device, seed
            )
        for name in names:
            for seed in seeds:
                try:
                    res, emb = _final_run(
                        name,
                        protocols_by_seed[(split, seed)],
                        args,
                        device,
                        knn,
                        knn_device,
                        seed,
                        overrides.get(name),
                    )
                except SystemExit:
                    raise
                except ImageDataError as e:  # a file went bad mid-run: stop, naming it
                    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                    raise SystemExit(f"error: {lines[-1] if lines else e}") from None
                except Exception as e:  # e.g. a loss of ours not implemented yet: keep going
                    line = f"ERROR: {split}: {name} (seed {seed}): {type(e).__name__}: {e}"
                    failures.append(line.splitlines()[0])
                    print(failures[-1], file=sys.stderr)
                    res = {
                        "loss": name,
                        "source": LOSSES[name].source,
                        "seed": seed,
                        "split": split,
                        "error": f"{type(e).__name__}: {e}",
                        "diverged": None,
                        "metrics": {},
                        "timings_s": {},
                        "epoch_losses": [],
                        "step_losses": [],
                        "epochs_completed": 0,
                    }
                    emb = None
                results["losses"].append(res)
                if emb is not None and args.embedding_dim <= 3 and seed == seeds[0]:
                    key = embedding_key(split, name, len(splits))
                    embeddings[key] = emb.astype(np.float32)
    results["timings_s"] = {"total": time.perf_counter() - t_all}
    results["summary"] = aggregate(results["losses"])
    results["baseline_summary"] = aggregate(results["baselines"])
    results["ranking"] = {s: rank(results, s, args.reference) for s in splits}

    table = results_table(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    if embeddings:
        np.savez_compressed(os.path.join(args.out, "embeddings_test.npz"), **embeddings)
    print(table)
    if args.plots:
        for path in plot_results(args.out):
            print(f"wrote {path}", file=sys.stderr)
    print(f"results in {args.out} ({results['timings_s']['total']:.1f} s)", file=sys.stderr)
    if failures and len(failures) == len(results["losses"]):
        raise SystemExit(f"error: all {len(failures)} runs failed:\n" + "\n".join(failures))
    if failures:
        print(
            f"{len(failures)} of {len(results['losses'])} runs failed (listed in the table):\n"
            + "\n".join(failures),
            file=sys.stderr,
        )
    return results
