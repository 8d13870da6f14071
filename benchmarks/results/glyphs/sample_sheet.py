#!/usr/bin/env python
"""A contact sheet of a built glyph data set: the first ``--classes`` classes (rows) by the
first ``--images`` images of each (columns), at 2x, as one greyscale PNG.

    python benchmarks/results/glyphs/sample_sheet.py DIR benchmarks/results/glyphs/samples.png
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", help="a directory written by benchmarks/glyphs/build.py")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--images", type=int, default=16)
    args = p.parse_args(argv)
    with open(os.path.join(args.data_dir, "manifest.json"), encoding="utf-8") as f:
        classes = json.load(f)["classes"][: args.classes]
    rows = []
    for c in classes:
        tiles = [
            np.asarray(Image.open(os.path.join(args.data_dir, c["dir"], f"{i:03d}.png")))
            for i in range(min(args.images, len(c["images"])))
        ]
        rows.append(np.concatenate(tiles, axis=1))
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(args.out, optimize=True)
    print(f"wrote {args.out}: {', '.join(c['codepoint'] for c in classes)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
