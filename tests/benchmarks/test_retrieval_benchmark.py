"""Tests for benchmarks/retrieval.py (benchmarks/retrieval_bench/): IDX reader, in-memory
protocols, k-NN evaluation, loss specs and end-to-end runs on digits."""

from __future__ import annotations

import gzip
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)

import retrieval  # noqa: E402
from retrieval_bench import data as _data  # noqa: E402
from retrieval_bench import evaluation as ev  # noqa: E402
from retrieval_bench import losses as bl  # noqa: E402
from retrieval_bench import training  # noqa: E402
from retrieval_bench.data import DatasetNotFoundError, load_idx_dataset  # noqa: E402
from retrieval_bench.env import _try_import_faiss  # noqa: E402
from retrieval_bench.idx import IDXError, read_idx, write_idx  # noqa: E402


def _has_faiss():
    return _try_import_faiss() is not None


KNN_BACKENDS = ["torch"] + (["faiss"] if _has_faiss() else [])


# ------------------------------------------------------------------------------------------
# IDX reader
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([5, 0, 9, 255], dtype=np.uint8),
        np.array([[-1.5, 2.25], [3.0, 1e-3]], dtype=np.float32),
        np.array([-300, 7, 32000], dtype=np.int16),
        np.array([[1 << 30, -5]], dtype=np.int32),
        np.array([1.0, -2.0], dtype=np.float64),
        np.array([-128, 127], dtype=np.int8),
    ],
    ids=["u8-3d", "u8-1d", "f32", "i16", "i32", "f64", "i8"],
)
def test_idx_round_trip(tmp_path, array, suffix):
    path = str(tmp_path / ("a.idx" + suffix))
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    with open(path, "rb") as f:
        raw = f.read()
    if suffix == ".gz":
        raw = gzip.decompress(raw)
    # header is big-endian: 0 0 code ndim, then dims
    assert raw[:2] == b"\x00\x00" and raw[3] == array.ndim
    assert int.from_bytes(raw[4:8], "big") == array.shape[0]


def test_idx_reads_known_bytes(tmp_path):
    # hand-written file: int16 (0x0B), 1-D, 2 items, big-endian 0x0102 and 0xFFFE (-2)
    raw = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE])
    p = tmp_path / "k.idx"
    p.write_bytes(raw)
    np.testing.assert_array_equal(read_idx(str(p)), np.array([258, -2], dtype=np.int16))


def _write_raw(tmp_path, raw: bytes, name="x.idx", compress=False):
    p = tmp_path / name
    p.write_bytes(gzip.compress(raw) if compress else raw)
    return str(p)


def _good_header(n=2, h=3, w=4):
    return bytes([0, 0, 0x08, 3]) + np.array([n, h, w], dtype=">u4").tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_wrong_magic(tmp_path, compress):
    raw = bytes([0x1A, 0x2B, 0x08, 1]) + np.array([3], ">u4").tobytes() + b"abc"
    with pytest.raises(IDXError, match="magic"):
        read_idx(_write_raw(tmp_path, raw, compress=compress))


def test_idx_unknown_dtype_code(tmp_path):
    raw = bytes([0, 0, 0x07, 1]) + np.array([3], ">u4").tobytes() + b"abc"
    with pytest.raises(IDXError, match="data type code 0x07"):
        read_idx(_write_raw(tmp_path, raw))


def test_idx_zero_ndim(tmp_path):
    with pytest.raises(IDXError, match="number of dimensions 0"):
        read_idx(_write_raw(tmp_path, bytes([0, 0, 0x08, 0]) + b"xyz"))


def test_idx_too_short(tmp_path):
    with pytest.raises(IDXError, match="too short"):
        read_idx(_write_raw(tmp_path, b"\x00\x00"))


def test_idx_truncated_header(tmp_path):
    # says 3 dims but only one dim follows
    raw = bytes([0, 0, 0x08, 3]) + np.array([2], ">u4").tobytes()
    with pytest.raises(IDXError, match="header truncated"):
        read_idx(_write_raw(tmp_path, raw))


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated_data(tmp_path, compress):
    raw = _good_header() + bytes(2 * 3 * 4 - 5)
    name = "t.idx.gz" if compress else "t.idx"
    with pytest.raises(IDXError, match="data truncated"):
        read_idx(_write_raw(tmp_path, raw, name=name, compress=compress))


def test_idx_trailing_bytes(tmp_path):
    raw = _good_header() + bytes(2 * 3 * 4 + 3)
    with pytest.raises(IDXError, match="trailing"):
        read_idx(_write_raw(tmp_path, raw))


def test_idx_corrupt_gzip(tmp_path):
    gz = gzip.compress(_good_header() + bytes(range(24)))
    p = tmp_path / "c.idx.gz"
    p.write_bytes(gz[: len(gz) // 2])  # truncated gzip stream
    with pytest.raises(IDXError, match="gzip"):
        read_idx(str(p))
    q = tmp_path / "d.idx.gz"
    q.write_bytes(_good_header() + bytes(24))  # named .gz, not compressed
    with pytest.raises(IDXError, match="not gzip"):
        read_idx(str(q))


def _write_idx_dataset(d, n_train=30, n_test=20, hw=28, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            os.path.join(d, f"{split}-images-idx3-ubyte.gz"),
            rng.integers(0, 256, size=(n, hw, hw), dtype=np.uint8),
        )
        write_idx(
            os.path.join(d, f"{split}-labels-idx1-ubyte.gz"),
            (np.arange(n) % n_classes).astype(np.uint8),
        )


def test_load_idx_dataset(tmp_path):
    _write_idx_dataset(str(tmp_path), n_train=30, n_test=20, hw=12)
    ds = load_idx_dataset(str(tmp_path), name="idx")
    assert ds.x_train.shape == (30, 1, 12, 12) and ds.x_test.shape == (20, 1, 12, 12)
    assert ds.x_train.dtype == np.float32
    assert ds.num_classes == 3
    np.testing.assert_array_equal(ds.y_test, np.arange(20) % 3)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0  # uint8 / 255
    # the closed-set protocol standardises with its training images' statistics
    p = _data.make_protocol(ds, "samples")
    xtr = p.train.x.numpy()
    assert abs(float(xtr.mean())) < 1e-4 and abs(float(xtr.std()) - 1) < 1e-3


def test_load_idx_dataset_mismatched_counts(tmp_path):
    _write_idx_dataset(str(tmp_path), hw=8)
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.zeros(7, np.uint8))
    with pytest.raises(IDXError, match="20 images but 7 labels"):
        load_idx_dataset(str(tmp_path))


def test_load_idx_dataset_wrong_rank(tmp_path):
    _write_idx_dataset(str(tmp_path), hw=8)
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), np.zeros((30, 64), np.uint8))
    with pytest.raises(IDXError, match="3 dimensions"):
        load_idx_dataset(str(tmp_path))


def test_missing_files_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as ei:
        _data.load_dataset("fashion-mnist", str(tmp_path))
    msg = str(ei.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "train-images-idx3-ubyte" in msg


def test_main_missing_files_is_clean_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        retrieval.main(
            ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path)]
        )
    assert "dataset-fashion-mnist" in str(ei.value.code)


def test_main_corrupt_file_is_clean_error(tmp_path):
    _write_idx_dataset(str(tmp_path / "d"), hw=8)
    p = tmp_path / "d" / "train-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(bytes([8, 0, 8, 1, 0, 0, 0, 30]) + bytes(30)))
    with pytest.raises(SystemExit) as ei:
        retrieval.main(["--dataset", "idx", "--data-dir", str(tmp_path / "d"), "--out", "x"])
    assert "magic" in str(ei.value.code)


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------


def _knn(backend):
    return ev.select_knn(torch.device("cpu"), backend)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_separated_clusters_are_perfect(backend):
    rng = np.random.default_rng(0)
    centers = np.eye(5, 8, dtype=np.float32) * 10
    labels = np.repeat(np.arange(5), 12)
    emb = centers[labels] + 0.1 * rng.standard_normal((60, 8)).astype(np.float32)
    knn, dev, _ = _knn(backend)
    m = ev.retrieval_metrics(emb, labels, knn=knn, device=dev)
    assert m == {"precision_at_1": 1.0, "r_precision": 1.0, "mean_average_precision_at_r": 1.0}


# 1-D points, two classes of 3 (R = 2 for every query, leave-one-out):
#   a: 0.0, 0.9, 2.9     b: 2.0, 3.5, 5.2
# query  neighbours (nearest first)   P@1  R-prec  AP@R
#  0.0   a0.9 b2.0 ...                 1    1/2     1/2
#  0.9   a0.0 b2.0 ...                 1    1/2     1/2
#  2.9   b3.5 b2.0 ...                 0    0       0
#  2.0   a2.9 a0.9 ...                 0    0       0
#  3.5   a2.9 b2.0 b5.2                0    1/2     (0 + 1/2)/2 = 1/4
#  5.2   b3.5 a2.9 ...                 1    1/2     1/2
# means: P@1 = 3/6, R-precision = 2/6, MAP@R = 1.75/6
HAND_EMB = np.array([[0.0], [0.9], [2.9], [2.0], [3.5], [5.2]], dtype=np.float32)
HAND_LABELS = np.array([0, 0, 0, 1, 1, 1])
HAND_EXPECTED = {
    "precision_at_1": 0.5,
    "r_precision": 1 / 3,
    "mean_average_precision_at_r": 1.75 / 6,
}


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_hand_computed_metrics(backend):
    knn, dev, _ = _knn(backend)
    emb = np.concatenate([HAND_EMB, np.zeros_like(HAND_EMB)], axis=1)  # 2-D for faiss
    m = ev.retrieval_metrics(emb, HAND_LABELS, knn=knn, device=dev)
    for k, v in HAND_EXPECTED.items():
        assert m[k] == pytest.approx(v, abs=1e-6), k


def test_labels_are_remapped():
    # huge, non-contiguous ids collide once cast to float32 (16777217 -> 16777216)
    labels = np.where(HAND_LABELS == 0, 16777216, 16777217).astype(np.int64)
    assert len(np.unique(labels.astype(np.float32))) == 1
    np.testing.assert_array_equal(ev.remap_labels(labels), HAND_LABELS)
    knn, dev, _ = _knn("torch")
    emb = np.concatenate([HAND_EMB, np.zeros_like(HAND_EMB)], axis=1)
    m = ev.retrieval_metrics(emb, labels, knn=knn, device=dev)
    assert m["precision_at_1"] == pytest.approx(0.5)


def test_normalize_uses_angles():
    # same direction, very different norms: L2 says wrong class, cosine says right class
    emb = np.array([[1, 0], [50, 0.1], [0, 1], [0.1, 50]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    knn, dev, _ = _knn("torch")
    raw = ev.retrieval_metrics(emb, labels, knn=knn, device=dev)
    cos = ev.retrieval_metrics(emb, labels, knn=knn, device=dev, normalize=True)
    assert raw["precision_at_1"] == 0.5 and cos["precision_at_1"] == 1.0


def test_knn_selection_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    knn, dev, name = ev.select_knn(torch.device("cpu"))
    assert name == "pml-customknn" and dev.type == "cpu"
    m = ev.retrieval_metrics(
        np.concatenate([HAND_EMB, HAND_EMB * 0], 1), HAND_LABELS, knn=knn, device=dev
    )
    assert m["r_precision"] == pytest.approx(1 / 3)
    with pytest.raises(SystemExit, match="faiss"):
        ev.select_knn(torch.device("cpu"), "faiss")


@pytest.mark.skipif(not _has_faiss(), reason="faiss not installed")
def test_knn_selection_with_faiss_on_cpu():
    _, dev, name = ev.select_knn(torch.device("cpu"))
    assert name == "faiss-cpu" and dev.type == "cpu"


def test_classification_accuracy():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [3.0, 2.0]])
    assert ev.classification_accuracy(logits, np.array([1, 0, 0, 1])) == 0.5


def test_parse_losses():
    assert bl.parse_losses("all") == list(bl.LOSSES)
    assert bl.parse_losses("xent, Triplet,softmax") == ["Softmax", "TripletMarginLoss"]
    ours = bl.parse_losses("ours")
    assert ours == [n for n, v in bl.LOSSES.items() if v.source == "ours"] and len(ours) == 4
    assert len(bl.parse_losses("pml")) == 6
    with pytest.raises(SystemExit, match="unknown loss"):
        bl.parse_losses("softmax,nope")


def test_choose_m_per_class():
    for bs, c in [(128, 10), (256, 10), (64, 100), (30, 4)]:
        m = training.choose_m_per_class(bs, c)
        assert bs % m == 0 and m * c >= bs


def test_help(capsys):
    with pytest.raises(SystemExit) as ei:
        retrieval.main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--embedding-dim", "--losses", "--data-dir", "--device", "--seed", "--out"):
        assert opt in out


# ------------------------------------------------------------------------------------------
# end-to-end
# ------------------------------------------------------------------------------------------


def _run(tmp_path, *extra, name="out"):
    out = str(tmp_path / name)
    res = retrieval.main(["--epochs", "1", "--no-progress", "--out", out, *extra])
    return res, out


def test_smoke_all_losses_digits(tmp_path, capsys):
    res, out = _run(tmp_path, "--losses", "all", "--no-plots", "--split", "samples")
    printed = capsys.readouterr().out
    assert [r["loss"] for r in res["losses"]] == list(bl.LOSSES)
    for r in res["losses"]:
        assert not r.get("error") and r["diverged"] is None, r
        for k in ev.METRICS:
            assert math.isfinite(r["metrics"][k]) and 0.0 <= r["metrics"][k] <= 1.0, (r["loss"], k)
            assert r["metrics"][k] > 0.3, (r["loss"], k)  # 10 classes: chance is ~0.1
        if r["n_loss_params"]:
            assert r["loss_params_updated"] is True, r["loss"]  # no frozen proxies/centers
        else:
            assert r["loss_params_updated"] is None, r["loss"]
        assert r["loss"] in printed
    by = {r["loss"]: r for r in res["losses"]}
    assert "center_acc" in by["StandaloneCenterLoss"]["metrics"]
    assert {"acc", "center_acc"} <= set(by["CenterLoss+Softmax"]["metrics"])
    for n in ("SparseCircleLoss", "CurricularFaceLoss", "ArcFaceLoss", "CosFaceLoss", "Softmax"):
        assert 0.3 < by[n]["metrics"]["acc"] <= 1.0
    for f in ("results.md", "results.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert not os.path.exists(os.path.join(out, "loss_curves.png"))
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["seed"] == 0 and "torch" in saved["versions"]
    assert "pytorch_metric_learning" in saved["versions"] and "pml_extras" in saved["versions"]
    assert all("train" in r["timings_s"] for r in saved["losses"])
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "| SparseCircleLoss | ours |" in md and "MAP@R" in md


def test_smoke_2d_plots_and_reproducibility(tmp_path):
    losses = "softmax,standalone,sparsecircle"
    a, out = _run(
        tmp_path, "--losses", losses, "--embedding-dim", "2", "--split", "samples", name="a"
    )
    for f in ("results.md", "results.json", "loss_curves.png", "embeddings.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    emb = np.load(os.path.join(out, "embeddings_test.npz"))
    assert emb["emb_SparseCircleLoss"].shape == (len(emb["labels"]), 2)
    # same seed -> same numbers, whatever else ran before (order reversed, one loss alone)
    b, _ = _run(
        tmp_path,
        "--losses",
        "sparsecircle,softmax",
        "--embedding-dim",
        "2",
        "--no-plots",
        "--split",
        "samples",
        name="b",
    )
    ra = {r["loss"]: r for r in a["losses"]}
    for r in b["losses"]:
        assert r["metrics"] == ra[r["loss"]]["metrics"]
        assert r["epoch_losses"] == ra[r["loss"]]["epoch_losses"]
    # a different seed changes them
    c, _ = _run(
        tmp_path,
        "--losses",
        "softmax",
        "--embedding-dim",
        "2",
        "--seed",
        "1",
        "--no-plots",
        "--split",
        "samples",
        name="c",
    )
    assert c["losses"][0]["epoch_losses"] != ra["Softmax"]["epoch_losses"]
    # --plot-only remakes the figures from the saved files
    os.remove(os.path.join(out, "embeddings.png"))
    retrieval.main(["--plot-only", out])
    assert os.path.exists(os.path.join(out, "embeddings.png"))


class _BlowsUp(torch.nn.Module):
    """A loss that turns non-finite in its second epoch (digits: 9 steps per epoch)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, emb, labels, indices_tuple=None):
        self.calls += 1
        loss = emb.pow(2).mean()
        return loss * float("nan") if self.calls > 12 else loss


def test_divergence_is_reported_and_run_continues(tmp_path, monkeypatch):
    monkeypatch.setitem(
        bl.LOSSES,
        "BlowsUp",
        bl.LossSpec("test", "custom", ("blowsup",), builder=lambda c, d: bl.Method(_BlowsUp())),
    )
    res, out = _run(tmp_path, "--losses", "blowsup,softmax", "--epochs", "3", "--split", "samples")
    bad, good = res["losses"]
    assert bad["diverged"]["epoch"] == 2 and bad["diverged"]["what"] == "loss"
    assert bad["metrics"] == {} and bad["epochs_completed"] == 1
    assert good["diverged"] is None and good["metrics"]["precision_at_1"] > 0.5
    with open(os.path.join(out, "results.md")) as f:
        assert "diverged (epoch 2" in f.read()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_smoke_cuda(tmp_path):
    res, _ = _run(
        tmp_path, "--losses", "softmax,sparsecircle", "--device", "cuda", "--knn", "torch"
    )
    assert res["device"].startswith("cuda") and res["knn_backend"] == "pml-customknn"
    for r in res["losses"]:
        assert math.isfinite(r["metrics"]["precision_at_1"])
