"""The digits sweeps and Sweep E rerun with today's code, against sweeps.md -> sweeps_rerun.md.

    python benchmarks/results/lowdim/sweep_summary.py --strip

Runs (sweep.py, one per seed): ``sweeps/digits-2d``, ``sweeps/digits-2d-loss-lr0.001``
(Sweep C', ``--loss-lr 0.001``), ``sweeps/digits-3d`` and ``sweep-e`` (Fashion-MNIST 2-D),
each ``seed<N>/results.json``. ``--strip`` first rewrites those files without the
per-step and per-epoch losses (the sweeps have no plots; metrics, hyperparameters, commit
and command stay). Old values: the tables of ``sweeps.md`` (the last section of the same
dimension that has the variant, i.e. the latest rule: Sweep C's ``scA`` rather than Sweep
B's; C' for the loss-lr runs; Sweep E for Fashion-MNIST).

A variant is *like-for-like* only when its name fixes every argument that changed since
the old sweep; the others run today's defaults for what they leave out, so their old and
new rows are different configurations (the reason is given), and their verdict is only
shown for reference. Verdicts as in compare.py: ``|new - old| <= k * max(stds)``, a
consistency check of the rerun with population stds (ddof=0), not a confidence interval.

The intervals (aggregate.py's definitions): each new row's 95 % t-interval of the mean, its
paired same-seed difference against the setup's Softmax where the setup has one, and, in
"Paired differences", the contrasts that docs/low_dim.md cites (``PAIRS``), some of them
against a run of another folder: a seed gives every loss the same initialisation and
batches in every invocation (``retrieval_bench/training.py``), which ``SAME_RUNS`` checks
on configurations that two folders both hold.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics

from aggregate import ci95, fmt_ci, fmt_diff, paired_ci95

HERE = os.path.dirname(os.path.abspath(__file__))
SETUPS = {  # folder -> (title, which old sections count)
    "sweeps/digits-2d": ("digits 2-D", lambda s: "(2-D)" in s and "C'" not in s),
    "sweeps/digits-2d-loss-lr0.001": ("digits 2-D, --loss-lr 0.001", lambda s: "C'" in s),
    "sweeps/digits-3d": ("digits 3-D", lambda s: "(3-D)" in s),
    "sweep-e": ("Fashion-MNIST 2-D (Sweep E)", lambda s: s.startswith("Sweep E")),
}
DROP = ("step_losses", "epoch_losses")
# (folder, variant, reference folder, reference variant): the comparisons docs/low_dim.md
# makes, as paired same-seed differences of accuracy.
PAIRS = [
    ("sweeps/digits-2d", "scE_spreadL0.05", "sweeps/digits-2d", "scA"),
    ("sweeps/digits-3d", "scE_spreadL0.05", "sweeps/digits-3d", "scA"),
    ("sweep-e", "scE_spreadL0.05", "fashion-mnist-2d", "SparseCircleLoss"),
    ("sweep-e", "cfE_spreadL0.05", "sweep-e", "cfE_spreadG"),
    ("sweep-e", "cfE_order", "sweep-e", "cfE_spreadL0.05"),
    ("sweep-e", "cfE_spreadG", "fashion-mnist-2d", "Softmax"),
    ("sweep-e", "cfE_spreadL0.05", "fashion-mnist-2d", "Softmax"),
    ("sweeps/digits-2d-loss-lr0.001", "scA", "sweeps/digits-2d", "Softmax"),
]
# The same configuration in two folders: identical per-seed accuracy shows that a seed's
# run does not depend on the invocation, which the cross-folder pairs above rely on.
SAME_RUNS = [
    ("sweeps/digits-2d", "Softmax", "digits-2d", "Softmax"),
    ("sweeps/digits-2d", "scA", "digits-2d", "SparseCircleLoss"),
    ("sweeps/digits-2d", "cfA", "digits-2d", "CurricularFaceLoss"),
    ("sweeps/digits-3d", "scA", "digits-3d", "SparseCircleLoss"),
]


def strip(path: str) -> None:
    with open(path) as f:
        res = json.load(f)
    for key in ("losses", "baselines"):
        for r in res.get(key, []):
            for k in DROP:
                r.pop(k, None)
    res.pop("summary", None), res.pop("baseline_summary", None)
    with open(path, "w") as f:
        json.dump(res, f, separators=(",", ":"), default=str)


def old_tables(path: str) -> dict:
    """{section title: {variant: (mean, std)}} from sweeps.md's tables."""
    tables, section = {}, None
    with open(path) as f:
        for line in f:
            if line.startswith("## "):
                section = line[3:].strip()
                tables[section] = {}
            m = re.match(r"\| (\S+)[^|]* \| ([0-9.]+) \| ([0-9.]+) \|", line)
            if m and section is not None:
                tables[section].setdefault(m.group(1), (float(m.group(2)), float(m.group(3))))
    return tables


def like_for_like(variant: str, dim: int, section: str = ""):
    """(True, "") or (False, why): does the name fix every argument that changed?"""
    if variant == "Softmax" or variant.startswith(("sc_normal_", "scE_", "cfE_", "afE_")):
        return True, ""
    if variant.startswith(("sc_spread_", "cf_spread_")):
        return False, "spread proxies had unit length then, normal_ lengths now"
    if variant.startswith("cf_normal_"):
        if dim == 3:
            return True, ""
        return False, "margin unnamed: 0.5 then, pi/10 (the angular rule) now"
    if variant.startswith("cfA"):
        return False, "CurricularFace's defaults since changed (short proxies, margin rule)"
    if variant == "scA" and dim == 2 and section.startswith("Sweep B"):
        return False, "m unnamed: c* = 0.81 in Sweep B, 1/2 now"
    return False, "today's SparseCircle defaults for init/m; unverified against the old commit"


def collect(folder: str) -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, folder, "seed*", "results.json"))):
        with open(path) as f:
            res = json.load(f)
        seed = int(re.sub(r"\D", "", os.path.basename(os.path.dirname(path))))
        for r in res["losses"]:
            e = out.setdefault(r["loss"], {"seeds": [], "hparams": r.get("hparams", {})})
            acc = None if r.get("diverged") else (r.get("metrics") or {}).get("acc")
            e["seeds"].append((seed, acc))
            e["commit"] = (res.get("git_commit") or "?")[:7]
    return out


def fmt_hp(hp: dict) -> str:
    parts = []
    for k, v in hp.items():
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def vs_softmax(name: str, accs: dict, soft) -> str:
    if soft is None:
        return "no Softmax here"
    return "(reference)" if name == "Softmax" else fmt_diff(paired_ci95(accs, soft))


def per_seed(folder: str, variant: str):
    """{seed: accuracy or None (diverged)} of one variant in one folder; None if absent."""
    e = collect(folder).get(variant)
    return None if e is None else dict(e["seeds"])


def paired_section() -> list:
    """The contrasts of ``PAIRS`` whose runs are here, and the ``SAME_RUNS`` check."""
    rows = []
    for folder, variant, ref_folder, ref in PAIRS:
        a, b = per_seed(folder, variant), per_seed(ref_folder, ref)
        if a is None or b is None:
            continue
        p = paired_ci95(a, b)
        rows.append(
            f"| `{folder}` {variant} | `{ref_folder}` {ref} | {fmt_ci(ci95(a.values()))} "
            f"| {fmt_ci(ci95(b.values()))} | {', '.join(map(str, p['seeds']))} "
            f"| {fmt_diff(p)} |"
        )
    if not rows:
        return []
    lines = [
        "## Paired differences",
        "",
        "Accuracy, variant − reference in points: mean and 95 % t-interval of the same-seed "
        "differences (*better* / *worse*: the interval excludes 0; no word: not separated "
        "with these seeds). Each side's own mean [95 % CI] for scale.",
        "",
        "| variant | reference | variant [95 % CI] | reference [95 % CI] | seeds "
        "| difference, points [95 % CI] |",
        "|---|---|---:|---:|---|---:|",
        *rows,
        "",
    ]
    checks = []
    for folder, variant, ref_folder, ref in SAME_RUNS:
        a, b = per_seed(folder, variant), per_seed(ref_folder, ref)
        if a is not None and b is not None:
            same = "identical" if a == b else "DIFFERENT"
            checks.append(f"`{folder}` {variant} and `{ref_folder}` {ref}: {same}")
    if checks:
        lines += ["Same configuration, two invocations, seed for seed: " + "; ".join(checks)]
        lines.append("")
    return lines


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strip", action="store_true", help="drop step/epoch losses first")
    p.add_argument("--old", default=os.path.join(HERE, "sweeps.md"))
    p.add_argument("--out", default=os.path.join(HERE, "sweeps_rerun.md"))
    args = p.parse_args(argv)
    if args.strip:
        for folder in SETUPS:
            for path in glob.glob(os.path.join(HERE, folder, "seed*", "results.json")):
                strip(path)
    old = old_tables(args.old)
    lines = [
        "# The sweeps rerun with today's code",
        "",
        "`python benchmarks/results/lowdim/sweep_summary.py --strip`. Each run: "
        "`python benchmarks/results/lowdim/sweep.py --dataset DATASET --embedding-dim D "
        "--seed S --losses VARIANTS --threads 1 --no-progress --no-plots --out FOLDER/seedS` "
        "(Sweep C' adds `--loss-lr 0.001`), VARIANTS the rows of its table; the "
        "`command` in results.json names `retrieval.py`, which sweep.py drives with its "
        "variants registered. Accuracy of the loss's logits over seeds 0-2. *old* / *new*: "
        "mean ± population std (ddof = 0: the seeds' spread, not a confidence interval). "
        "Old: `sweeps.md` (section in brackets). *1×* / *2×*: a consistency check of the "
        "rerun, not a significance test: `|new − old| <= k · max(stds)` (see `rerun.md` "
        "for the chance of a false *disagree*); a verdict in brackets is for reference "
        "only: that row is not like-for-like. *new [95 % CI]*: the mean and its 95 % "
        "Student t-interval (sample std, ddof = 1; n = 3: t = 4.303, half-width 2.48 "
        "sample stds). *vs Softmax*: the paired same-seed difference from the setup's "
        "Softmax and its 95 % t-interval (*better* / *worse* only where it excludes 0).",
        "",
    ]
    for folder, (title, wanted) in SETUPS.items():
        runs = collect(folder)
        if not runs:
            continue
        dim = 3 if "3-D" in title else 2
        commits = sorted({e["commit"] for e in runs.values()})
        lines += [
            f"## {title}",
            "",
            f"Runs in `{folder}/`, commit {', '.join(commits)}.",
            "",
            "| Variant | hparams | old | new | seeds | Δ (points) | 1× | 2× | like-for-like "
            "| new [95 % CI] | vs Softmax, points [95 % CI, paired] |",
            "|---|---|---:|---:|---|---:|---|---|---|---:|---:|",
        ]
        soft = dict(runs["Softmax"]["seeds"]) if "Softmax" in runs else None
        for name, e in runs.items():
            accs = [a for _, a in sorted(e["seeds"]) if a is not None]
            if not accs:
                new_mean, new_sd, new_txt = None, None, "diverged"
            else:
                new_mean, new_sd = statistics.fmean(accs), statistics.pstdev(accs)
                new_txt = f"{new_mean:.3f} ± {new_sd:.3f}"
            seeds = ", ".join("div." if a is None else f"{a:.3f}" for _, a in sorted(e["seeds"]))
            found = [(s, t[name]) for s, t in old.items() if wanted(s) and name in t]
            same, why = like_for_like(name, dim, found[-1][0] if found else "")
            old_txt, delta, v1, v2 = "—", "", "", ""
            if found and new_mean is not None:
                section, (om, osd) = found[-1]
                old_txt = f"{om:.3f} ± {osd:.3f} ({section.split(' ')[0]} {section.split(' ')[1]})"
                delta = f"{100 * (new_mean - om):+.1f}"
                tol = max(osd, new_sd) + 1e-12
                v1 = "agree" if abs(new_mean - om) <= tol else "disagree"
                v2 = "agree" if abs(new_mean - om) <= 2 * tol else "disagree"
                if not same:
                    v1, v2 = f"({v1})", f"({v2})"
            lines.append(
                f"| {name} | {fmt_hp(e['hparams'])} | {old_txt} | {new_txt} | {seeds} | {delta} "
                f"| {v1} | {v2} | {'yes' if same else 'no: ' + why} "
                f"| {fmt_ci(ci95(a for _, a in e['seeds']))} "
                f"| {vs_softmax(name, dict(e['seeds']), soft)} |"
            )
        lines.append("")
    lines += paired_section()
    text = "\n".join(lines)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
