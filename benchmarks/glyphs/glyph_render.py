"""Drawing one character: white on black, centred, with a mild affine and stroke variation.

The glyph is drawn at ``supersample`` times the output size with Pillow's basic layout
engine (no shaping: the result does not depend on whether libraqm is installed), thickened
(FreeType's stroker) or thinned (a min filter), cropped to its ink, moved by one affine map
(rotation, shear, scale, translation) onto the output canvas and box-filtered down to
``size`` x ``size``. All glyphs of a font share one point size, so size differences between
characters (``o`` against ``O``) survive; a glyph wider or taller than ``fit`` of the canvas
is shrunk to fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

__all__ = ["Variation", "Params", "load_font", "render", "sample_params", "NOTDEF_PROBE"]

EM = 0.7  # point size as a fraction of the canvas
FIT = 0.85  # largest ink extent as a fraction of the canvas (before the affine scale)
NOTDEF_PROBE = 0x10FFFD  # a private-use codepoint no font maps: draws the font's .notdef


@dataclass(frozen=True)
class Variation:
    """Ranges of the per-image variation (uniform draws; ``stroke`` in output pixels, +
    thickens, - thins)."""

    rotation_deg: float = 8.0
    shear: float = 0.15
    scale_min: float = 0.85
    scale_max: float = 1.1
    translate: float = 0.06  # fraction of the output size
    stroke_min: float = -0.25
    stroke_max: float = 0.5

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Params:
    """One image's draw of the variation."""

    rotation_deg: float = 0.0
    shear: float = 0.0
    scale: float = 1.0
    tx: float = 0.0  # fraction of the output size
    ty: float = 0.0
    stroke: int = 0  # supersampled pixels

    def row(self) -> list:
        return [
            round(self.rotation_deg, 4),
            round(self.shear, 4),
            round(self.scale, 4),
            round(self.tx, 4),
            round(self.ty, 4),
            self.stroke,
        ]


def sample_params(rng: np.random.Generator, v: Variation, supersample: int) -> Params:
    """Draw one image's parameters from ``rng`` (always six draws, in a fixed order)."""
    u = rng.uniform(size=6)
    stroke = v.stroke_min + u[5] * (v.stroke_max - v.stroke_min)
    return Params(
        rotation_deg=float((2 * u[0] - 1) * v.rotation_deg),
        shear=float((2 * u[1] - 1) * v.shear),
        scale=float(v.scale_min + u[2] * (v.scale_max - v.scale_min)),
        tx=float((2 * u[3] - 1) * v.translate),
        ty=float((2 * u[4] - 1) * v.translate),
        stroke=int(round(stroke * supersample)),
    )


def load_font(path: str, size: int, supersample: int):
    """The font at the point size of a ``size`` canvas drawn ``supersample`` times larger."""
    from PIL import ImageFont

    return ImageFont.truetype(
        path, size=max(1, round(EM * size * supersample)), layout_engine=ImageFont.Layout.BASIC
    )


def _draw(font, char: str, stroke: int):
    from PIL import Image, ImageDraw, ImageFilter

    px = font.size
    canvas = Image.new("L", (3 * px, 3 * px), 0)
    ImageDraw.Draw(canvas).text(
        (1.5 * px, 1.5 * px),
        char,
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=max(stroke, 0),
        stroke_fill=255,
    )
    if stroke < 0:  # thin: erode by |stroke| pixels on each side
        canvas = canvas.filter(ImageFilter.MinFilter(2 * (-stroke) + 1))
    return canvas


def render(font, char: str, size: int, params: Params = Params(), supersample: int = 4):
    """``char`` in ``font`` (from :func:`load_font` with the same size and supersample) as a
    ``size`` x ``size`` greyscale PIL image, or None when nothing is drawn (a blank glyph,
    or one thinned away)."""
    from PIL import Image

    glyph = _draw(font, char, params.stroke)
    box = glyph.getbbox()
    if box is None:
        return None
    # a blank margin around the ink: PIL's bilinear sampling repeats the edge pixels of its
    # input, which for a tight crop would smear ink outward
    pad = 2
    glyph = glyph.crop((box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad))
    w, h = box[2] - box[0], box[3] - box[1]
    hi = size * supersample
    fit = min(1.0, FIT * hi / max(w, h))
    s = params.scale * fit
    t = math.radians(params.rotation_deg)
    c, n = math.cos(t), math.sin(t)
    # forward map: out = centre + shift + s * R(t) @ Shear(k) @ (in - glyph centre)
    k = params.shear
    a = np.array([[c, c * k - n], [n, n * k + c]]) * s
    inv = np.linalg.inv(a)
    ox = hi / 2 + params.tx * hi
    oy = hi / 2 + params.ty * hi
    gx, gy = pad + w / 2, pad + h / 2
    coeffs = (
        float(inv[0, 0]),
        float(inv[0, 1]),
        float(gx - inv[0, 0] * ox - inv[0, 1] * oy),
        float(inv[1, 0]),
        float(inv[1, 1]),
        float(gy - inv[1, 0] * ox - inv[1, 1] * oy),
    )
    out = glyph.transform((hi, hi), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0)
    return out.resize((size, size), Image.BOX)


def ink(img) -> Optional[np.ndarray]:
    """The image as float32 in [0, 1], or None for None."""
    return None if img is None else np.asarray(img, dtype=np.float32) / 255.0
