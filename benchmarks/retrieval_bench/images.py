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

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .image_sources import ImageSource, verify_images
from .layouts import IMAGE_EXTENSIONS, LOADERS, CorruptImageError, ImageDataError
from .protocol import Protocol, class_partition
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataError",
    "CorruptImageError",
    "ImageDataset",
    "ImageSource",
    "load_image_dataset",
    "make_image_protocol",
    "TrainTransform",
    "EvalTransform",
]


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
    d = LOADERS[name](os.path.expanduser(data_dir) if data_dir else data_dir)
    paths, labels = d["paths"], np.asarray(d["labels"], dtype=np.int64)
    split_of = d.get("split_of")
    ok, skipped = verify_images(paths, on_bad_image)
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
