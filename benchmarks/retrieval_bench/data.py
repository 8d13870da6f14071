"""Datasets and evaluation protocols of the retrieval benchmark.

A loader gives a dataset: in memory (:class:`Dataset`: digits, Fashion-MNIST, any IDX set)
or image files on disk (:class:`images.ImageDataset`: folder, CUB-200-2011, Cars196, SOP).
:func:`make_protocol` turns it into what is trained and evaluated:

* ``samples`` (closed set): train on the training images, retrieve among the test images of
  the same classes; classification accuracy means something here.
* ``classes`` (class-disjoint, Musgrave et al., ECCV 2020): train on one set of classes,
  retrieve among images of classes the model never saw (test against test). Defaults:
  digits / Fashion-MNIST / IDX classes 0-4 -> 5-9 (training images of 0-4, test images of
  5-9), CUB 1-100 / 101-200, Cars 1-98 / 99-196, SOP its Ebay_train / Ebay_test lists.

Nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import images
from .idx import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_DIR,
    DatasetNotFoundError,
    IDXError,
    find_idx_files,
    read_idx,
)
from .protocol import Protocol, class_partition, ranges

__all__ = [
    "Dataset",
    "ArraySource",
    "Protocol",
    "DATASETS",
    "SPLITS",
    "load_dataset",
    "load_digits",
    "load_idx_dataset",
    "make_protocol",
    "default_split",
    "class_partition",
    "has_official_split",
    "DatasetNotFoundError",
    "IDXError",
]

DATASETS = ("digits", "fashion-mnist", "idx", "folder", "cub200", "cars196", "sop")
SPLITS = ("auto", "samples", "classes", "both")


@dataclass
class Dataset:
    """An in-memory train/test split. ``x_*`` float32 in (N, C, H, W); ``y_*`` int64 in 0..C-1.

    ``norm``: how :func:`make_protocol` standardises inputs with its training images'
    statistics, ``"pixel"`` (per pixel) or ``"global"`` (one mean and std).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple  # (C, H, W) of one sample
    class_names: List[str] = field(default_factory=list)
    norm: str = "global"

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.image_shape))


class ArraySource:
    """Inputs held in memory (one tensor, moved to the device once); batches are indexed."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
        self.labels = np.asarray(y, dtype=np.int64)
        self._on: Optional[Tuple[torch.device, torch.Tensor, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def _device(self, device: torch.device):
        if self._on is None or self._on[0] != device:
            self._on = (device, self.x.to(device), torch.as_tensor(self.labels).to(device))
        return self._on[1], self._on[2]

    def train_batches(
        self, index_batches: torch.Tensor, device: torch.device, aug_seeds=None
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the given indices (in-memory data is not augmented: ``aug_seeds`` is
        accepted for the same signature as the image sources and unused)."""
        x, y = self._device(device)
        for b in index_batches:
            b = b.to(device)
            yield x[b], y[b]

    def eval_batches(self, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size].to(device)

    def raw_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The inputs as the model sees them, for the raw-input baseline."""
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size]

    def subset(self, indices, labels, train: bool = True) -> ArraySource:
        """The samples ``indices`` relabelled ``labels`` (validation folds)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArraySource(self.x[torch.as_tensor(idx)].numpy(), labels)

    def describe(self) -> dict:
        return {"kind": "in-memory", "n": len(self)}


def _to_float_images(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= 255.0
    return x


def load_idx_dataset(data_dir: str, name: str = "idx") -> Dataset:
    """Load an MNIST-form IDX dataset (train/t10k images + labels) from ``data_dir``.

    Images must be 3-D (N, H, W), labels 1-D (N,) integer, with matching N. Images are scaled
    to [0, 1] (uint8); :func:`make_protocol` standardises them with the mean/std (one
    value) of the images it trains on.
    """
    paths = find_idx_files(data_dir, name)

    arrays = {}
    for split in ("train", "test"):
        images = read_idx(paths[(split, "images")])
        labels = read_idx(paths[(split, "labels")])
        if images.ndim != 3:
            raise IDXError(
                f"{paths[(split, 'images')]}: images must have 3 dimensions (N, H, W), "
                f"got shape {images.shape}"
            )
        if labels.ndim != 1:
            raise IDXError(
                f"{paths[(split, 'labels')]}: labels must have 1 dimension, got {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise IDXError(f"{paths[(split, 'labels')]}: labels must be integers")
        if len(images) != len(labels):
            raise IDXError(
                f"{data_dir}: {split} split has {len(images)} images but {len(labels)} labels"
            )
        if len(labels) == 0:
            raise IDXError(f"{data_dir}: {split} split is empty")
        if labels.min() < 0:
            raise IDXError(f"{paths[(split, 'labels')]}: negative labels")
        arrays[split] = (images, labels.astype(np.int64))

    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    if xtr.shape[1:] != xte.shape[1:]:
        raise IDXError(
            f"{data_dir}: train images are {xtr.shape[1:]} but test images are {xte.shape[1:]}"
        )
    xtr, xte = _to_float_images(xtr), _to_float_images(xte)
    h, w = xtr.shape[1:]
    n_classes = int(max(ytr.max(), yte.max()) + 1)
    class_names = (
        list(FASHION_MNIST_CLASSES)
        if name == "fashion-mnist" and n_classes == 10
        else [str(i) for i in range(n_classes)]
    )
    return Dataset(
        name=name,
        x_train=xtr[:, None].astype(np.float32),
        y_train=ytr,
        x_test=xte[:, None].astype(np.float32),
        y_test=yte,
        image_shape=(1, h, w),
        class_names=class_names,
        norm="global",
    )


def load_digits(test_fraction: float = 0.3, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), stratified train/test split.

    The split is fixed by ``split_seed`` (independent of the training seed) so runs with
    different seeds are evaluated on the same held-out images. :func:`make_protocol`
    standardises inputs per pixel with its training images' statistics.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    d = _sk_load_digits()
    x = d.images.astype(np.float32)  # (N, 8, 8), values 0..16
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    return Dataset(
        name="digits",
        x_train=xtr[:, None].astype(np.float32),
        y_train=ytr,
        x_test=xte[:, None].astype(np.float32),
        y_test=yte,
        image_shape=(1, 8, 8),
        class_names=[str(i) for i in range(10)],
        norm="pixel",
    )


def load_dataset(name: str, data_dir: Optional[str] = None, **image_options):
    """``digits`` | ``fashion-mnist`` (IDX files in ``data_dir``, default the Debian path) |
    ``idx`` (any MNIST-form IDX set in ``data_dir``) | ``folder`` | ``cub200`` | ``cars196`` |
    ``sop`` (image files in ``data_dir``; ``image_options`` go to :mod:`.images`)."""
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_idx_dataset(data_dir or FASHION_MNIST_DEFAULT_DIR, name="fashion-mnist")
    if name == "idx":
        if not data_dir:
            raise DatasetNotFoundError("--dataset idx needs --data-dir DIR with the four IDX files")
        return load_idx_dataset(
            data_dir, name=f"idx:{os.path.basename(os.path.normpath(data_dir))}"
        )
    if name in ("folder", "cub200", "cars196", "sop"):
        return images.load_image_dataset(name, data_dir, **image_options)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def has_official_split(dataset: str) -> bool:
    """CUB, Cars and SOP have published class splits; the others get a partition drawn per
    seed (``--split classes``)."""
    return dataset in ("cub200", "cars196", "sop")


def default_split(dataset: str) -> str:
    """``--split auto``: both protocols on digits (cheap, and the two answer different
    questions), the closed set on the MNIST-form sets (as the seeds' tables), class-disjoint
    on the retrieval datasets, which have published class splits."""
    if dataset == "digits":
        return "both"
    if dataset in ("fashion-mnist", "idx"):
        return "samples"
    return "classes"


def _remap(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    lut = np.full(int(max(labels.max(), max(classes))) + 1, -1, dtype=np.int64)
    lut[np.asarray(classes)] = np.arange(len(classes))
    return lut[labels]


def _standardise(ds: Dataset, x_train: np.ndarray, *xs: np.ndarray) -> List[np.ndarray]:
    if ds.norm == "pixel":
        mean = x_train.mean(axis=0, keepdims=True)
        std = x_train.std(axis=0, keepdims=True)
        std[std == 0] = 1.0
    else:
        mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    return [((x - mean) / std).astype(np.float32) for x in (x_train, *xs)]


def make_protocol(ds, split: str, seed: int = 0, partition_seed: Optional[int] = None) -> Protocol:
    """The ``split`` protocol (``samples`` or ``classes``) of a loaded dataset.

    ``partition_seed``: for ``classes`` on a data set without an official class split,
    draw the training half of the classes with it (see :func:`class_partition`)."""
    if split not in ("samples", "classes"):
        raise ValueError(f"split must be 'samples' or 'classes', got {split!r}")
    if not isinstance(ds, Dataset):  # image files
        return images.make_image_protocol(ds, split, seed=seed, partition_seed=partition_seed)
    names = ds.class_names or [str(i) for i in range(ds.num_classes)]
    if split == "samples":
        xtr, xte = _standardise(ds, ds.x_train, ds.x_test)
        return Protocol(
            "samples",
            ArraySource(xtr, ds.y_train),
            ArraySource(xte, ds.y_test),
            list(names),
            list(names),
            ds.image_shape,
            f"closed set: train on the {len(ds.y_train)} training images, retrieve among the "
            f"{len(ds.y_test)} test images of the same {ds.num_classes} classes",
        )
    c = ds.num_classes
    if c < 4:
        raise SystemExit(f"--split classes needs at least 4 classes ({ds.name} has {c})")
    train_cls, test_cls = class_partition(c, partition_seed)
    tr = np.isin(ds.y_train, train_cls)
    te = np.isin(ds.y_test, test_cls)
    xtr, xte = _standardise(ds, ds.x_train[tr], ds.x_test[te])
    return Protocol(
        "classes",
        ArraySource(xtr, _remap(ds.y_train[tr], train_cls)),
        ArraySource(xte, _remap(ds.y_test[te], test_cls)),
        [names[i] for i in train_cls],
        [names[i] for i in test_cls],
        ds.image_shape,
        f"class-disjoint: train on the training images of classes {ranges(train_cls)} "
        f"({int(tr.sum())}), retrieve among the test images of the unseen classes "
        f"{ranges(test_cls)} ({int(te.sum())}), test against test",
    )
