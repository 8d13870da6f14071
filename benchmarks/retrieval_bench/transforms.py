"""Image transforms of the retrieval benchmark (the reality check's, Musgrave et al., ECCV
2020): training, resize of the shorter side to ``size * 256 / 224``, random resized crop
(scale 0.16-1, aspect 3/4-4/3) to ``size`` and a horizontal flip; testing, the same resize
and a center crop; then ImageNet mean/std normalisation.

The crop follows torchvision's ``RandomResizedCrop.get_params`` sampling rule draw for draw
(the tests compare the two where torchvision imports). Ours is used even there: every draw
must come from the sample's own ``torch.Generator`` (identical streams whatever the loss and
the workers), and torchvision's transform only reads the global RNG.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TRAIN_CROP_SCALE", "TrainTransform", "EvalTransform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_tensor(img) -> torch.Tensor:
    a = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t - mean) / std


TRAIN_CROP_SCALE = (0.16, 1.0)  # the reality check's crop scale (after the resize)


class TrainTransform:
    """Resize (shorter side to ``size * 256 / 224``, ``resize=True``), random resized crop
    (torchvision's sampling rule) to ``size`` and horizontal flip. The draws come from
    ``generator`` when one is passed (the benchmark passes one per sample), else from torch's
    global RNG."""

    def __init__(self, size: int, scale=TRAIN_CROP_SCALE, ratio=(3 / 4, 4 / 3), resize=True):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.resize = int(round(size * 256 / 224)) if resize else None

    def crop_box(
        self, width: int, height: int, generator: Optional[torch.Generator] = None
    ) -> Tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        g = generator
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale, generator=g))
            aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=g)))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                return left, top, left + w, top + h
        # fallback: the central crop with the ratio clamped to the allowed range
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def __call__(self, img, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        from PIL import Image

        if self.resize is not None:
            w, h = img.size
            s = self.resize / min(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        box = self.crop_box(*img.size, generator=generator)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        if float(torch.rand(1, generator=generator)) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img)


class EvalTransform:
    """Resize the shorter side to ``round(size * 256 / 224)``, center crop ``size``."""

    def __init__(self, size: int):
        self.size = size
        self.resize = int(round(size * 256 / 224))

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        w, h = img.size
        s = self.resize / min(w, h)
        nw, nh = max(self.size, int(round(w * s))), max(self.size, int(round(h * s)))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return _to_tensor(img.crop((left, top, left + self.size, top + self.size)))
