#!/usr/bin/env python
"""Do trained losses beat the baselines on the glyph data set's unseen classes?

Runs the retrieval benchmark's own code (``retrieval_bench``: its loaders, protocols, models,
``train_and_evaluate`` and ``AccuracyCalculator`` call, so the loss rows are the numbers
``benchmarks/retrieval.py`` prints for the same arguments) and adds, on the same split and
scored by the same function:

* ``raw pixels``: the test images' pixels in [0, 1] (in-memory datasets), flattened and
  L2-normalised;
* ``raw input``: what the network is fed (after the benchmark's standardisation), flattened
  and L2-normalised;
* ``untrained <model>``: the network each loss starts from (same seed, same initialisation),
  in eval mode, L2-normalised.

Every embedding is also scored L2-normalised (``MAP@R (L2)``; the benchmark scores Softmax
and the center losses unnormalised). Per method: the mean over seeds with a 95 % t interval,
and the same-seed difference to the best baseline with its interval; a difference is
resolved when its interval excludes 0.

Arguments: ``--out DIR`` and ``--seeds`` are this script's; the rest go to the benchmark's
parser unchanged, e.g.::

    python benchmarks/results/glyphs/experiment.py --out benchmarks/results/glyphs/idx-mlp \\
        --seeds 0,1,2 --dataset idx --data-dir /tmp/glyphs-idx --split classes \\
        --losses all --threads 2 --no-progress
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, BENCH)

from retrieval_bench import cli, data, env, evaluation, models, training  # noqa: E402
from retrieval_bench.losses import LOSSES, parse_losses, preload  # noqa: E402

METRICS = ("mean_average_precision_at_r", "precision_at_1")


def t_interval(xs) -> tuple:
    """(mean, half-width of the 95 % t interval); half-width nan for one value."""
    from scipy import stats

    xs = np.asarray(xs, dtype=np.float64)
    n = len(xs)
    if n < 2:
        return float(xs.mean()), float("nan")
    half = stats.t.ppf(0.975, n - 1) * xs.std(ddof=1) / math.sqrt(n)
    return float(xs.mean()), float(half)


def _score(emb: torch.Tensor, labels, knn, knn_device) -> dict:
    m = evaluation.retrieval_metrics(F.normalize(emb.float(), dim=1), labels, knn, knn_device)
    return {k: m[k] for k in METRICS}


def _bench_args(rest):
    """The benchmark's namespace with the defaults its main() fills in."""
    args = cli.build_parser().parse_args(rest)
    if args.epochs is None:
        args.epochs = cli.DEFAULT_EPOCHS.get(args.dataset, 20)
    if args.eval_batch_size is None:
        args.eval_batch_size = 128 if args.dataset in cli.IMAGE_DATASETS else 2048
    if args.amp == "none":
        args.amp = None
    if args.loss_lr is None:
        args.loss_lr = 10 * args.lr
    return args


def summarise(runs: list) -> dict:
    """Per method: mean and 95 % interval of each metric; same-seed differences to the best
    baseline (by mean MAP@R (L2))."""
    by = {}
    for r in runs:
        if r.get("metrics_l2"):
            by.setdefault((r["kind"], r["method"]), {})[r["seed"]] = r
    base = {k: v for k, v in by.items() if k[0] == "baseline"}
    key = "mean_average_precision_at_r"

    def mean_of(v):
        return float(np.mean([r["metrics_l2"][key] for r in v.values()]))

    best = max(base, key=lambda k: mean_of(base[k])) if base else None
    out = {"best_baseline": best[1] if best else None, "methods": []}
    for (kind, method), per_seed in by.items():
        seeds = sorted(per_seed)
        row = {"kind": kind, "method": method, "seeds": seeds}
        for m in METRICS:
            row[m] = t_interval([per_seed[s]["metrics_l2"][m] for s in seeds])
            bench = [per_seed[s].get("metrics_bench", {}).get(m) for s in seeds]
            if all(b is not None for b in bench):
                row[m + "_bench"] = t_interval(bench)
        if best is not None and (kind, method) != best:
            ref = base[best]
            common = [s for s in seeds if s in ref]
            d = [per_seed[s]["metrics_l2"][key] - ref[s]["metrics_l2"][key] for s in common]
            if d:
                mean, half = t_interval(d)
                row["diff_vs_best_baseline"] = {
                    "mean": mean,
                    "half_width": half,
                    "n": len(d),
                    "resolved": bool(len(d) >= 2 and abs(mean) > half),
                }
        out["methods"].append(row)
    return out


def table(results: dict) -> str:
    s = results["summary"]
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"{results['protocol']['description']}. Mean over seeds {results['seeds']} "
        "± half-width of the 95 % t interval. Every score on L2-normalised embeddings; "
        "`MAP@R (bench)`: as the benchmark scores it (Softmax and center losses "
        f"unnormalised). Δ: same-seed MAP@R difference to the best baseline "
        f"(**{s['best_baseline']}**), resolved when its interval excludes 0.",
        "",
        "| method | MAP@R | P@1 | MAP@R (bench) | Δ MAP@R vs best baseline | resolved |",
        "|---|---:|---:|---:|---:|---|",
    ]

    def fmt(t):
        return f"{t[0]:.4f}" + ("" if math.isnan(t[1]) else f" ± {t[1]:.4f}")

    rows = sorted(
        s["methods"],
        key=lambda r: (r["kind"] != "baseline", -r["mean_average_precision_at_r"][0]),
    )
    for r in rows:
        d = r.get("diff_vs_best_baseline")
        dtxt = "" if not d else fmt((d["mean"], d["half_width"]))
        res = "" if not d else ("yes" if d["resolved"] else "no")
        if d and d["n"] < 2:
            res = "1 seed: no interval"
        if d and d["resolved"] and d["mean"] < 0:
            res = "yes (worse)"
        bench = r.get("mean_average_precision_at_r_bench")
        name = r["method"] + (" *(baseline)*" if r["kind"] == "baseline" else "")
        lines.append(
            f"| {name} | {fmt(r['mean_average_precision_at_r'])} | {fmt(r['precision_at_1'])} "
            f"| {fmt(bench) if bench else ''} | {dtxt} | {res} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--remake", action="store_true", help="only rewrite OUT/results.md from OUT/results.json"
    )
    own, rest = p.parse_known_args(argv)
    if own.remake:
        with open(os.path.join(own.out, "results.json")) as f:
            results = json.load(f)
        results["summary"] = summarise(results["runs"])
        with open(os.path.join(own.out, "results.md"), "w") as f:
            f.write(table(results))
        return 0
    args = _bench_args(rest)
    seeds = cli.parse_seeds(own.seeds)
    names = parse_losses(args.losses)
    preload(names)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = env.resolve_device(args.device)
    env.enable_determinism(device)
    ds = data.load_dataset(
        args.dataset,
        args.data_dir,
        image_size=args.image_size,
        workers=args.workers,
        on_bad_image=args.on_bad_image,
    )
    split = "classes" if args.split == "auto" else args.split
    protocol = data.make_protocol(ds, split, seed=0)
    knn, knn_device, knn_name = evaluation.select_knn(device, args.knn)
    labels = protocol.test.labels
    os.makedirs(own.out, exist_ok=True)
    results = {
        "command": "python benchmarks/results/glyphs/experiment.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": seeds,
        "losses": names,
        "config": {k: v for k, v in vars(args).items()},
        "protocol": protocol.summary() | {"description": protocol.description},
        "knn_backend": knn_name,
        "versions": env.versions(),
        "git_commit": env.git_commit(),
        "runs": [],
    }
    results["protocol"].pop("train_classes")
    results["protocol"].pop("class_names")

    def save():
        results["summary"] = summarise(results["runs"])
        with open(os.path.join(own.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(own.out, "results.md"), "w") as f:
            f.write(table(results))

    # raw pixels / raw input: no seed involved (the split is fixed); repeated per seed so the
    # same-seed differences pair every run with a baseline
    x_in = torch.cat(list(protocol.test.eval_batches(args.eval_batch_size, torch.device("cpu"))))
    raw = {"raw input": _score(x_in.flatten(1), labels, knn, knn_device)}
    if isinstance(ds, data.Dataset) and split == "classes":
        te = np.isin(ds.y_test, np.arange(ds.num_classes // 2, ds.num_classes))
        px = torch.as_tensor(ds.x_test[te]).flatten(1)
        raw["raw pixels"] = _score(px, labels, knn, knn_device)
    for seed in seeds:
        for method, m in raw.items():
            results["runs"].append(
                {"kind": "baseline", "method": method, "seed": seed, "metrics_l2": m}
            )
        env.seed_everything(seed)  # as train_and_evaluate: the same initial network
        model, _ = models.make_model(args.model, protocol.image_shape, args.embedding_dim)
        emb = evaluation.embed(
            model.to(device), protocol.test.eval_batches(args.eval_batch_size, device), device
        )
        results["runs"].append(
            {
                "kind": "baseline",
                "method": f"untrained {args.model}",
                "seed": seed,
                "metrics_l2": _score(emb, labels, knn, knn_device),
            }
        )
    save()
    print(table(results), flush=True)

    args.progress = False
    for seed in seeds:
        for name in names:
            t0 = time.perf_counter()
            try:
                res, emb = training.train_and_evaluate(
                    name, protocol, args, device, knn, knn_device, seed=seed
                )
            except Exception as e:  # one failure does not lose the others; it is recorded
                print(f"ERROR {name} seed {seed}: {type(e).__name__}: {e}", file=sys.stderr)
                results["runs"].append(
                    {"kind": "loss", "method": name, "seed": seed, "error": repr(e)}
                )
                save()
                continue
            run = {
                "kind": "loss",
                "method": name,
                "source": LOSSES[name].source,
                "seed": seed,
                "hparams": res.get("hparams"),
                "diverged": res.get("diverged"),
                "metrics_bench": {k: res["metrics"].get(k) for k in METRICS},
                "normalize_eval": res.get("normalize_eval"),
                "train_s": res["timings_s"].get("train"),
            }
            if emb is not None:
                run["metrics_l2"] = _score(torch.as_tensor(emb), labels, knn, knn_device)
            results["runs"].append(run)
            save()
            print(
                f"{name} seed {seed}: {run.get('metrics_l2')} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
