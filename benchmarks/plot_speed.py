"""Plots for the JSON written by ``benchmarks/speed.py`` (measuring and plotting are apart).

For each (level, B, D, dtype) group with more than one C, and each mode, two panels against
C: the time divided by the matmul floor, and the extra peak memory in MiB (with the floor,
dW + dx, as a dashed line). Groups with a single C (e.g. the pair level) get a bar chart.

    python benchmarks/plot_speed.py benchmarks/results/speed/cpu.json [--out DIR]

Writes ``<stem>_<level>_B<B>_D<D>_<dtype>.png`` next to the JSON (or into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

MB = 1 << 20


def _groups(rows: List[dict]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["level"], row["B"], row["D"], row["dtype"])].append(row)
    return groups


def _series(rows: List[dict], mode: str, field: str) -> Dict[str, List[tuple]]:
    out: Dict[str, List[tuple]] = defaultdict(list)
    for row in rows:
        if row["mode"] == mode and row["status"] == "ok" and row.get(field) is not None:
            out[row["provider"]].append((row["C"], row[field]))
    return {p: sorted(v) for p, v in out.items()}


def _colors(rows: List[dict]) -> Dict[str, tuple]:
    import matplotlib

    names = sorted({r["provider"] for r in rows if r["provider"] != "floor"})
    cmap = matplotlib.colormaps["tab10"]
    colors = {name: cmap(i % 10) for i, name in enumerate(names)}
    colors["floor"] = (0.0, 0.0, 0.0, 1.0)
    return colors


PANELS = [
    ("time_ratio", "time / matmul floor", 1.0, "time relative to the floor"),
    ("extra_mem_bytes", "extra peak memory (MiB)", MB, "extra peak memory"),
    ("over_floor_mem_bytes", "extra - (dW + dx) (MiB)", MB, "memory beyond the gradients"),
]


def plot_group(key: tuple, rows: List[dict], path: str, device: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level, B, D, dtype = key
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(
        len(PANELS), len(modes), figsize=(6 * len(modes), 11), squeeze=False,
        constrained_layout=True,
    )  # fmt: skip
    colors = _colors(rows)
    several_c = len({r["C"] for r in rows}) > 1
    for j, mode in enumerate(modes):
        for i, (field, ylabel, scale, title) in enumerate(PANELS):
            ax = axes[i][j]
            if field == "over_floor_mem_bytes" and mode == "fwd":
                ax.axis("off")
                ax.text(0.5, 0.5, "fwd allocates no gradients:\nsee the extra peak memory above",
                        ha="center", va="center", transform=ax.transAxes)  # fmt: skip
                continue
            series = _series(rows, mode, field)
            if field == "over_floor_mem_bytes":
                series.pop("floor", None)
            if several_c:
                for provider, points in series.items():
                    cs, vals = zip(*points)
                    floor = provider == "floor"
                    ax.plot(
                        cs, [v / scale for v in vals], "--" if floor else "-",
                        marker=None if floor else "o", color=colors[provider],
                        label="floor" + (": dW + dx" if field != "time_ratio" else "")
                        if floor else provider,
                    )  # fmt: skip
                ax.set_xscale("log")
                ax.set_xlabel("C (classes)")
                if series:
                    ax.legend(fontsize=8)
            else:
                names = list(series)
                ax.bar(
                    names, [series[n][0][1] / scale for n in names],
                    color=[colors[n] for n in names],
                )  # fmt: skip
                ax.tick_params(axis="x", rotation=30)
            values = [v for points in series.values() for _, v in points]
            if values and min(values) <= 0:  # e.g. a case that stays under dW + dx
                ax.set_yscale("symlog", linthresh=1.0)
            else:
                ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}: {title}")
    c_text = "" if level == "pair" else ", C swept"
    fig.suptitle(f"{device}: {level} level, B={B}, D={D}, {dtype}{c_text}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json_path")
    p.add_argument("--out", help="output directory (default: next to the JSON)")
    args = p.parse_args(argv)
    with open(args.json_path) as f:
        result = json.load(f)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.json_path))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.json_path))[0]
    device = result["meta"].get("device_name", result["meta"].get("device", ""))
    written = []
    for key, rows in _groups(result["rows"]).items():
        level, B, D, dtype = key
        path = os.path.join(out_dir, f"{stem}_{level}_B{B}_D{D}_{dtype}.png")
        written.append(plot_group(key, rows, path, device))
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
