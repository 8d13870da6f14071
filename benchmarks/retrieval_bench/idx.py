"""The IDX (MNIST-format) file reader and writer, and finding the four files of an IDX set.

Fashion-MNIST (or MNIST, or any IDX pair of the same form) is read from
``*-idx?-ubyte[.gz]`` files in a directory; nothing is downloaded.

IDX format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``0x00 0x00 <dtype>
<ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the data, big-endian, in C
order. Every field is validated; a malformed file raises :class:`IDXError` instead of returning
garbage.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "IDX_DTYPES",
    "IDXError",
    "DatasetNotFoundError",
    "read_idx",
    "parse_idx",
    "write_idx",
    "find_idx_files",
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


def find_idx_files(data_dir: str, name: str) -> Dict[Tuple[str, str], str]:
    """``{(split, kind): path}`` for split in train/test and kind in images/labels, or
    :class:`DatasetNotFoundError` listing what is missing and how to get it."""
    if not os.path.isdir(data_dir):
        raise DatasetNotFoundError(
            _missing_message(data_dir, [s for v in _IDX_SPLITS.values() for s in v], name)
        )
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
    return paths
