"""Means and 95 % confidence intervals over seeds of every run under this folder
-> summary.md and summary.json.

    python benchmarks/results/lowdim/aggregate.py

Reads <dataset>-<dim>d/seed<N>/results.json (written by run.py). Accuracy is the loss's
own classifier (argmax of get_logits / the linear head); StandaloneCenterLoss has only the
nearest-center accuracy.

Intervals: the 95 % Student t-interval of the mean over the seeds that finished,
``mean +- t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample std (ddof=1); with n = 3,
t = 4.303 and the half-width is 2.48 s. One seed gives no interval ("n/a"), never a
zero-width one. Diverged seeds are left out of every mean and counted.

"vs softmax" is the *paired* difference: for each seed both finished, loss - softmax, then
the mean and 95 % t-interval of those differences, in points. Pairing is right here because
a seed fixes what the runs of every loss share: ``retrieval_bench/training.py`` calls
``seed_everything(seed)`` before building the network (same initialisation for every loss)
and draws the batches from generators of (seed, epoch) alone (same batches); the train/test
split does not depend on the seed (digits: ``split_seed=0``; Fashion-MNIST: the official
split). A difference is *better* / *worse* only when its interval excludes 0.

MAP@R is the benchmark's: every embedding L2-normalised before k-NN. For the losses that do
not normalise internally (Softmax, the center losses) summary.json also keeps
``map_at_r_unnormalized`` (k-NN on the raw embeddings), which is what the tables before
the rerun at 47171cf reported for them (compare.py uses it for those rows).

summary.json keeps the fields compare.py and older readers use (``acc``, ``acc_std``: the
population std, ddof=0, as before; the same for MAP@R) and adds ``*_ci95`` (see
:func:`ci95`), ``*_vs_softmax_ci95`` (see :func:`paired_ci95`) and, for the ``Name(variant)``
rows, ``*_vs_base_ci95`` against the ``Name`` row (see :func:`variants_against_base`).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (scipy is a
    dependency of the benchmarks: the ``bench`` extra)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def ci95(values) -> dict:
    """Mean and 95 % t-interval of the mean of ``values`` (None entries dropped).

    ``{"n", "mean", "sd" (ddof=1), "t", "half_width", "lo", "hi"}``; below two values
    ``sd``, ``t``, ``half_width``, ``lo`` and ``hi`` are None (no interval from one seed)."""
    xs = [float(x) for x in values if x is not None]
    out = {"n": len(xs), "mean": None, "sd": None, "t": None}
    out.update(half_width=None, lo=None, hi=None)
    if not xs:
        return out
    out["mean"] = statistics.fmean(xs)
    if len(xs) < 2:
        return out
    sd = statistics.stdev(xs)
    t = t975(len(xs) - 1)
    half = t * sd / math.sqrt(len(xs))
    out.update(sd=sd, t=t, half_width=half, lo=out["mean"] - half, hi=out["mean"] + half)
    return out


def paired_ci95(values: dict, reference: dict) -> dict:
    """Same-seed differences ``values[s] - reference[s]`` over the seeds where both are not
    None: :func:`ci95` of them plus ``seeds`` (those used) and ``verdict``: "better" /
    "worse" when the interval excludes 0, "not resolved" when it does not, None without an
    interval."""
    seeds = sorted(s for s in values if values[s] is not None and reference.get(s) is not None)
    out = ci95([values[s] - reference[s] for s in seeds])
    verdict = None
    if out["half_width"] is not None:
        verdict = "better" if out["lo"] > 0 else ("worse" if out["hi"] < 0 else "not resolved")
    return {**out, "seeds": seeds, "verdict": verdict}


def mean_std(xs):
    """Mean and population std (ddof=0) as the tables before the intervals gave them: kept
    for summary.json's ``*_std`` fields, which compare.py reads."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


def fmt_ci(c: dict, digits: int = 3) -> str:
    """``mean [lo, hi]``; ``mean (n = 1, no interval)``; ``n/a`` without a value."""
    if c["mean"] is None:
        return "n/a"
    if c["half_width"] is None:
        return f"{c['mean']:.{digits}f} (n = 1, no interval)"
    return f"{c['mean']:.{digits}f} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def fmt_diff(c: dict) -> str:
    """A paired difference in points: ``+2.2 [+0.9, +3.5] better``."""
    if c["mean"] is None:
        return "n/a"
    mean = 100 * c["mean"]
    if c["half_width"] is None:
        return f"{mean:+.1f} (n = 1, no interval)"
    if c["sd"] == 0 and c["mean"] == 0:  # e.g. the same code path: the runs are equal
        return "0 (identical at every seed)"
    text = f"{mean:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"
    return text + ("" if c["verdict"] == "not resolved" else f" {c['verdict']}")


def collect():
    table = {}
    for path in sorted(glob.glob(os.path.join(HERE, "*-*d", "seed*", "results.json"))):
        setup = os.path.basename(os.path.dirname(os.path.dirname(path)))
        seed = int(re.sub(r"\D", "", os.path.basename(os.path.dirname(path))))
        with open(path) as f:
            res = json.load(f)
        for run in res["losses"]:
            m = run.get("metrics", {})
            raw = run.get("metrics_unnormalized") or {}
            diverged = bool(run.get("diverged"))
            if diverged:  # a diverged seed's metrics (if any) never enter a mean
                m, raw = {}, {}
            acc = m.get("acc", m.get("center_acc"))
            entry = table.setdefault(setup, {}).setdefault(run["loss"], {"seeds": []})
            entry["seeds"].append(
                {
                    "seed": seed,
                    "acc": acc,
                    "map_at_r": m.get("mean_average_precision_at_r"),
                    "map_at_r_unnormalized": raw.get("mean_average_precision_at_r"),
                    "diverged": diverged,
                }
            )
    return table


def setup_key(s):
    ds, dim = s.rsplit("-", 1)
    return ds, int(dim[:-1])


HEADER = [
    "# Low-dimensional embeddings: means with 95 % confidence intervals over seeds",
    "",
    "`python benchmarks/results/lowdim/aggregate.py`; old against new: `rerun.md`. "
    "Acc: the loss's own classifier. MAP@R: every embedding L2-normalised before k-NN "
    "(summary.json also has the unnormalised MAP@R of Softmax and the center losses).",
    "",
    "**Intervals.** `mean [lo, hi]`: the mean over the seeds that finished and the 95 % "
    "confidence interval of that mean, Student t with n − 1 degrees of freedom and the "
    "sample std s (ddof = 1): mean ± t·s/√n. With n = 3, t = 4.303: the half-width is "
    "2.48 s. One seed: no interval. Diverged seeds are left out and counted. The "
    "intervals are symmetric and not clipped, so a widely scattered cell can reach past "
    "1 or below 0.",
    "",
    "**vs softmax** (points): the *paired* same-seed difference loss − softmax, its mean "
    "and 95 % t-interval over the seeds both finished. A seed fixes the network's "
    "initialisation and the batches for every loss (`retrieval_bench/training.py`), and "
    "every seed is scored on the same test images, so the differences of one seed cancel "
    "what the runs share. *better* / *worse*: the interval excludes 0; no word: the data "
    "do not separate the loss from softmax. Under each table, every `Name(variant)` row "
    "against its `Name` row, paired the same way: the papers' values − our defaults, our "
    "`ours-auto` ArcFace/CosFace − PML's.",
    "",
    "**Not shown**: 3 seeds (an interval from 3 values is wide, and its t-coverage assumes "
    "roughly normal seed-to-seed scatter); the variation over training seeds only (one "
    "fixed test set, so not the test set's sampling error); one small MLP per data set, two "
    "small data sets with 10 classes; no tuning per loss; no wall time.",
    "",
]


def variants_against_base(runs: dict) -> list:
    """Each ``Name(variant)`` row against the ``Name`` row of the same setup (the paper
    values against our defaults, our ``ours-auto`` ArcFace/CosFace against PML's), paired by
    seed; stored as ``acc_vs_base_ci95`` / ``map_at_r_vs_base_ci95`` with ``base``."""
    rows = []
    for name, entry in runs.items():
        base = name.split("(")[0]
        if base == name or base not in runs:
            continue
        by = {k: {r["seed"]: r[k] for r in runs[base]["seeds"]} for k in ("acc", "map_at_r")}
        pa = paired_ci95({r["seed"]: r["acc"] for r in entry["seeds"]}, by["acc"])
        pm = paired_ci95({r["seed"]: r["map_at_r"] for r in entry["seeds"]}, by["map_at_r"])
        entry.update(base=base, acc_vs_base_ci95=pa, map_at_r_vs_base_ci95=pm)
        rows.append(f"| {name} | {base} | {fmt_diff(pa)} | {fmt_diff(pm)} |")
    if not rows:
        return []
    return [
        "Variant − its base, same seeds (points, 95 % CI, paired):",
        "",
        "| Variant | base | Acc | MAP@R |",
        "|---|---|---:|---:|",
        *rows,
        "",
    ]


def main():
    table = collect()
    lines = list(HEADER)
    for setup in sorted(table, key=setup_key):
        runs = table[setup]
        soft = runs.get("Softmax", {"seeds": []})["seeds"]
        soft_acc = {r["seed"]: r["acc"] for r in soft}
        soft_map = {r["seed"]: r["map_at_r"] for r in soft}
        lines += [
            f"## {setup}",
            "",
            "| Loss | seeds | Acc [95 % CI] | Acc vs softmax, points [95 % CI, paired] "
            "| MAP@R [95 % CI] | MAP@R vs softmax, points [95 % CI, paired] |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, entry in runs.items():
            seeds = entry["seeds"]
            acc, acc_sd = mean_std([r["acc"] for r in seeds])
            mapr, mapr_sd = mean_std([r["map_at_r"] for r in seeds])
            entry.update(acc=acc, acc_std=acc_sd, map_at_r=mapr, map_at_r_std=mapr_sd)
            raw, raw_sd = mean_std([r.get("map_at_r_unnormalized") for r in seeds])
            if raw is not None:
                entry.update(map_at_r_unnormalized=raw, map_at_r_unnormalized_std=raw_sd)
                entry["map_at_r_unnormalized_ci95"] = ci95(
                    r.get("map_at_r_unnormalized") for r in seeds
                )
            bad = sum(r["diverged"] for r in seeds)
            entry["diverged_seeds"] = bad
            entry["acc_ci95"] = ci95(r["acc"] for r in seeds)
            entry["map_at_r_ci95"] = ci95(r["map_at_r"] for r in seeds)
            if name == "Softmax":
                d_acc = d_map = "(reference)"
            elif not soft:
                d_acc = d_map = "no softmax"
            else:
                pa = paired_ci95({r["seed"]: r["acc"] for r in seeds}, soft_acc)
                pm = paired_ci95({r["seed"]: r["map_at_r"] for r in seeds}, soft_map)
                entry.update(acc_vs_softmax_ci95=pa, map_at_r_vs_softmax_ci95=pm)
                d_acc, d_map = fmt_diff(pa), fmt_diff(pm)
            fa, fm = fmt_ci(entry["acc_ci95"]), fmt_ci(entry["map_at_r_ci95"])
            if bad:
                fa = f"diverged in {bad} of {len(seeds)} seeds" + (
                    "" if acc is None else f"; the others {fa}"
                )
            lines.append(f"| {name} | {len(seeds)} | {fa} | {d_acc} | {fm} | {d_map} |")
        lines.append("")
        lines += variants_against_base(runs)
    with open(os.path.join(HERE, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(table, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
