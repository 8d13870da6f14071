#!/usr/bin/env python
"""Keep committed benchmark results small: summaries, not bulk arrays.

For every ``results.json`` under the given directories: the per-step training losses are
averaged down to at most ``--points`` values (the loss-curve plots are made from them, with
``python benchmarks/retrieval.py --plot-only DIR``), and the JSON is written without
indentation. ``embeddings_test.npz`` files (the raw 2-D/3-D test embeddings) over
``--max-npz-kb`` are deleted: their ``embeddings.png`` stays, remade only by rerunning the
run's command (in its results.json). The small digits-2d one (38 KB) stays: the tests plot
a pre-seeds results.json from it. PNGs are re-saved as 256-colour palette images.

    python benchmarks/results/retrieval/compact.py benchmarks/results/retrieval \\
        benchmarks/results/lowdim
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import List


def downsample(xs: List[float], n: int) -> List[float]:
    """Means of consecutive chunks, at most ``n`` values (as the benchmark's own)."""
    if len(xs) <= n:
        return list(xs)
    k = math.ceil(len(xs) / n)
    return [sum(xs[i : i + k]) / len(xs[i : i + k]) for i in range(0, len(xs), k)]


def compact_json(path: str, points: int) -> None:
    with open(path) as f:
        res = json.load(f)
    for key in ("losses", "baselines"):
        for r in res.get(key, []):
            if r.get("step_losses"):
                r["step_losses"] = [round(v, 5) for v in downsample(r["step_losses"], points)]
    with open(path, "w") as f:
        json.dump(res, f, separators=(",", ":"), default=str)


def compact_png(path: str) -> None:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    tmp = path + ".tmp.png"
    small.save(tmp, optimize=True)
    if os.path.getsize(tmp) < os.path.getsize(path):
        os.replace(tmp, path)
    else:
        os.remove(tmp)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--points", type=int, default=300, help="step losses kept per run")
    p.add_argument("--max-npz-kb", type=int, default=100, help="larger .npz files are deleted")
    args = p.parse_args(argv)
    for top in args.dirs:
        for root, _, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                if name == "results.json":
                    compact_json(path, args.points)
                elif name.endswith(".npz") and os.path.getsize(path) > 1024 * args.max_npz_kb:
                    os.remove(path)
                elif name.endswith(".png"):
                    compact_png(path)


if __name__ == "__main__":
    main()
