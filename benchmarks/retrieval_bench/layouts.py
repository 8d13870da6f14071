"""On-disk layouts of the image datasets: each parser turns ``--data-dir`` into file paths,
class indices 0..C-1, class names and the dataset's class split (nothing is read but the
lists; the images are checked by :mod:`.image_sources`).

* ``folder``: ``DIR/<class>/<image>`` (one subfolder per class, sorted by name; hidden
  entries, names starting with ``.``, are never classes or images).
* ``cub200`` (CUB-200-2011): ``CUB_200_2011/{images.txt, image_class_labels.txt,
  classes.txt, images/}``; classes 1-100 train, 101-200 test.
* ``cars196`` (the all-in-one release): ``cars_annos.mat`` beside ``car_ims/``; classes 1-98
  train, 99-196 test.
* ``sop`` (Stanford Online Products): ``Ebay_train.txt`` / ``Ebay_test.txt`` are the split.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from .idx import DatasetNotFoundError

__all__ = ["IMAGE_EXTENSIONS", "ImageDataError", "CorruptImageError", "LOADERS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")


class ImageDataError(ValueError):
    """The files on disk do not form the dataset (missing list, empty class, bad image)."""


class CorruptImageError(ImageDataError):
    """A file that should be an image cannot be read as one."""


def _find_root(data_dir: Optional[str], name: str, marker: str, subdir: str, layout: str) -> str:
    if not data_dir:
        raise DatasetNotFoundError(
            f"--dataset {name} needs --data-dir DIR (nothing is downloaded); expected {layout}"
        )
    for cand in (data_dir, os.path.join(data_dir, subdir)):
        if os.path.isfile(os.path.join(cand, marker)):
            return cand
    if not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f"{name}: --data-dir {data_dir!r} does not exist")
    raise DatasetNotFoundError(f"{name}: {marker} not found in {data_dir!r}; expected {layout}")


def _read_table(path: str, ncols: int, header: bool = False) -> List[List[str]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if header and n == 1:
                continue
            parts = line.split()
            if not parts:
                continue
            if len(parts) < ncols:
                raise ImageDataError(f"{path}:{n}: expected {ncols} columns, got {line.strip()!r}")
            rows.append(parts)
    return rows


def _load_folder(data_dir: Optional[str]) -> dict:
    if not data_dir:
        raise DatasetNotFoundError(
            "--dataset folder needs --data-dir DIR (one subfolder per class)"
        )
    if not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f"folder: --data-dir {data_dir!r} does not exist")
    classes = sorted(
        d
        for d in os.listdir(data_dir)
        if not d.startswith(".") and os.path.isdir(os.path.join(data_dir, d))
    )
    if not classes:
        raise ImageDataError(f"folder: {data_dir!r} has no class subfolders (DIR/<class>/<image>)")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(
            f
            for f in os.listdir(os.path.join(data_dir, c))
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise ImageDataError(
                f"folder: class {c!r} ({os.path.join(data_dir, c)}) has no image files "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += [os.path.join(data_dir, c, f) for f in files]
        labels += [k] * len(files)
    half = len(classes) // 2
    return {
        "root": data_dir,
        "paths": paths,
        "labels": labels,
        "class_names": classes,
        "class_split": (list(range(half)), list(range(half, len(classes)))),
        "split_rule": f"classes 1-{half} (sorted by name) train, {half + 1}-{len(classes)} test",
    }


def _by_class_id(ids: List[int], names: Dict[int, str], first_test_id: int, what: str) -> dict:
    present = sorted(set(ids))
    index = {cid: k for k, cid in enumerate(present)}
    train = [index[c] for c in present if c < first_test_id]
    test = [index[c] for c in present if c >= first_test_id]
    return {
        "labels": [index[c] for c in ids],
        "class_names": [names.get(c, str(c)) for c in present],
        "class_split": (train, test),
        "split_rule": what,
    }


def _load_cub(data_dir: Optional[str]) -> dict:
    layout = "CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, images/}"
    root = _find_root(data_dir, "cub200", "images.txt", "CUB_200_2011", layout)
    images = {r[0]: r[1] for r in _read_table(os.path.join(root, "images.txt"), 2)}
    labels_path = os.path.join(root, "image_class_labels.txt")
    if not os.path.isfile(labels_path):
        raise DatasetNotFoundError(f"cub200: {labels_path} not found; expected {layout}")
    cls = {r[0]: int(r[1]) for r in _read_table(labels_path, 2)}
    names = {}
    classes_path = os.path.join(root, "classes.txt")
    if os.path.isfile(classes_path):
        names = {int(r[0]): r[1] for r in _read_table(classes_path, 2)}
    missing = [i for i in images if i not in cls]
    if missing:
        raise ImageDataError(f"cub200: image ids {missing[:5]} have no line in {labels_path}")
    order = sorted(images, key=int)
    ids = [cls[i] for i in order]
    out = _by_class_id(ids, names, 101, "classes 1-100 train, 101-200 test (CUB standard)")
    out["paths"] = [os.path.join(root, "images", images[i]) for i in order]
    out["root"] = root
    for c, n in names.items():
        if c not in set(ids):
            raise ImageDataError(f"cub200: class {c} ({n}) has no images in {root}/images.txt")
    return out


def _load_cars(data_dir: Optional[str]) -> dict:
    layout = "cars_annos.mat beside car_ims/"
    root = _find_root(data_dir, "cars196", "cars_annos.mat", "cars196", layout)
    from scipy.io import loadmat

    path = os.path.join(root, "cars_annos.mat")
    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
        ann = np.atleast_1d(mat["annotations"])
        rel = [str(a.relative_im_path) for a in ann]
        ids = [int(getattr(a, "class")) for a in ann]
    except Exception as e:
        raise ImageDataError(f"cars196: cannot read {path} ({type(e).__name__}: {e})") from e
    names = {}
    if "class_names" in mat:
        names = {k + 1: str(n) for k, n in enumerate(np.atleast_1d(mat["class_names"]))}
    out = _by_class_id(ids, names, 99, "classes 1-98 train, 99-196 test (Cars196 standard)")
    out["paths"] = [os.path.join(root, r) for r in rel]
    out["root"] = root
    return out


def _load_sop(data_dir: Optional[str]) -> dict:
    layout = "Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <category>_final/}"
    root = _find_root(data_dir, "sop", "Ebay_train.txt", "Stanford_Online_Products", layout)
    paths, ids, split_of = [], [], []
    for split in ("train", "test"):
        p = os.path.join(root, f"Ebay_{split}.txt")
        if not os.path.isfile(p):
            raise DatasetNotFoundError(f"sop: {p} not found; expected {layout}")
        rows = _read_table(p, 4, header=True)
        if not rows:
            raise ImageDataError(f"sop: {p} lists no images")
        for r in rows:
            paths.append(os.path.join(root, r[3]))
            ids.append(int(r[1]))
            split_of.append(split)
    train_ids = {c for c, s in zip(ids, split_of) if s == "train"}
    test_ids = {c for c, s in zip(ids, split_of) if s == "test"}
    if train_ids & test_ids:
        raise ImageDataError(
            f"sop: classes {sorted(train_ids & test_ids)[:5]} are in both Ebay_train.txt and "
            "Ebay_test.txt (the published lists are class-disjoint)"
        )
    present = sorted(train_ids | test_ids)
    index = {cid: k for k, cid in enumerate(present)}
    return {
        "root": root,
        "paths": paths,
        "labels": [index[c] for c in ids],
        "class_names": [str(c) for c in present],
        "class_split": (
            [index[c] for c in sorted(train_ids)],
            [index[c] for c in sorted(test_ids)],
        ),
        "split_of": split_of,
        "split_rule": "Ebay_train.txt trains, Ebay_test.txt is retrieved (SOP standard)",
    }


LOADERS = {"folder": _load_folder, "cub200": _load_cub, "cars196": _load_cars, "sop": _load_sop}
