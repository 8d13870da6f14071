#!/usr/bin/env python
"""Build the glyph data set: hundreds of character classes rendered offline from many
fonts, for the retrieval benchmark's class-disjoint protocol (issue 20).

One class per Unicode codepoint (letters, digits and symbols of Latin, Greek, Cyrillic,
Armenian, Hebrew, Arabic, Devanagari, Bengali, Tamil, Thai, Georgian, Ethiopic, Cherokee,
Canadian syllabics, Tifinagh and the mathematical operators; precomposed letters, marks and
compatibility forms are left out), each image a different font where the class has enough
(families, weights and styles of the Debian font packages in :data:`glyph_fonts.PACKAGES`),
with a mild seeded affine (rotation, shear, scale, translation) and stroke-width variation.

A codepoint becomes a class only if at least ``--min-fonts`` fonts draw it: their cmap maps
it to a real glyph (fontTools), and the drawing is neither blank, nor tiny, nor the font's
``.notdef`` box. A codepoint whose mean drawing (over its fonts) has a cosine of at least
``--dup-cosine`` with an accepted class's is left out as a look-alike (Latin A, Greek Alpha,
Cyrillic A). Classes are taken in a seeded random order until ``--classes`` are found.

Output (``--out DIR``)::

    DIR/<k>_U+XXXX/<i>.png     k = 0000.. the seeded class order, so the benchmark's
                               name-sorted split (first half trains) mixes the scripts
    DIR/manifest.json          fonts (file, sha256, package, version, licence), classes,
                               every image's font and variation, parameters, versions, and
                               the sha256 of the images
    IDXDIR/                    with --idx IDXDIR: the same images as MNIST-form IDX files
                               (each class's first half in train-*, second half in t10k-*)

Same command and same installed fonts/Pillow/FreeType: same bytes (the tests check it).
Nothing is downloaded. Install the default fonts with
``apt-get install`` + the packages of :data:`glyph_fonts.PACKAGES` (see
docs/benchmarks/glyphs.md); ``--font-dir /usr/share/fonts/truetype/dejavu`` builds from
whatever is there instead.

Example::

    python benchmarks/glyphs/build.py --out data/glyphs --idx data/glyphs-idx
    python benchmarks/retrieval.py --dataset folder --data-dir data/glyphs --split classes \\
        --image-size 32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import struct
import sys
import time
import unicodedata
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import glyph_fonts  # noqa: E402
import glyph_render  # noqa: E402

__all__ = ["BLOCKS", "candidate_codepoints", "build", "main", "images_sha256"]

FORMAT_VERSION = 1

# (first, last) codepoints of the blocks classes are drawn from, and a short script name
BLOCKS = [
    (0x0030, 0x007A, "Latin/digits"),
    (0x0370, 0x03FF, "Greek"),
    (0x0400, 0x04FF, "Cyrillic"),
    (0x0531, 0x0587, "Armenian"),
    (0x05D0, 0x05EA, "Hebrew"),
    (0x0620, 0x064A, "Arabic"),
    (0x0904, 0x0939, "Devanagari"),
    (0x0985, 0x09B9, "Bengali"),
    (0x0B85, 0x0BB9, "Tamil"),
    (0x0E01, 0x0E2E, "Thai"),
    (0x10A0, 0x10FF, "Georgian"),
    (0x1200, 0x137F, "Ethiopic"),
    (0x13A0, 0x13F5, "Cherokee"),
    (0x1401, 0x167F, "Canadian syllabics"),
    (0x2D30, 0x2D67, "Tifinagh"),
    (0x2200, 0x22FF, "Math operators"),
]
CATEGORIES = ("Lu", "Ll", "Lo", "Nd", "Sm", "So")  # letters, digits, symbols: no marks


def candidate_codepoints() -> Dict[int, str]:
    """Codepoint -> script of every candidate class (before the fonts are consulted)."""
    out = {}
    for lo, hi, script in BLOCKS:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            # no precomposed/compatibility forms: they would repeat a base letter's shape
            if unicodedata.category(ch) in CATEGORIES and not unicodedata.decomposition(ch):
                out[cp] = script
    return out


def _clean(font, ch: str, size: int, ss: int, notdef) -> Optional[np.ndarray]:
    """The undistorted drawing in [0, 1], or None if blank, tiny or the .notdef box."""
    a = glyph_render.ink(glyph_render.render(font, ch, size, supersample=ss))
    if a is None:
        return None
    rows, cols = np.nonzero(a > 0.5)
    if len(rows) == 0 or max(np.ptp(rows), np.ptp(cols)) + 1 < max(2, size // 8):
        return None  # tiny: a dot or a hairline is not a class
    if notdef is not None and np.abs(a - notdef).max() < 1e-6:
        return None
    return a


def images_sha256(out: str, rel_paths: Sequence[str]) -> str:
    """sha256 over (relative path, file bytes) of the images, in the given order."""
    h = hashlib.sha256()
    for rel in rel_paths:
        with open(os.path.join(out, rel), "rb") as f:
            data = f.read()
        h.update(rel.encode() + b"\0" + struct.pack("<Q", len(data)) + data)
    return h.hexdigest()


def _write_idx(path: str, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, code, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">")).tobytes())


def build(
    out: str,
    classes: int = 600,
    per_class: int = 40,
    size: int = 32,
    seed: int = 0,
    min_fonts: int = 6,
    dup_cosine: float = 0.97,
    supersample: int = 4,
    variation: Optional[glyph_render.Variation] = None,
    packages: Optional[Sequence[str]] = None,
    font_dirs: Optional[Sequence[str]] = None,
    idx: Optional[str] = None,
    log=print,
) -> dict:
    """Render the data set into ``out`` and return its manifest (also in out/manifest.json)."""
    if classes < 2 or per_class < 2 or size < 8 or min_fonts < 1 or supersample < 1:
        raise ValueError(
            f"need classes >= 2, per_class >= 2, size >= 8, min_fonts >= 1, supersample >= 1; "
            f"got {classes}, {per_class}, {size}, {min_fonts}, {supersample}"
        )
    variation = variation or glyph_render.Variation()
    if not 0 < dup_cosine <= 1:
        raise ValueError(f"dup_cosine must be in (0, 1], got {dup_cosine}")
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"--out {out!r} exists and is not empty: give a new directory")
    t0 = time.perf_counter()
    if font_dirs:
        fonts = glyph_fonts.directory_fonts(font_dirs)
    else:
        fonts = glyph_fonts.package_fonts(packages or list(glyph_fonts.PACKAGES))
    cands = candidate_codepoints()
    for f in fonts:
        glyph_fonts.read_font(f, set(cands))
    cover: Dict[int, List[int]] = {}
    for i, f in enumerate(fonts):
        for cp in f.codepoints:
            cover.setdefault(cp, []).append(i)
    eligible = sorted(cp for cp, fs in cover.items() if len(fs) >= min_fonts)
    log(
        f"{len(fonts)} fonts; {len(cands)} candidate codepoints, {len(eligible)} in the cmaps "
        f"of >= {min_fonts} fonts"
    )

    rng = np.random.default_rng(seed)
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    loaded: Dict[int, object] = {}

    def font(i):
        if i not in loaded:
            loaded[i] = glyph_render.load_font(fonts[i].path, size, supersample)
        return loaded[i]

    notdefs: Dict[int, Optional[np.ndarray]] = {}
    accepted: List[dict] = []
    means: List[np.ndarray] = []
    rejected = {"too few fonts draw it": 0, "look-alike of an accepted class": 0}
    lookalikes = []
    for cp in order:
        if len(accepted) == classes:
            break
        good = []
        for i in cover[cp]:
            if i not in notdefs:
                notdefs[i] = _clean(
                    font(i), chr(glyph_render.NOTDEF_PROBE), size, supersample, None
                )
            a = _clean(font(i), chr(cp), size, supersample, notdefs[i])
            if a is not None:
                good.append((i, a))
        if len(good) < min_fonts:
            rejected["too few fonts draw it"] += 1
            continue
        mean = np.mean([a for _, a in good], axis=0).ravel()
        mean /= np.linalg.norm(mean)
        if means:
            cos = np.stack(means) @ mean
            j = int(np.argmax(cos))
            if cos[j] >= dup_cosine:
                rejected["look-alike of an accepted class"] += 1
                lookalikes.append(
                    [f"U+{cp:04X}", accepted[j]["codepoint"], round(float(cos[j]), 4)]
                )
                continue
        means.append(mean)
        accepted.append(
            {
                "dir": f"{len(accepted):04d}_U+{cp:04X}",
                "codepoint": f"U+{cp:04X}",
                "char": chr(cp),
                "name": unicodedata.name(chr(cp), ""),
                "script": cands[cp],
                "fonts": [i for i, _ in good],
            }
        )
    if len(accepted) < classes:
        raise SystemExit(
            f"only {len(accepted)} classes have >= {min_fonts} fonts that draw them "
            f"({len(fonts)} fonts; rejected: {rejected}); lower --classes or --min-fonts, or "
            f"install more fonts: {glyph_fonts.PACKAGES_APT}"
        )
    log(f"{classes} classes chosen ({rejected}); rendering {classes * per_class} images")

    os.makedirs(out, exist_ok=True)
    rel_paths, images = [], []
    for c in accepted:
        cp = int(c["codepoint"][2:], 16)
        # one generator per class, keyed by the codepoint: a class's images do not depend on
        # which other classes were chosen
        crng = np.random.default_rng([seed, cp])
        usable = c.pop("fonts")
        perm = [usable[k] for k in crng.permutation(len(usable))]
        os.makedirs(os.path.join(out, c["dir"]))
        rows, cls_images = [], []
        for n in range(per_class):
            fi = perm[n % len(perm)]
            for _ in range(100):  # a thinned-away hairline: draw again
                p = glyph_render.sample_params(crng, variation, supersample)
                img = glyph_render.render(font(fi), c["char"], size, p, supersample)
                if img is not None and img.getbbox() is not None:
                    break
            else:
                raise RuntimeError(f"{c['codepoint']} in {fonts[fi].path}: every draw is blank")
            rel = os.path.join(c["dir"], f"{n:03d}.png")
            img.save(os.path.join(out, rel), format="PNG")
            rel_paths.append(rel)
            cls_images.append(np.asarray(img, dtype=np.uint8))
            rows.append([fi, *p.row()])
        c["n_fonts"] = len(usable)
        c["images"] = rows
        images.append(np.stack(cls_images))

    if idx:  # beside, not inside, the class folders: the folder loader would take it for a class
        d = idx
        if os.path.isdir(d) and os.listdir(d):
            raise FileExistsError(f"--idx {d!r} exists and is not empty: give a new directory")
        os.makedirs(d, exist_ok=True)
        x = np.stack(images)  # (classes, per_class, size, size)
        half = per_class // 2
        for name, part in (("train", x[:, :half]), ("t10k", x[:, half:])):
            _write_idx(os.path.join(d, f"{name}-images-idx3-ubyte"), part.reshape(-1, size, size))
            labels = np.repeat(np.arange(classes), part.shape[1])
            # IDX's unsigned-byte labels hold 256 classes; more are written as int32
            labels = labels.astype(np.uint8 if classes <= 256 else np.int32)
            _write_idx(os.path.join(d, f"{name}-labels-idx1-ubyte"), labels)

    manifest = {
        "format_version": FORMAT_VERSION,
        "command": "python benchmarks/glyphs/build.py "
        + " ".join(_cli_args(classes, per_class, size, seed, min_fonts, dup_cosine, idx)),
        "parameters": {
            "classes": classes,
            "per_class": per_class,
            "size": size,
            "seed": seed,
            "min_fonts": min_fonts,
            "dup_cosine": dup_cosine,
            "supersample": supersample,
            "em": glyph_render.EM,
            "fit": glyph_render.FIT,
            "variation": variation.record(),
            "packages": None if font_dirs else list(packages or glyph_fonts.PACKAGES),
            "font_dirs": list(font_dirs) if font_dirs else None,
            "idx": bool(idx),
        },
        "versions": _versions(),
        "layout": "DIR/<k>_U+XXXX/<i>.png, white on black, 8-bit grey; image row = "
        "[font index, rotation_deg, shear, scale, tx, ty, stroke (supersampled px)]",
        "fonts": [f.record() for f in fonts],
        "rejected": rejected,
        "lookalikes": lookalikes,
        "classes": accepted,
        "images_sha256": images_sha256(out, rel_paths),
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(f"wrote {len(rel_paths)} images to {out} in {time.perf_counter() - t0:.0f} s")
    return manifest


def _cli_args(classes, per_class, size, seed, min_fonts, dup_cosine, idx) -> List[str]:
    a = ["--out", "DIR", "--classes", str(classes), "--per-class", str(per_class)]
    a += ["--size", str(size), "--seed", str(seed), "--min-fonts", str(min_fonts)]
    a += ["--dup-cosine", str(dup_cosine)]
    return a + (["--idx", "IDXDIR"] if idx else [])


def _versions() -> dict:
    import PIL
    from fontTools import version as ft_version
    from PIL import features

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "freetype": features.version("freetype2"),
        "fonttools": ft_version,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--classes", type=int, default=600, help="number of classes (default 600)")
    p.add_argument("--per-class", type=int, default=40, help="images per class (default 40)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="class order and variation (default 0)")
    p.add_argument(
        "--min-fonts", type=int, default=6, help="fonts that must draw a class (default 6)"
    )
    p.add_argument(
        "--dup-cosine",
        type=float,
        default=0.97,
        help="mean-drawing cosine at which a codepoint is a look-alike (default 0.97)",
    )
    p.add_argument(
        "--packages",
        help="comma list of Debian font packages (default: the full set, "
        + ", ".join(glyph_fonts.PACKAGES)
        + ")",
    )
    p.add_argument(
        "--font-dir",
        action="append",
        help="use the .ttf/.otf files under DIR instead of --packages (repeatable)",
    )
    p.add_argument(
        "--idx", metavar="IDXDIR", help="also write the images as MNIST-form IDX files there"
    )
    v = glyph_render.Variation()
    p.add_argument("--rotation", type=float, default=v.rotation_deg, help="max |degrees|")
    p.add_argument("--shear", type=float, default=v.shear, help="max |shear|")
    p.add_argument("--stroke-max", type=float, default=v.stroke_max, help="output px")
    args = p.parse_args(argv)
    variation = glyph_render.Variation(
        rotation_deg=args.rotation, shear=args.shear, stroke_max=args.stroke_max
    )
    try:
        build(
            args.out,
            classes=args.classes,
            per_class=args.per_class,
            size=args.size,
            seed=args.seed,
            min_fonts=args.min_fonts,
            dup_cosine=args.dup_cosine,
            variation=variation,
            packages=args.packages.split(",") if args.packages else None,
            font_dirs=args.font_dir,
            idx=args.idx,
        )
    except (glyph_fonts.MissingFontsError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
