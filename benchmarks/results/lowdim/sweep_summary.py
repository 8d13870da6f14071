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
shown for reference. Verdicts as in compare.py: ``|new - old| <= k * max(stds)``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
SETUPS = {  # folder -> (title, which old sections count)
    "sweeps/digits-2d": ("digits 2-D", lambda s: "(2-D)" in s and "C'" not in s),
    "sweeps/digits-2d-loss-lr0.001": ("digits 2-D, --loss-lr 0.001", lambda s: "C'" in s),
    "sweeps/digits-3d": ("digits 3-D", lambda s: "(3-D)" in s),
    "sweep-e": ("Fashion-MNIST 2-D (Sweep E)", lambda s: s.startswith("Sweep E")),
}
DROP = ("step_losses", "epoch_losses")


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
        "variants registered. Accuracy of the loss's logits, mean ± population "
        "std over seeds 0-2. Old: `sweeps.md` (section in brackets). *1×* / *2×*: "
        "`|new − old| <= k · max(stds)` (see `rerun.md` for the chance of a false "
        "*disagree*); a verdict in brackets is for reference only: that row is not "
        "like-for-like.",
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
            "| Variant | hparams | old | new | seeds | Δ (points) | 1× | 2× | like-for-like |",
            "|---|---|---:|---:|---|---:|---|---|---|",
        ]
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
                f"| {v1} | {v2} | {'yes' if same else 'no: ' + why} |"
            )
        lines.append("")
    text = "\n".join(lines)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
