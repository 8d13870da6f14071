"""Datasets for the retrieval benchmark: an IDX (MNIST-format) reader and loaders.

Nothing is downloaded: ``digits`` is bundled with scikit-learn, Fashion-MNIST (or MNIST, or
any IDX pair of the same form) is read from ``*-idx?-ubyte[.gz]`` files in a directory.

IDX format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``0x00 0x00 <dtype>
<ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the data, big-endian, in C
order. Every field is validated; a malformed file raises :class:`IDXError` instead of returning
garbage.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = [
    "IDX_DTYPES",
    "IDXError",
    "DatasetNotFoundError",
    "Dataset",
    "read_idx",
    "write_idx",
    "load_idx_dataset",
    "load_digits",
    "load_dataset",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_CLASSES",
]

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# IDX type code -> big-endian numpy dtype
IDX_DTYPES: Dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_NDIM = 16
_GZIP_MAGIC = b"\x1f\x8b"


class IDXError(ValueError):
    """A file is not a valid IDX file (bad header, wrong size, corrupt compression)."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where we looked for them."""


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        if str(path).endswith(".gz"):
            raise IDXError(f"{path}: name ends in .gz but the file is not gzip-compressed")
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise IDXError(f"{path}: corrupt or truncated gzip data ({e})") from e


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into a native-endian numpy array."""
    if len(data) < 4:
        raise IDXError(f"{name}: too short for an IDX header ({len(data)} bytes, need >= 4)")
    b0, b1, code, ndim = data[0], data[1], data[2], data[3]
    if b0 != 0 or b1 != 0:
        raise IDXError(
            f"{name}: wrong magic number 0x{data[:4].hex()}: an IDX file starts with two zero "
            "bytes (is this really an IDX file?)"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise IDXError(f"{name}: unknown IDX data type code 0x{code:02X} (known: {known})")
    if ndim < 1 or ndim > _MAX_NDIM:
        raise IDXError(f"{name}: invalid number of dimensions {ndim} (expected 1..{_MAX_NDIM})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXError(
            f"{name}: header truncated: {ndim} dimensions need {header_len} header bytes, "
            f"file has {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual < expected:
        raise IDXError(
            f"{name}: data truncated: header says shape {dims} of {dtype.name} "
            f"({expected} bytes) but only {actual} data bytes follow"
        )
    if actual > expected:
        raise IDXError(
            f"{name}: {actual - expected} unexpected trailing bytes after the data of shape "
            f"{dims} (file corrupt or header wrong)"
        )
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=header_len)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array, validating it."""
    return parse_idx(_read_bytes(path), name=str(path))


def write_idx(path: str, array: np.ndarray, compress: Optional[bool] = None) -> None:
    """Write ``array`` as an IDX file; gzip-compressed if ``compress`` (default: name ends .gz)."""
    array = np.asarray(array)
    code = None
    for c, dt in IDX_DTYPES.items():
        if dt.newbyteorder("=") == array.dtype.newbyteorder("="):
            code = c
            break
    if code is None:
        raise TypeError(f"dtype {array.dtype} has no IDX type code")
    if array.ndim < 1 or array.ndim > _MAX_NDIM:
        raise ValueError(f"IDX needs 1..{_MAX_NDIM} dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = str(path).endswith(".gz")
    if compress:
        payload = gzip.compress(payload, mtime=0)
    with open(path, "wb") as f:
        f.write(payload)


@dataclass
class Dataset:
    """An in-memory train/test split. ``x_*`` float32, standardised; ``y_*`` int64 in 0..C-1."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple  # (C, H, W) of one sample
    class_names: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.image_shape))

    def summary(self) -> dict:
        return {
            "name": self.name,
            "n_train": int(len(self.y_train)),
            "n_test": int(len(self.y_test)),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "class_names": list(self.class_names),
        }


_IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(data_dir: str, stem: str) -> Optional[str]:
    # accept both the canonical "train-images-idx3-ubyte" and the "train-images.idx3-ubyte"
    # spelling some mirrors use, compressed or not
    variants = [stem, stem.replace("-idx", ".idx")]
    for v in variants:
        for suffix in (".gz", ""):
            p = os.path.join(data_dir, v + suffix)
            if os.path.isfile(p):
                return p
    return None


def _missing_message(data_dir: str, missing: Sequence[str], name: str) -> str:
    msg = (
        f"{name}: IDX files not found in {data_dir!r}: missing "
        + ", ".join(f"{m}[.gz]" for m in missing)
        + ".\nNothing is downloaded at run time. To get them:\n"
    )
    if name == "fashion-mnist":
        msg += (
            "  * on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
            f"(installs them in {FASHION_MNIST_DEFAULT_DIR}), or\n"
            "  * download the four *.gz files from "
            "https://github.com/zalandoresearch/fashion-mnist (data/fashion) "
            "into a directory and pass --data-dir DIR."
        )
    else:
        msg += (
            "  * put the four IDX files (train/t10k images/labels) in DIR and pass --data-dir DIR."
        )
    return msg


def _to_float_images(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x /= 255.0
    return x


def load_idx_dataset(data_dir: str, name: str = "idx") -> Dataset:
    """Load an MNIST-form IDX dataset (train/t10k images + labels) from ``data_dir``.

    Images must be 3-D (N, H, W), labels 1-D (N,) integer, with matching N. Images are scaled
    to [0, 1] (uint8) and standardised with the training set's global mean/std.
    """
    paths = {}
    missing = []
    for split, stems in _IDX_SPLITS.items():
        for kind, stem in zip(("images", "labels"), stems):
            p = _find_file(data_dir, stem)
            if p is None:
                missing.append(stem)
            paths[(split, kind)] = p
    if missing:
        raise DatasetNotFoundError(_missing_message(data_dir, missing, name))

    arrays = {}
    for split in _IDX_SPLITS:
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
    mean, std = float(xtr.mean()), float(xtr.std()) or 1.0
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
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
    )


def load_digits(test_fraction: float = 0.3, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), stratified train/test split.

    The split is fixed by ``split_seed`` (independent of the training seed) so runs with
    different seeds are evaluated on the same held-out images. Inputs are standardised per
    pixel with training-set statistics.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    d = _sk_load_digits()
    x = d.images.astype(np.float32)  # (N, 8, 8), values 0..16
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    mean = xtr.mean(axis=0, keepdims=True)
    std = xtr.std(axis=0, keepdims=True)
    std[std == 0] = 1.0
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
    return Dataset(
        name="digits",
        x_train=xtr[:, None].astype(np.float32),
        y_train=ytr,
        x_test=xte[:, None].astype(np.float32),
        y_test=yte,
        image_shape=(1, 8, 8),
        class_names=[str(i) for i in range(10)],
    )


DATASETS = ("digits", "fashion-mnist", "idx")


def load_dataset(name: str, data_dir: Optional[str] = None) -> Dataset:
    """``digits`` | ``fashion-mnist`` (IDX files in ``data_dir``, default the Debian path) |
    ``idx`` (any MNIST-form IDX pair in ``data_dir``, e.g. MNIST)."""
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_idx_dataset(data_dir or FASHION_MNIST_DEFAULT_DIR, name="fashion-mnist")
    if name == "idx":
        if not data_dir:
            raise ValueError("--dataset idx needs --data-dir DIR with the four IDX files")
        return load_idx_dataset(
            data_dir, name=f"idx:{os.path.basename(os.path.normpath(data_dir))}"
        )
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
