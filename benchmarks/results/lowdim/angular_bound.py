"""How much class information a 2-D embedding's angle alone carries: an upper bound for
every classifier that reads only the direction (cosine logits, i.e. all our class losses).

    python benchmarks/results/lowdim/angular_bound.py          # -> angular_bound.md

For each loss of ``<dataset>-2d/seed0/embeddings_test.npz`` (written by run.py with
plots), the circle is cut into ``--bins`` equal arcs and each arc is given its most
frequent test label: the accuracy of that labelling is at least that of any classifier
that assigns classes to arcs of that resolution, fitted on the test set itself, so it
bounds a loss's own cosine classifier from above (up to the bin width). Softmax and the
center losses also use the radius; their bound says how much of their accuracy is left
when only the angle is read.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def arc_bound(embeddings: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Accuracy of the best labelling of ``bins`` equal arcs, fitted on these points."""
    angle = np.arctan2(embeddings[:, 1], embeddings[:, 0])
    arc = np.clip(((angle + math.pi) / (2 * math.pi) * bins).astype(int), 0, bins - 1)
    counts = np.zeros((bins, int(labels.max()) + 1))
    np.add.at(counts, (arc, labels), 1)
    return float(counts.max(axis=1).sum() / len(labels))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bins", type=int, default=360)
    p.add_argument("--out", default=os.path.join(HERE, "angular_bound.md"))
    args = p.parse_args(argv)
    lines = [
        "# Angle-only accuracy bound of the 2-D test embeddings (seed 0)",
        "",
        f"`python benchmarks/results/lowdim/angular_bound.py --bins {args.bins}`: the best "
        f"labelling of {args.bins} equal arcs, fitted on the test set.",
        "",
    ]
    for ds in ("digits", "fashion-mnist"):
        path = os.path.join(HERE, f"{ds}-2d", "seed0", "embeddings_test.npz")
        if not os.path.exists(path):
            continue
        data = np.load(path)
        labels = data["labels"]
        lines += [f"## {ds} 2-D", "", "| Loss | angle-only bound |", "|---|---:|"]
        for key in data.files:
            if key.startswith("emb_"):
                bound = arc_bound(data[key], labels, args.bins)
                lines.append(f"| {key[len('emb_') :]} | {bound:.3f} |")
        lines.append("")
    text = "\n".join(lines)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
