"""Tiny image datasets in the published layouts (folder, CUB-200-2011, Cars196, SOP), written
as real PNG/JPEG files, for the retrieval benchmark's tests. Each class has its own colour
pattern, so a model can learn something from a few images."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np


def write_image(path: str, class_index: int, k: int, size=(24, 20), fmt=None) -> str:
    from PIL import Image

    rng = np.random.default_rng(1000 * class_index + k)
    w, h = size
    base = np.array([(37 * class_index) % 256, (91 * class_index) % 256, (151 * class_index) % 256])
    img = base + rng.integers(-30, 30, size=(h, w, 3))
    img[:, : w // (2 + class_index % 3)] = 255 - base  # a class-dependent stripe
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format=fmt)
    return path


def write_corrupt(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a JPEG" + bytes(range(50)))
    return path


def make_folder(root: str, classes: Sequence[str], per_class: int, size=(24, 20)) -> List[str]:
    paths = []
    for c, name in enumerate(classes):
        for k in range(per_class):
            ext = ".png" if k % 2 else ".jpg"
            paths.append(write_image(os.path.join(root, name, f"img_{k}{ext}"), c, k, size))
    return paths


def make_cub(root: str, class_ids: Sequence[int], per_class: int) -> Dict[str, object]:
    """CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, train_test_split.txt,
    images/NNN.Name/Name_k.jpg} with the given class ids (1-based)."""
    base = os.path.join(root, "CUB_200_2011")
    images, labels, classes, split = [], [], [], []
    n = 0
    for cid in class_ids:
        name = f"{cid:03d}.Bird_{cid}"
        classes.append(f"{cid} {name}")
        for k in range(per_class):
            n += 1
            rel = f"{name}/Bird_{cid}_{k:04d}.jpg"
            write_image(os.path.join(base, "images", rel), cid, k)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {cid}")
            split.append(f"{n} {k % 2}")
    for fname, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("classes.txt", classes),
        ("train_test_split.txt", split),
    ):
        with open(os.path.join(base, fname), "w") as f:
            f.write("\n".join(lines) + "\n")
    return {"root": base, "n": n}


def make_cars(root: str, class_ids: Sequence[int], per_class: int) -> Dict[str, object]:
    """cars_annos.mat (struct array: relative_im_path, bbox_*, class, test) + car_ims/."""
    from scipy.io import savemat

    dtype = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    rows = []
    n = 0
    for cid in class_ids:
        for k in range(per_class):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            write_image(os.path.join(root, rel), cid, k)
            rows.append((rel, 1, 1, 20, 18, cid, k % 2))
    ann = np.array(rows, dtype=dtype).reshape(1, -1)
    names = np.array([f"Car model {c}" for c in range(1, max(class_ids) + 1)], dtype=object)
    savemat(os.path.join(root, "cars_annos.mat"), {"annotations": ann, "class_names": names})
    return {"root": root, "n": n}


def make_sop(root: str, train_ids: Sequence[int], test_ids: Sequence[int], per_class: int):
    base = os.path.join(root, "Stanford_Online_Products")
    n = 0
    for split, ids in (("train", train_ids), ("test", test_ids)):
        lines = ["image_id class_id super_class_id path"]
        for cid in ids:
            for k in range(per_class):
                n += 1
                rel = f"bicycle_final/{cid}_{k}.JPG"
                write_image(os.path.join(base, rel), cid, k, fmt="JPEG")
                lines.append(f"{n} {cid} 1 {rel}")
        with open(os.path.join(base, f"Ebay_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return {"root": base, "n": n}
