"""Shrink the committed runs of this folder (benchmarks/results/ stays under 5 MB).

    python benchmarks/results/lowdim/slim.py

After ``benchmarks/results/retrieval/compact.py``:

- in every ``<dataset>-<dim>d/seed<N>/results.json``, drop what the benchmark derives
  again from the runs (``summary``, ``baseline_summary``, ``ranking``: ``retrieval.py
  --merge`` and ``run.py --plot-only DIR`` recompute them) and round the per-epoch losses
  to 5 digits; metrics, hyperparameters, step losses, commit and command stay
  (aggregate.py and compare.py read only ``losses``);
- every run's ``log.txt`` goes where a ``results.md`` holds the same table (the log adds
  only the protocol line and the wall time), and ``metrics.png`` goes (``run.py
  --plot-only DIR`` remakes it);
- the sweep runs (``sweeps/``, ``sweep-e/``) keep only ``results.json``: their table is
  ``sweeps_rerun.md``.
"""

from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DERIVED = ("summary", "baseline_summary", "ranking")


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


def remove(paths) -> list:
    gone = [p for p in paths if os.path.exists(p)]
    for p in gone:
        os.remove(p)
    return gone


def main(root: str = HERE) -> list:
    done = []
    for path in sorted(glob.glob(os.path.join(root, "*-*d", "seed*", "results.json"))):
        slim(path)
        done.append(path)
        run = os.path.dirname(path)
        if os.path.exists(os.path.join(run, "results.md")):
            done += remove([os.path.join(run, "log.txt")])
        done += remove([os.path.join(run, "metrics.png")])
    for sweep in ("sweeps/*", "sweep-e"):
        for run in sorted(glob.glob(os.path.join(root, sweep, "seed*"))):
            if os.path.exists(os.path.join(run, "results.json")):
                done += remove([os.path.join(run, n) for n in ("log.txt", "results.md")])
    return done


if __name__ == "__main__":
    for p in main():
        print(p)
