"""The glyph data set builder (benchmarks/glyphs/build.py) on a tiny configuration.

Built from whatever DejaVu (or other TrueType) fonts are installed; skipped, saying why,
only where no .ttf/.otf file exists at all. Nothing is downloaded.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLYPHS = os.path.join(ROOT, "benchmarks", "glyphs")
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, GLYPHS)
sys.path.insert(0, BENCH)

import glyph_fonts  # noqa: E402
import glyph_render  # noqa: E402


def _load(name, path):
    """A script as a module under a name of its own (``build`` and ``experiment`` are
    generic: PyPA's ``build`` may be installed)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


build = _load("glyphs_build", os.path.join(GLYPHS, "build.py"))


def _fonts():
    """Three fonts: DejaVu Sans, Serif and Mono (fonts-dejavu-core) where installed, else
    the first TrueType files found. Three keep the builds quick (reading a font's coverage
    takes about a second on a loaded machine)."""
    dejavu = "/usr/share/fonts/truetype/dejavu"
    want = [os.path.join(dejavu, f) for f in ("DejaVuSans.ttf", "DejaVuSerif.ttf")]
    want.append(os.path.join(dejavu, "DejaVuSansMono.ttf"))
    if all(os.path.isfile(f) for f in want):
        return want
    return sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))[:3]


FONTS = _fonts()
needs_fonts = pytest.mark.skipif(
    not FONTS, reason="no .ttf font installed (apt-get install fonts-dejavu-core)"
)
TINY = dict(classes=6, per_class=4, size=16, seed=3, min_fonts=2)


@pytest.fixture(scope="module")
def font_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fonts")
    for f in FONTS:
        os.symlink(f, d / os.path.basename(f))
    return str(d)


def _build(out, font_dir, **kw):
    return build.build(str(out), font_dirs=[font_dir], log=lambda *a: None, **{**TINY, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, font_dir):
    out = tmp_path_factory.mktemp("glyphs") / "set"
    idx = tmp_path_factory.mktemp("glyphs") / "idx"
    return out, idx, _build(out, font_dir, idx=str(idx))


def _files(root):
    return {
        os.path.relpath(p, root): open(p, "rb").read()
        for p in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True))
        if os.path.isfile(p)
    }


@needs_fonts
def test_same_command_same_bytes(tiny, tmp_path, font_dir):
    out, _, manifest = tiny
    again = _build(tmp_path / "again", font_dir, idx=str(tmp_path / "again-idx"))
    a, b = _files(out), _files(tmp_path / "again")
    assert a.keys() == b.keys() and len(a) == TINY["classes"] * TINY["per_class"] + 1
    assert a == b  # every image and the manifest, byte for byte
    assert _files(tiny[1]) == _files(tmp_path / "again-idx")
    other = _build(tmp_path / "seed4", font_dir, seed=4)
    assert other["images_sha256"] != again["images_sha256"]


@needs_fonts
def test_layout_is_what_the_retrieval_benchmark_reads(tiny):
    from retrieval_bench import images

    out, _, manifest = tiny
    ds = images.load_image_dataset("folder", str(out), image_size=16, workers=0)
    assert ds.class_names == [c["dir"] for c in manifest["classes"]]
    assert np.bincount(ds.labels).tolist() == [TINY["per_class"]] * TINY["classes"]
    train, test = ds.class_split
    assert len(train) == len(test) == TINY["classes"] // 2
    # the manifest's hash is the hash of the files on disk
    rel = [os.path.relpath(p, out) for p in ds.paths]
    assert build.images_sha256(str(out), rel) == manifest["images_sha256"]


@needs_fonts
def test_every_image_is_its_codepoint_in_a_font_that_has_it(tiny, font_dir):
    """Checked independently of the builder: each image's font maps the class's codepoint to
    a glyph (fontTools), and the image holds ink, white on black, at the requested size."""
    from fontTools.ttLib import TTFont
    from PIL import Image

    out, _, manifest = tiny
    fonts = manifest["fonts"]
    assert manifest["parameters"]["font_dirs"] == [font_dir] and len(fonts) == len(FONTS)
    for c in manifest["classes"]:
        cp = int(c["codepoint"][2:], 16)
        assert c["char"] == chr(cp) and len(c["images"]) == TINY["per_class"]
        used = {row[0] for row in c["images"]}
        assert len(used) >= min(TINY["min_fonts"], TINY["per_class"])  # fonts vary
        for i, row in enumerate(c["images"]):
            with TTFont(fonts[row[0]]["path"], lazy=True) as tt:
                assert tt.getBestCmap().get(cp) not in (None, ".notdef")
            im = Image.open(os.path.join(out, c["dir"], f"{i:03d}.png"))
            a = np.asarray(im)
            assert im.mode == "L" and a.shape == (TINY["size"], TINY["size"])
            assert a.max() >= 128 and np.median(a) == 0
    for f in fonts:
        assert f["sha256"] and f["licence"] and f["package"]


@needs_fonts
def test_idx_export_holds_the_same_images(tiny):
    from PIL import Image
    from retrieval_bench import idx as idx_io

    out, idx, manifest = tiny
    half = TINY["per_class"] // 2
    for name, lo in (("train", 0), ("t10k", half)):
        x = idx_io.read_idx(str(idx / f"{name}-images-idx3-ubyte"))
        y = idx_io.read_idx(str(idx / f"{name}-labels-idx1-ubyte"))
        assert x.shape == (TINY["classes"] * half, TINY["size"], TINY["size"])
        assert y.tolist() == np.repeat(np.arange(TINY["classes"]), half).tolist()
        k, c = 1, manifest["classes"][1]
        png = np.asarray(Image.open(os.path.join(out, c["dir"], f"{lo:03d}.png")))
        np.testing.assert_array_equal(x[k * half], png)


@needs_fonts
def test_notdef_blank_and_tiny_drawings_are_rejected():
    path = FONTS[0]
    font = glyph_render.load_font(path, 16, 4)
    notdef = build._clean(font, chr(glyph_render.NOTDEF_PROBE), 16, 4, None)
    assert build._clean(font, "\u0378", 16, 4, notdef) is None  # unassigned: .notdef
    assert build._clean(font, " ", 16, 4, notdef) is None  # blank
    assert build._clean(font, ".", 16, 4, notdef) is None  # a dot is not a class
    ok = build._clean(font, "W", 16, 4, notdef)
    assert ok is not None and ok.max() > 0.5


@needs_fonts
@given(tx=st.floats(-0.1, 0.1), ty=st.floats(-0.1, 0.1))
def test_translation_moves_the_ink_by_that_fraction(tx, ty):
    path = FONTS[0]
    font = glyph_render.load_font(path, 32, 4)

    def centre(p):
        a = glyph_render.ink(glyph_render.render(font, "H", 32, p, 4))
        r, c = np.indices(a.shape)
        return np.array([(a * c).sum(), (a * r).sum()]) / a.sum()

    moved = centre(glyph_render.Params(tx=tx, ty=ty)) - centre(glyph_render.Params())
    np.testing.assert_allclose(moved, [tx * 32, ty * 32], atol=0.1)


@needs_fonts
def test_rotation_turns_clockwise_on_screen():
    path = FONTS[0]
    font = glyph_render.load_font(path, 32, 4)
    up = glyph_render.ink(glyph_render.render(font, "L", 32, glyph_render.Params(), 4))
    turned = glyph_render.ink(
        glyph_render.render(font, "L", 32, glyph_render.Params(rotation_deg=90.0), 4)
    )
    cw = np.rot90(up, k=-1)
    assert np.abs(turned - cw).mean() < 0.5 * np.abs(turned - np.rot90(up, k=1)).mean()


def test_candidates_are_letters_digits_symbols_without_precomposed_forms():
    import unicodedata

    cands = build.candidate_codepoints()
    assert len(cands) > 1500
    assert ord("A") in cands and 0x0416 in cands and 0x1200 in cands  # Latin, Cyrillic, Ethiopic
    assert ord("é") not in cands and 0x0301 not in cands  # precomposed letter, combining mark
    for cp in cands:
        ch = chr(cp)
        assert unicodedata.category(ch) in build.CATEGORIES and not unicodedata.decomposition(ch)


def test_licence_comes_from_the_last_matching_debian_stanza(tmp_path):
    doc = tmp_path / "fonts-x"
    doc.mkdir()
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: someone\nLicense: GPL-3+\n\n"
        "Files: */*.ttf\nCopyright: someone\nLicense: GPL-3+ with font exception\n\n"
        "Files: Special.otf\nLicense: OFL-1.1\n\n"
        "Files: appstream/*\nLicense: CC-BY-4.0\n\n"
        "Files: debian/*\nLicense: GPL-2+\n"
    )
    lic = glyph_fonts.package_licence
    assert lic("fonts-x", "/usr/share/fonts/x/A.ttf", str(tmp_path)) == (
        "GPL-3+ with font exception"
    )
    assert lic("fonts-x", "/usr/share/fonts/x/Special.otf", str(tmp_path)) == "OFL-1.1"
    assert lic("fonts-x", "/usr/share/fonts/x/B.otf", str(tmp_path)) == "GPL-3+"
    assert lic("fonts-y", "/a/B.otf", str(tmp_path)).startswith("unknown")


def _cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(GLYPHS, "build.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_missing_packages_are_named_and_exit_2(tmp_path):
    r = _cli("--out", str(tmp_path / "o"), "--packages", "fonts-dejavu-core,fonts-no-such-thing")
    assert r.returncode == 2, r.stderr
    assert "fonts-no-such-thing" in r.stderr and "apt-get install" in r.stderr
    assert "fonts-dejavu-core," not in r.stderr.split("apt-get install")[1]
    r = _cli("--out", str(tmp_path / "o"), "--font-dir", str(tmp_path))
    assert r.returncode == 2 and "no .ttf/.otf font files under" in r.stderr
    assert not os.path.exists(tmp_path / "o")


@needs_fonts
def test_cli_builds_and_refuses_too_many_classes(tmp_path, font_dir):
    r = _cli(
        "--out", str(tmp_path / "ok"), "--font-dir", font_dir,
        "--classes", "4", "--per-class", "2", "--size", "12", "--min-fonts", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.load(open(tmp_path / "ok" / "manifest.json"))
    assert len(m["classes"]) == 4 and len(glob.glob(str(tmp_path / "ok" / "*" / "*.png"))) == 8
    r = _cli("--out", str(tmp_path / "ok"), "--font-dir", font_dir, "--classes", "4")
    assert r.returncode == 2 and "not empty" in r.stderr
    r = _cli(
        "--out",
        str(tmp_path / "many"),
        "--font-dir",
        font_dir,
        "--classes",
        "4",
        "--per-class",
        "2",
        "--min-fonts",
        str(len(FONTS) + 1),
    )  # fmt: skip  (no codepoint is drawn by more fonts than there are)
    assert r.returncode != 0 and "only 0 classes" in r.stderr
    assert "lower --classes or --min-fonts" in r.stderr


@needs_fonts
def test_keyboard_font_is_left_out(tmp_path):
    os.symlink(FONTS[0], tmp_path / "LinBiolinum_K.ttf")  # named like the key-cap font
    with pytest.raises(glyph_fonts.MissingFontsError, match="no .ttf/.otf font files"):
        glyph_fonts.directory_fonts([str(tmp_path)])
    os.symlink(FONTS[0], tmp_path / "Plain.ttf")
    assert [os.path.basename(f.path) for f in glyph_fonts.directory_fonts([str(tmp_path)])] == [
        "Plain.ttf"
    ]


def test_t_interval_by_hand():
    experiment = _load(
        "glyphs_experiment", os.path.join(BENCH, "results", "glyphs", "experiment.py")
    )

    mean, half = experiment.t_interval([0.1, 0.2, 0.3])
    # sd 0.1, n 3, t(0.975, df 2) = 4.302653
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.302653 * 0.1 / 3**0.5, 1e-6)
    assert np.isnan(experiment.t_interval([0.5])[1])


@needs_fonts
def test_experiment_script_scores_baselines_on_the_unseen_classes(tiny, tmp_path):
    """The results script, run on the tiny build's IDX export: baselines and one loss on the
    class-disjoint split; the raw-pixel row equals a direct computation."""
    import torch
    from retrieval_bench import evaluation
    from retrieval_bench import idx as idx_io

    experiment = _load(
        "glyphs_experiment", os.path.join(BENCH, "results", "glyphs", "experiment.py")
    )

    _, idx, _ = tiny
    out = tmp_path / "exp"
    argv = ["--out", str(out), "--seeds", "0,1", "--dataset", "idx", "--data-dir", str(idx)]
    argv += ["--split", "classes", "--losses", "ArcFaceLoss", "--epochs", "1"]
    argv += ["--batch-size", "6", "--no-progress", "--knn", "torch"]
    assert experiment.main(argv) == 0
    res = json.load(open(out / "results.json"))
    assert (out / "results.md").read_text().count("*(baseline)*") == 3
    methods = {(r["method"], r["seed"]) for r in res["runs"] if r.get("metrics_l2")}
    for m in ("raw pixels", "raw input", "untrained mlp", "ArcFaceLoss"):
        assert {(m, 0), (m, 1)} <= methods
    # raw pixels: the t10k images of the unseen (second-half) classes, flattened, normalised
    x = idx_io.read_idx(str(idx / "t10k-images-idx3-ubyte")).astype(np.float32) / 255
    y = idx_io.read_idx(str(idx / "t10k-labels-idx1-ubyte"))
    keep = y >= TINY["classes"] // 2
    want = evaluation.retrieval_metrics(
        torch.nn.functional.normalize(torch.as_tensor(x[keep]).flatten(1), dim=1), y[keep]
    )
    got = next(r for r in res["runs"] if r["method"] == "raw pixels")["metrics_l2"]
    for k, v in got.items():
        assert v == pytest.approx(want[k])
    assert res["protocol"]["num_test_classes"] == TINY["classes"] // 2


HOMOGLYPHS = ["AΑА", "BΒВ", "EΕЕ", "HΗН", "KΚК", "MΜМ", "OΟО", "PΡР", "TΤТ", "XΧХ", "oοо"]
HOMOGLYPHS += ["pр", "cс", "eе", "xх", "aа", "IΙІ", "JЈ", "SЅ", "iі", "jј", "sѕ"]


@needs_fonts
def test_look_alikes_across_scripts_become_one_class(tmp_path, font_dir):
    """Latin A, Greek Alpha and Cyrillic A are drawn alike: at most one of each such set is a
    class, and the manifest lists the ones left out."""
    m = _build(tmp_path / "la", font_dir, classes=250, per_class=2, size=12, min_fonts=3)
    chars = {c["char"] for c in m["classes"]}
    for group in HOMOGLYPHS:
        assert len(chars & set(group)) <= 1, group
    assert m["rejected"]["look-alike of an accepted class"] == len(m["lookalikes"]) > 0
