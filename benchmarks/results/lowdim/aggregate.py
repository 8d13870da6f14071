"""Mean +- std over seeds of every run under this folder -> summary.md and summary.json.

    python benchmarks/results/lowdim/aggregate.py

Reads <dataset>-<dim>d/seed<N>/results.json (written by run.py). Accuracy is the loss's
own classifier (argmax of get_logits / the linear head); StandaloneCenterLoss has only the
nearest-center accuracy. "vs softmax" is the difference of the means in points.

MAP@R is the benchmark's: every embedding L2-normalised before k-NN. For the losses that do
not normalise internally (Softmax, the center losses) summary.json also keeps
``map_at_r_unnormalized`` (k-NN on the raw embeddings), which is what the tables before
the rerun at 47171cf reported for them (compare.py uses it for those rows).
"""

from __future__ import annotations

import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.pstdev(xs) if len(xs) > 1 else 0.0)


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
            acc = m.get("acc", m.get("center_acc"))
            entry = table.setdefault(setup, {}).setdefault(run["loss"], {"seeds": []})
            entry["seeds"].append(
                {
                    "seed": seed,
                    "acc": acc,
                    "map_at_r": m.get("mean_average_precision_at_r"),
                    "map_at_r_unnormalized": raw.get("mean_average_precision_at_r"),
                    "diverged": bool(run.get("diverged")),
                }
            )
    return table


def setup_key(s):
    ds, dim = s.rsplit("-", 1)
    return ds, int(dim[:-1])


def main():
    table = collect()
    lines = [
        "# Low-dimensional embeddings: mean +- std over seeds",
        "",
        "Acc: the loss's own classifier. MAP@R: every embedding L2-normalised before k-NN "
        "(summary.json also has the unnormalised MAP@R of Softmax and the center losses). "
        "`python benchmarks/results/lowdim/aggregate.py`; old against new: `rerun.md`.",
        "",
    ]
    for setup in sorted(table, key=setup_key):
        runs = table[setup]
        soft_acc, _ = mean_std([r["acc"] for r in runs.get("Softmax", {"seeds": []})["seeds"]])
        lines += [
            f"## {setup}",
            "",
            "| Loss | seeds | Acc | vs softmax (points) | MAP@R |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, entry in runs.items():
            acc, acc_sd = mean_std([r["acc"] for r in entry["seeds"]])
            mapr, mapr_sd = mean_std([r["map_at_r"] for r in entry["seeds"]])
            entry.update(acc=acc, acc_std=acc_sd, map_at_r=mapr, map_at_r_std=mapr_sd)
            raw, raw_sd = mean_std([r.get("map_at_r_unnormalized") for r in entry["seeds"]])
            if raw is not None:
                entry.update(map_at_r_unnormalized=raw, map_at_r_unnormalized_std=raw_sd)
            delta = "" if acc is None or soft_acc is None else f"{100 * (acc - soft_acc):+.1f}"
            bad = sum(r["diverged"] for r in entry["seeds"])
            fa = "n/a" if acc is None else f"{acc:.3f} ± {acc_sd:.3f}"
            if bad:
                fa = f"diverged in {bad} of {len(entry['seeds'])} seeds" + (
                    "" if acc is None else f"; others {acc:.3f}"
                )
            fm = "n/a" if mapr is None else f"{mapr:.3f} ± {mapr_sd:.3f}"
            lines.append(f"| {name} | {len(entry['seeds'])} | {fa} | {delta} | {fm} |")
        lines.append("")
    with open(os.path.join(HERE, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(table, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
