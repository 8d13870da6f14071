"""What one evaluation protocol trains on and retrieves among (:class:`Protocol`), and the
class partition of data sets without an official class split. Shared by the in-memory
data sets (:mod:`.data`) and the image files (:mod:`.images`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Protocol", "class_partition", "ranges"]


@dataclass
class Protocol:
    """What one evaluation protocol trains on and retrieves among.

    ``train.labels`` are 0..len(train_classes)-1 and ``test.labels`` 0..len(test_classes)-1;
    proxy and center losses are built for the training classes only.
    """

    split: str  # "samples" | "classes"
    train: object  # ArraySource | images.ImageSource
    test: object
    train_classes: List[str]
    test_classes: List[str]
    image_shape: tuple
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.train_classes)

    @property
    def classification(self) -> bool:
        """Classification / nearest-center accuracy only where test classes were trained."""
        return self.split == "samples"

    def summary(self) -> dict:
        return {
            "split": self.split,
            "description": self.description,
            "n_train": len(self.train),
            "n_test": len(self.test),
            "num_classes": self.num_classes,
            "num_test_classes": len(self.test_classes),
            "train_classes": list(self.train_classes),
            "class_names": list(self.test_classes),  # the test labels' names (plot legend)
            "image_shape": list(self.image_shape),
        }


def class_partition(num_classes: int, partition_seed: Optional[int]) -> Tuple[List[int], List[int]]:
    """Training / test classes of a data set without an official class split: the first
    and second half (``partition_seed`` None: classes 0..C/2-1 train), or a random half drawn
    by ``partition_seed`` (``--seeds`` then varies the partition, so that the spread over
    seeds includes the choice of classes). Each half is sorted."""
    order = np.arange(num_classes)
    if partition_seed is not None:
        order = np.random.RandomState(
            np.random.SeedSequence([int(partition_seed), 7]).generate_state(4)
        ).permutation(num_classes)
    half = num_classes // 2
    return sorted(int(c) for c in order[:half]), sorted(int(c) for c in order[half:])


def ranges(classes: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2,5'``."""
    out, start, prev = [], None, None
    for c in list(classes) + [None]:
        if start is not None and (c is None or c != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if c is not None and start is None:
            start = c
        prev = c
    return ",".join(out)
