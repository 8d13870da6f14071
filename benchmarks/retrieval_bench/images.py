"""Image datasets read from disk (nothing is downloaded), their standard class splits, the
standard transforms and DataLoaders.

Layouts (``--data-dir`` is the dataset's own directory, or the directory that holds it):

* ``folder``: ``DIR/<class>/<image>`` (one subfolder per class, sorted by name).
  ``--split classes``: the first half of the classes trains, the rest is retrieved.
* ``cub200`` (CUB-200-2011, Wah et al. 2011): ``CUB_200_2011/{images.txt,
  image_class_labels.txt, classes.txt, images/}``. Classes 1-100 train, 101-200 test.
* ``cars196`` (Krause et al. 2013, the all-in-one release): ``cars_annos.mat`` (fields
  ``relative_im_path``, ``class``; ``class_names``) beside ``car_ims/``. Classes 1-98 train,
  99-196 test.
* ``sop`` (Stanford Online Products, Oh Song et al., CVPR 2016):
  ``Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <category>_final/...}``
  (``image_id class_id super_class_id path``): the two lists are the split.

``--split samples`` on these holds out 30 % of each class's images (fixed seed): a closed-set
check, not a published protocol.

Every listed image is opened and verified before training (PIL's ``verify``): a missing or
unreadable file stops the run naming it, or with ``--on-bad-image skip`` is left out with a
warning; a class left without images is an error. A file that passes the check and still
fails to decode later is handled the same way (skip: another image of its class is used).

Transforms (the reality check's, Musgrave et al., ECCV 2020): training, resize of the shorter
side to ``image_size * 256 / 224``, then a random resized crop (scale 0.16-1, aspect
3/4-4/3) to ``image_size`` and a horizontal flip; testing, the same resize and a center crop;
then ImageNet mean/std normalisation. Every random draw of a training sample comes from a
generator seeded by that sample's own seed in the stream (see ``training.batch_stream``), so
crops do not depend on the global RNG, on the loss or on ``--workers``.

Hidden entries (names starting with ``.``, e.g. ``.ipynb_checkpoints``) are never classes or
images.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .idx import DatasetNotFoundError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataError",
    "CorruptImageError",
    "ImageDataset",
    "ImageSource",
    "load_image_dataset",
    "make_image_protocol",
    "TrainTransform",
    "EvalTransform",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDataError(ValueError):
    """The files on disk do not form the dataset (missing list, empty class, bad image)."""


class CorruptImageError(ImageDataError):
    """A file that should be an image cannot be read as one."""


# ------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# files -> samples
# ------------------------------------------------------------------------------------------


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


@dataclass
class ImageDataset:
    """Image files with class indices 0..C-1 and the dataset's class-disjoint split.

    ``class_split``: ``(train_classes, test_classes)`` as class indices; or, for SOP, the
    lists themselves decide: ``split_of[i]`` is "train"/"test" for item i.
    """

    name: str
    root: str
    paths: List[str]
    labels: np.ndarray
    class_names: List[str]
    class_split: Optional[Tuple[List[int], List[int]]] = None
    split_of: Optional[List[str]] = None
    image_size: int = 224
    workers: int = 4
    on_bad_image: str = "stop"
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    split_rule: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _verify(paths: List[str], on_bad_image: str) -> Tuple[List[bool], List[Tuple[str, str]]]:
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


_LOADERS = {"folder": _load_folder, "cub200": _load_cub, "cars196": _load_cars, "sop": _load_sop}


def load_image_dataset(
    name: str,
    data_dir: Optional[str],
    image_size: int = 224,
    workers: int = 4,
    on_bad_image: str = "stop",
) -> ImageDataset:
    """Read dataset ``name``'s file lists from ``data_dir`` and verify every image."""
    if on_bad_image not in ("stop", "skip"):
        raise ValueError(f"on_bad_image must be 'stop' or 'skip', got {on_bad_image!r}")
    d = _LOADERS[name](os.path.expanduser(data_dir) if data_dir else data_dir)
    paths, labels = d["paths"], np.asarray(d["labels"], dtype=np.int64)
    split_of = d.get("split_of")
    ok, skipped = _verify(paths, on_bad_image)
    if skipped:
        keep = np.flatnonzero(ok)
        paths = [paths[i] for i in keep]
        labels = labels[keep]
        split_of = [split_of[i] for i in keep] if split_of else None
    counts = np.bincount(labels, minlength=len(d["class_names"]))
    empty = [d["class_names"][k] for k in np.flatnonzero(counts == 0)]
    if empty:
        raise ImageDataError(
            f"{name}: class(es) {empty[:5]} have no readable images left"
            + (f" after skipping {len(skipped)} bad file(s)" if skipped else "")
        )
    return ImageDataset(
        name=name,
        root=d["root"],
        paths=paths,
        labels=labels,
        class_names=list(d["class_names"]),
        class_split=d["class_split"],
        split_of=split_of,
        image_size=image_size,
        workers=workers,
        on_bad_image=on_bad_image,
        skipped=skipped,
        split_rule=d["split_rule"],
    )


def make_image_protocol(
    ds: ImageDataset,
    split: str,
    seed: int = 0,
    test_fraction: float = 0.3,
    partition_seed: Optional[int] = None,
):
    """``classes``: the dataset's class-disjoint split (for ``folder``, which has no official
    one, a random half of the classes drawn by ``partition_seed`` when given);
    ``samples``: ``test_fraction`` of each class's images held out (fixed ``seed``; every
    class needs >= 2 images)."""
    from .data import Protocol, class_partition

    if split == "classes" and ds.name == "folder" and partition_seed is not None:
        train_cls, test_cls = class_partition(ds.num_classes, partition_seed)
        ds = ImageDataset(
            **{
                **ds.__dict__,
                "class_split": (train_cls, test_cls),
                "split_rule": f"a random half of the classes (partition seed {partition_seed}) "
                "trains, the other half is retrieved",
            }
        )

    def source(idx, train: bool, classes: List[int]):
        lut = {c: k for k, c in enumerate(classes)}
        return ImageSource(
            [ds.paths[i] for i in idx],
            [lut[int(ds.labels[i])] for i in idx],
            ds.image_size,
            train=train,
            workers=ds.workers,
            on_bad_image=ds.on_bad_image,
        )

    shape = (3, ds.image_size, ds.image_size)
    skipped = f"; {len(ds.skipped)} unreadable file(s) skipped" if ds.skipped else ""
    if split == "classes":
        train_cls, test_cls = ds.class_split
        if not train_cls or not test_cls:
            raise ImageDataError(
                f"{ds.name}: the class split ({ds.split_rule}) leaves "
                f"{len(train_cls)} training and {len(test_cls)} test classes"
            )
        tr = set(train_cls)
        idx_tr = [i for i in range(len(ds.labels)) if int(ds.labels[i]) in tr]
        idx_te = [i for i in range(len(ds.labels)) if int(ds.labels[i]) not in tr]
        return Protocol(
            "classes",
            source(idx_tr, True, train_cls),
            source(idx_te, False, test_cls),
            [ds.class_names[c] for c in train_cls],
            [ds.class_names[c] for c in test_cls],
            shape,
            f"class-disjoint: {ds.split_rule}: train on {len(idx_tr)} images of "
            f"{len(train_cls)} classes, retrieve among {len(idx_te)} images of "
            f"{len(test_cls)} unseen classes, test against test{skipped}",
        )
    rng = np.random.default_rng(seed)
    idx_tr, idx_te = [], []
    for c in range(ds.num_classes):
        members = rng.permutation(np.flatnonzero(ds.labels == c))
        if len(members) < 2:
            raise ImageDataError(
                f"{ds.name}: class {ds.class_names[c]!r} has {len(members)} image(s); "
                "--split samples needs >= 2 per class"
            )
        n_te = max(1, int(round(test_fraction * len(members))))
        idx_te += members[:n_te].tolist()
        idx_tr += members[n_te:].tolist()
    idx_tr.sort()
    idx_te.sort()
    every = list(range(ds.num_classes))
    return Protocol(
        "samples",
        source(idx_tr, True, every),
        source(idx_te, False, every),
        list(ds.class_names),
        list(ds.class_names),
        shape,
        f"closed set: {int(test_fraction * 100)} % of each class's images held out "
        f"(fixed seed; not a published split): train on {len(idx_tr)}, retrieve among "
        f"{len(idx_te)} images of the same {ds.num_classes} classes{skipped}",
    )
