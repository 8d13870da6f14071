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
from .evaluation import select_knn
from .folds import class_folds, train_with_folds
from .images import ImageDataError
from .losses import LOSSES, parse_loss_args, parse_losses, preload
from .merge import merge_results
from .options import DEFAULT_EPOCHS, IMAGE_DATASETS, build_parser, parse_seeds
from .plots import embedding_key, labels_key, plot_results
from .report import aggregate, rank, results_table
from .training import check_batching, resolve_m, train_and_evaluate
from .tuning import tune

__all__ = ["DEFAULT_EPOCHS", "IMAGE_DATASETS", "build_parser", "main", "parse_seeds"]


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
