"""Shrink the committed runs of this folder that no plot is made from.

    python benchmarks/results/lowdim/slim.py

After ``benchmarks/results/retrieval/compact.py``: in every ``<dataset>-<dim>d/seed<N>/
results.json`` except the plotted ones (seed 0 at 2-D and 3-D, whose PNGs
``run.py --plot-only DIR`` remakes from them), drop what the benchmark derives again from
the runs (``summary``, ``baseline_summary``, ``ranking``: ``retrieval.py --merge``
recomputes them) and round the per-epoch losses to 5 digits. Metrics, hyperparameters,
commit and command stay; aggregate.py and compare.py read only ``losses``.
"""

from __future__ import annotations

import glob
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
DERIVED = ("summary", "baseline_summary", "ranking")


def plotted(path: str) -> bool:
    """Seed 0 at 2-D or 3-D: run_all.sh makes its plots."""
    setup = os.path.basename(os.path.dirname(os.path.dirname(path)))
    seed = os.path.basename(os.path.dirname(path))
    return seed == "seed0" and re.search(r"-[23]d$", setup) is not None


def slim(path: str) -> None:
    with open(path) as f:
        res = json.load(f)
    for key in DERIVED:
        res.pop(key, None)
    for key in ("losses", "baselines"):
        for r in res.get(key, []):
            if r.get("epoch_losses"):
                r["epoch_losses"] = [round(v, 5) for v in r["epoch_losses"]]
    with open(path, "w") as f:
        json.dump(res, f, separators=(",", ":"), default=str)


def main(root: str = HERE) -> list:
    done = []
    for path in sorted(glob.glob(os.path.join(root, "*-*d", "seed*", "results.json"))):
        if not plotted(path):
            slim(path)
            done.append(path)
    return done


if __name__ == "__main__":
    for p in main():
        print(p)
