"""Image files as training/test sources: every listed file verified before training, then
streamed through a DataLoader (``--workers`` processes) with the transforms of
:mod:`.transforms`. A training sample may carry its own augmentation seed (see
``training.batch_stream``)."""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from .layouts import CorruptImageError
from .transforms import EvalTransform, TrainTransform

__all__ = ["ImageSource", "verify_images"]


def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths, labels, transform: Callable, on_bad_image: str):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int64)
        self.transform, self.on_bad_image = transform, on_bad_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        # (index, augmentation seed) from the training stream, or a bare index
        i, aug_seed = item if isinstance(item, (tuple, list)) else (item, None)
        for j in self._candidates(i):
            try:
                img = _open_rgb(self.paths[j])
            except Exception as e:
                if self.on_bad_image == "stop":
                    raise CorruptImageError(
                        f"{self.paths[j]}: cannot decode the image ({type(e).__name__}: {e}); "
                        "pass --on-bad-image skip to leave such files out"
                    ) from None
                print(f"warning: skipping unreadable image {self.paths[j]}", file=sys.stderr)
                continue
            if aug_seed is None:
                return self.transform(img), int(self.labels[i])
            g = torch.Generator().manual_seed(int(aug_seed))
            return self.transform(img, generator=g), int(self.labels[i])
        raise CorruptImageError(f"no readable image of class {int(self.labels[i])} left")

    def _candidates(self, i: int):
        yield i
        same = np.flatnonzero(self.labels == self.labels[i])
        yield from (int(j) for j in same if j != i)


class ImageSource:
    """Image files streamed through a DataLoader with ``workers`` processes."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        image_size: int,
        train: bool,
        workers: int = 4,
        on_bad_image: str = "stop",
    ):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.workers = workers
        self.image_size, self.on_bad_image = image_size, on_bad_image
        transform = TrainTransform(image_size) if train else EvalTransform(image_size)
        self.files = _ImageFiles(self.paths, self.labels, transform, on_bad_image)

    def __len__(self) -> int:
        return len(self.labels)

    def _loader(self, device: torch.device, **kw) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.files,
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
            **kw,
        )

    def train_batches(
        self, index_batches: torch.Tensor, device: torch.device, aug_seeds=None
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the given indices; ``aug_seeds`` (same shape) seeds each sample's crop
        and flip, so that the stream does not depend on the global RNG or the workers."""
        if aug_seeds is None:
            batches = index_batches.tolist()
        else:
            batches = [list(zip(b, s)) for b, s in zip(index_batches.tolist(), aug_seeds.tolist())]
        loader = self._loader(device, batch_sampler=batches)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def eval_batches(self, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
        for x, _ in self._loader(device, batch_size=batch_size, shuffle=False):
            yield x

    def subset(self, indices, labels, train: bool) -> ImageSource:
        """The files ``indices`` relabelled ``labels``, with the training or the test
        transform (validation folds: the held-out classes are embedded like test images)."""
        return ImageSource(
            [self.paths[i] for i in indices],
            labels,
            self.image_size,
            train=train,
            workers=self.workers,
            on_bad_image=self.on_bad_image,
        )

    def raw_batches(self, batch_size: int, side: int = 32) -> Iterator[torch.Tensor]:
        """The test transform's images, average-pooled to at most ``side`` x ``side`` (the
        raw-input baseline: 224 x 224 x 3 values per image would not fit in memory)."""
        for x in self.eval_batches(batch_size, torch.device("cpu")):
            if x.shape[-1] > side or x.shape[-2] > side:
                x = torch.nn.functional.adaptive_avg_pool2d(x, side)
            yield x

    def describe(self) -> dict:
        return {"kind": "image files", "n": len(self), "workers": self.workers}


def verify_images(paths: List[str], on_bad_image: str) -> Tuple[List[bool], List[Tuple[str, str]]]:
    from PIL import Image

    ok, bad = [], []
    for p in paths:
        reason = None
        if not os.path.isfile(p):
            reason = "file not found"
        else:
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as e:
                reason = f"not a readable image ({type(e).__name__}: {e})"
        if reason is not None:
            if on_bad_image == "stop":
                raise CorruptImageError(
                    f"{p}: {reason}; pass --on-bad-image skip to leave such files out"
                )
            print(f"warning: skipping {p}: {reason}", file=sys.stderr)
            bad.append((p, reason))
        ok.append(reason is None)
    return ok, bad
