"""``--merge``: runs made separately (one process per seed, several machines) into one
results.json, with the statistics, tables and plots remade by today's code."""

from __future__ import annotations

import json
import os
import sys
from typing import List, Sequence

from .env import _HERE
from .plots import plot_results
from .report import aggregate, rank, results_table

__all__ = ["merge_results"]


def merge_results(dirs: Sequence[str], out: str, plots: bool = True, reference=None) -> dict:
    """``--merge``: one results.json from several runs of the same configuration (each run's
    seeds must differ). The first run's configuration is kept; each run's command, commit
    and seeds are listed under ``"merged_from"``."""
    parts = []
    for d in dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: --merge: {path} not found")
        with open(path) as f:
            parts.append(json.load(f))
    first = parts[0]
    keys = ("dataset", "model", "embedding_dim", "epochs", "batch_size", "lr", "split")
    for d, p in zip(dirs[1:], parts[1:]):
        diff = [k for k in keys if p["config"].get(k) != first["config"].get(k)]
        if diff or p["losses_requested"] != first["losses_requested"]:
            raise SystemExit(
                f"error: --merge: {d} was run with other settings "
                f"({', '.join(diff) or 'losses'}) than {dirs[0]}"
            )
    seeds: List[int] = []
    for d, p in zip(dirs, parts):
        dup = [s for s in p["seeds"] if s in seeds]
        if dup:
            raise SystemExit(f"error: --merge: seed(s) {dup} of {d} already merged")
        seeds += p["seeds"]
    merged = dict(first)
    merged["seeds"] = seeds
    merged["losses"] = [r for p in parts for r in p["losses"]]
    merged["baselines"] = [r for p in parts for r in p.get("baselines", [])]
    merged["class_partitions"] = {
        k: v for p in parts for k, v in (p.get("class_partitions") or {}).items()
    }
    if len(dirs) > 1 or "merged_from" not in first:
        merged["merged_from"] = [
            {
                "dir": os.path.relpath(d),
                "seeds": p["seeds"],
                "command": p.get("command"),
                "git_commit": p.get("git_commit"),
                "benchmark_code_modified_since_commit": p.get(
                    "benchmark_code_modified_since_commit"
                ),
                "timings_s": p.get("timings_s"),
            }
            for d, p in zip(dirs, parts)
        ]
    merged["config"] = {**first["config"], "seeds": ",".join(map(str, seeds))}
    if reference:
        merged["config"]["reference"] = reference
    merged["summary"] = aggregate(merged["losses"])
    merged["baseline_summary"] = aggregate(merged["baselines"])
    ref = merged["config"].get("reference")
    merged["ranking"] = {s: rank(merged, s, ref) for s in merged["splits"]}
    merged["report_command"] = "python " + " ".join(
        [os.path.relpath(os.path.join(_HERE, "retrieval.py")), "--merge", *dirs]
        + (["--out", out] if out != dirs[0] else [])
    )
    os.makedirs(out, exist_ok=True)
    table = results_table(merged)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(merged, f, indent=1, default=str)
    print(table)
    if plots:
        for path in plot_results(out):
            print(f"wrote {path}", file=sys.stderr)
    return merged
