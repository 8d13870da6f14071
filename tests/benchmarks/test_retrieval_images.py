"""Image datasets of the retrieval benchmark read from disk: folder, CUB-200-2011, Cars196 and
SOP in their published layouts (tiny generated PNG/JPEG fixtures), their class-disjoint
splits, bad files and empty classes, the transforms and the DataLoader path."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)

import retrieval  # noqa: E402
from _retrieval_fixtures import (  # noqa: E402
    make_cars,
    make_cub,
    make_folder,
    make_sop,
    write_corrupt,
    write_image,
)
from retrieval_bench import data, images  # noqa: E402
from retrieval_bench.data import DatasetNotFoundError  # noqa: E402
from retrieval_bench.images import (  # noqa: E402
    CorruptImageError,
    EvalTransform,
    ImageDataError,
    TrainTransform,
    load_image_dataset,
)


def _names(source):
    return sorted({os.path.basename(os.path.dirname(p)) for p in source.paths})


# ------------------------------------------------------------------------------------------
# readers and their standard splits
# ------------------------------------------------------------------------------------------


def test_folder_reader_and_class_split(tmp_path):
    make_folder(str(tmp_path), ["cat", "ant", "dog", "bee"], per_class=3)
    (tmp_path / "ant" / "notes.txt").write_text("not an image, ignored")
    ds = load_image_dataset("folder", str(tmp_path), image_size=16, workers=0)
    assert ds.class_names == ["ant", "bee", "cat", "dog"]  # sorted
    assert len(ds.paths) == 12 and np.bincount(ds.labels).tolist() == [3, 3, 3, 3]
    p = data.make_protocol(ds, "classes")
    assert p.train_classes == ["ant", "bee"] and p.test_classes == ["cat", "dog"]
    assert _names(p.train) == ["ant", "bee"] and _names(p.test) == ["cat", "dog"]
    assert sorted(set(p.train.labels)) == [0, 1] and sorted(set(p.test.labels)) == [0, 1]
    assert not p.classification and p.num_classes == 2
    s = data.make_protocol(ds, "samples")
    assert s.classification and s.num_classes == 4
    assert len(s.train) + len(s.test) == 12 and not set(s.train.paths) & set(s.test.paths)
    assert np.bincount(s.test.labels).tolist() == [1, 1, 1, 1]  # 30 % of 3, per class


def test_cub_reader_standard_split(tmp_path):
    info = make_cub(str(tmp_path), [1, 2, 100, 101, 150, 200], per_class=2)
    for d in (str(tmp_path), info["root"]):  # the parent or CUB_200_2011 itself
        ds = load_image_dataset("cub200", d, workers=0)
        assert len(ds.paths) == 12
    p = data.make_protocol(ds, "classes")
    assert p.train_classes == ["001.Bird_1", "002.Bird_2", "100.Bird_100"]
    assert p.test_classes == ["101.Bird_101", "150.Bird_150", "200.Bird_200"]
    assert all("/images/1" in q or "/images/2" in q for q in p.test.paths)
    assert len(p.train) == 6 and len(p.test) == 6


def test_cub_class_without_images_is_an_error(tmp_path):
    info = make_cub(str(tmp_path), [1, 101], per_class=2)
    with open(os.path.join(info["root"], "classes.txt"), "a") as f:
        f.write("7 007.Empty_bird\n")
    with pytest.raises(ImageDataError, match="007.Empty_bird"):
        load_image_dataset("cub200", str(tmp_path), workers=0)


def test_cars_reader_standard_split(tmp_path):
    make_cars(str(tmp_path), [1, 98, 99, 196], per_class=2)
    ds = load_image_dataset("cars196", str(tmp_path), workers=0)
    assert len(ds.paths) == 8
    p = data.make_protocol(ds, "classes")
    assert p.train_classes == ["Car model 1", "Car model 98"]
    assert p.test_classes == ["Car model 99", "Car model 196"]
    assert len(p.train) == 4 and len(p.test) == 4


def test_sop_reader_uses_its_lists(tmp_path):
    info = make_sop(str(tmp_path), train_ids=[1, 2, 3], test_ids=[11319, 11320], per_class=2)
    ds = load_image_dataset("sop", str(tmp_path), workers=0)
    p = data.make_protocol(ds, "classes")
    assert p.train_classes == ["1", "2", "3"] and p.test_classes == ["11319", "11320"]
    assert len(p.train) == 6 and len(p.test) == 4
    # the published lists are class-disjoint; a class in both is an error
    with open(os.path.join(info["root"], "Ebay_test.txt"), "a") as f:
        f.write("99 1 1 bicycle_final/1_0.JPG\n")
    with pytest.raises(ImageDataError, match="both Ebay_train.txt and Ebay_test.txt"):
        load_image_dataset("sop", str(tmp_path), workers=0)


# ------------------------------------------------------------------------------------------
# errors: missing directory, corrupt image (stop / skip), empty class
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["folder", "cub200", "cars196", "sop"])
def test_missing_directory(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match="does not exist|not found"):
        load_image_dataset(name, str(tmp_path / "nowhere"), workers=0)
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_image_dataset(name, None, workers=0)


def test_missing_directory_from_the_command_line(tmp_path):
    with pytest.raises(SystemExit) as ei:
        retrieval.main(["--dataset", "cub200", "--data-dir", str(tmp_path / "x"), "--out", "o"])
    assert "does not exist" in str(ei.value.code) and "Traceback" not in str(ei.value.code)


def test_corrupt_image_stops_naming_the_file(tmp_path):
    make_folder(str(tmp_path), ["a", "b", "c", "d"], per_class=3)
    bad = write_corrupt(str(tmp_path / "c" / "broken.jpg"))
    with pytest.raises(CorruptImageError, match="broken.jpg") as ei:
        load_image_dataset("folder", str(tmp_path), workers=0)
    assert bad in str(ei.value) and "--on-bad-image skip" in str(ei.value)
    with pytest.raises(SystemExit) as ei:
        retrieval.main(["--dataset", "folder", "--data-dir", str(tmp_path), "--out", "o"])
    assert "broken.jpg" in str(ei.value.code)


def test_corrupt_image_skipped_on_request(tmp_path, capsys):
    make_folder(str(tmp_path), ["a", "b", "c", "d"], per_class=3)
    bad = write_corrupt(str(tmp_path / "c" / "broken.jpg"))
    ds = load_image_dataset("folder", str(tmp_path), workers=0, on_bad_image="skip")
    assert bad not in ds.paths and len(ds.paths) == 12
    assert [p for p, _ in ds.skipped] == [bad]
    assert "broken.jpg" in capsys.readouterr().err


def test_class_left_empty_by_skipping_is_an_error(tmp_path):
    make_folder(str(tmp_path), ["a", "b", "c"], per_class=2)
    write_corrupt(str(tmp_path / "d" / "only.png"))
    with pytest.raises(ImageDataError, match=r"\['d'\].*after skipping 1"):
        load_image_dataset("folder", str(tmp_path), workers=0, on_bad_image="skip")


def test_empty_class_folder(tmp_path):
    make_folder(str(tmp_path), ["a", "b", "c"], per_class=2)
    os.makedirs(tmp_path / "empty_class")
    with pytest.raises(ImageDataError, match="'empty_class'.*no image files"):
        load_image_dataset("folder", str(tmp_path), workers=0)


def test_missing_listed_file(tmp_path):
    info = make_cub(str(tmp_path), [1, 101], per_class=2)
    gone = os.path.join(info["root"], "images", "101.Bird_101", "Bird_101_0001.jpg")
    os.remove(gone)
    with pytest.raises(CorruptImageError, match="Bird_101_0001.jpg: file not found"):
        load_image_dataset("cub200", str(tmp_path), workers=0)


def test_image_breaking_after_the_check(tmp_path):
    """A file that passes the check but fails to decode: stop names it, skip substitutes
    another image of the same class."""
    make_folder(str(tmp_path), ["a", "b"], per_class=3)
    ds = load_image_dataset("folder", str(tmp_path), image_size=8, workers=0)
    write_corrupt(ds.paths[0])  # now unreadable
    stop = images.ImageSource(ds.paths, ds.labels, 8, train=False, on_bad_image="stop")
    with pytest.raises(CorruptImageError, match=os.path.basename(ds.paths[0])):
        stop.files[0]
    skip = images.ImageSource(ds.paths, ds.labels, 8, train=False, on_bad_image="skip")
    x, y = skip.files[0]
    torch.testing.assert_close(x, skip.files[1][0])  # the next image of class 0
    assert y == 0


# ------------------------------------------------------------------------------------------
# transforms and loaders
# ------------------------------------------------------------------------------------------


def _gradient_image(w, h):
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(a), a


def _normalised(a):
    mean = np.array(images.IMAGENET_MEAN)[:, None, None]
    std = np.array(images.IMAGENET_STD)[:, None, None]
    return (a.transpose(2, 0, 1) / 255.0 - mean) / std


def test_test_transform_is_resize_then_center_crop():
    # already at the resize size (224 -> 256): the transform is a pure center crop
    img, a = _gradient_image(256, 300)
    out = EvalTransform(224)(img)
    assert out.shape == (3, 224, 224)
    top, left = (300 - 224) // 2, (256 - 224) // 2
    expected = _normalised(a[top : top + 224, left : left + 224].astype(np.float64))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_train_transform_crops_within_bounds_and_flips():
    t = TrainTransform(16, resize=False)  # the crop alone; the resize is tested below
    torch.manual_seed(0)
    for w, h in [(40, 30), (17, 90), (300, 20), (16, 16)]:
        for _ in range(50):
            left, top, right, bottom = t.crop_box(w, h)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
            r = (right - left) / (bottom - top)
            area = (right - left) * (bottom - top) / (w * h)
            assert area <= 1.0 + 1e-9 and (3 / 4 - 0.2 < r < 4 / 3 + 0.2 or area > 0.9)
    img, _ = _gradient_image(40, 30)
    torch.manual_seed(1)
    a = t(img)
    torch.manual_seed(1)
    b = t(img)
    assert a.shape == (3, 16, 16) and torch.equal(a, b)  # driven by torch's RNG
    flips = set()
    for s in range(20):
        torch.manual_seed(s)
        box = t.crop_box(40, 30)
        flip = float(torch.rand(1)) < 0.5
        torch.manual_seed(s)
        out = t(img)
        ref = img.resize((16, 16), images_pil_bilinear(), box=box)
        ref = np.asarray(ref)[:, ::-1] if flip else np.asarray(ref)
        np.testing.assert_allclose(out.numpy(), _normalised(ref.astype(np.float64)), atol=1e-5)
        flips.add(flip)
    assert flips == {True, False}


def test_train_transform_resizes_then_crops_at_the_reality_check_scale():
    from PIL import Image

    t = TrainTransform(16)
    assert t.scale == (0.16, 1.0) and t.resize == round(16 * 256 / 224)
    img, _ = _gradient_image(40, 30)  # shorter side 30 -> 18: 24 x 18
    resized = img.resize((24, 18), Image.BILINEAR)
    for s in range(10):
        g = torch.Generator().manual_seed(s)
        box = t.crop_box(24, 18, generator=g)
        flip = float(torch.rand(1, generator=g)) < 0.5
        out = t(img, generator=torch.Generator().manual_seed(s))
        ref = np.asarray(resized.resize((16, 16), Image.BILINEAR, box=box))
        ref = ref[:, ::-1] if flip else ref
        np.testing.assert_allclose(out.numpy(), _normalised(ref.astype(np.float64)), atol=1e-5)
    # a generator of its own: the global RNG is neither used nor consumed
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = t(img, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)
    assert torch.equal(a, t(img, generator=torch.Generator().manual_seed(5)))


def images_pil_bilinear():
    from PIL import Image

    return Image.BILINEAR


def test_loader_with_workers_matches_in_process(tmp_path):
    make_folder(str(tmp_path), ["a", "b", "c"], per_class=4)
    ds = load_image_dataset("folder", str(tmp_path), image_size=12, workers=0)
    dev = torch.device("cpu")
    one = images.ImageSource(ds.paths, ds.labels, 12, train=False, workers=0)
    two = images.ImageSource(ds.paths, ds.labels, 12, train=False, workers=2)
    a = torch.cat(list(one.eval_batches(5, dev)))
    b = torch.cat(list(two.eval_batches(5, dev)))
    assert a.shape == (12, 3, 12, 12) and torch.equal(a, b)
    train = images.ImageSource(ds.paths, ds.labels, 12, train=True, workers=2)
    idx = torch.tensor([[0, 1, 4, 5], [8, 9, 2, 3]])
    got = list(train.train_batches(idx, dev))
    assert [y.tolist() for _, y in got] == [[0, 0, 1, 1], [2, 2, 0, 0]]
    assert all(x.shape == (4, 3, 12, 12) for x, _ in got)


def test_jpeg_and_png_and_grey_images_all_load_as_rgb(tmp_path):
    from PIL import Image

    write_image(str(tmp_path / "a" / "x.png"), 0, 0)
    write_image(str(tmp_path / "a" / "y.jpg"), 0, 1)
    os.makedirs(tmp_path / "b")
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(tmp_path / "b" / "grey.png")
    write_image(str(tmp_path / "b" / "z.bmp"), 1, 0)
    ds = load_image_dataset("folder", str(tmp_path), image_size=8, workers=0)
    src = images.ImageSource(ds.paths, ds.labels, 8, train=False, workers=0)
    x = torch.cat(list(src.eval_batches(8, torch.device("cpu"))))
    assert x.shape == (4, 3, 8, 8) and torch.isfinite(x).all()


def test_our_crop_draws_as_torchvisions_random_resized_crop():
    """Our crop follows torchvision's RandomResizedCrop.get_params draw for draw (same
    seed, same box). Ours is used even where torchvision imports, because each sample's
    draws must come from its own generator; torchvision's reads the global RNG. Skipped
    where torchvision does not import (PyPI's build beside a CPU torch it was not made for)."""
    from retrieval_bench.models import import_torchvision

    tv = import_torchvision()
    if tv is None:
        pytest.skip("torchvision does not import here")
    from torchvision.transforms import RandomResizedCrop

    img, _ = _gradient_image(40, 30)
    ours = TrainTransform(16, resize=False)
    for s in range(30):
        torch.manual_seed(s)
        i, j, h, w = RandomResizedCrop.get_params(img, scale=ours.scale, ratio=ours.ratio)
        box = ours.crop_box(40, 30, generator=torch.Generator().manual_seed(s))
        assert box == (j, i, j + w, i + h), s
