"""The retrieval benchmark's protocols and its command line: class-disjoint splits,
``--loss-args`` parsing and its errors, ``--seeds`` and their aggregation (mean ± std)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)

import retrieval  # noqa: E402
from retrieval_bench import data, report  # noqa: E402
from retrieval_bench import losses as bl  # noqa: E402
from retrieval_bench.cli import parse_seeds  # noqa: E402

# ------------------------------------------------------------------------------------------
# class-disjoint split of the in-memory datasets
# ------------------------------------------------------------------------------------------


def _toy(n_classes=10, per=6, shape=(1, 4, 4), norm="pixel"):
    rng = np.random.default_rng(0)
    y_tr = np.repeat(np.arange(n_classes), per)
    y_te = np.repeat(np.arange(n_classes), per // 2)
    x_tr = rng.normal(size=(len(y_tr), *shape)).astype(np.float32) + y_tr[:, None, None, None]
    x_te = rng.normal(size=(len(y_te), *shape)).astype(np.float32) + y_te[:, None, None, None]
    return data.Dataset("toy", x_tr, y_tr, x_te, y_te, shape, [f"c{i}" for i in range(10)], norm)


def test_classes_split_is_disjoint_and_remapped():
    ds = _toy()
    p = data.make_protocol(ds, "classes")
    assert p.train_classes == ["c0", "c1", "c2", "c3", "c4"]
    assert p.test_classes == ["c5", "c6", "c7", "c8", "c9"]
    assert p.num_classes == 5 and not p.classification
    np.testing.assert_array_equal(np.unique(p.train.labels), np.arange(5))
    np.testing.assert_array_equal(np.unique(p.test.labels), np.arange(5))
    # the test set is the test images of classes 5-9, in order, labels shifted by 5
    keep = ds.y_test >= 5
    np.testing.assert_array_equal(p.test.labels, ds.y_test[keep] - 5)
    assert len(p.train) == int((ds.y_train < 5).sum())
    # standardised with the statistics of the images it trains on (classes 0-4 only)
    x_tr = ds.x_train[ds.y_train < 5]
    mean, std = x_tr.mean(axis=0, keepdims=True), x_tr.std(axis=0, keepdims=True)
    np.testing.assert_allclose(p.train.x.numpy(), (x_tr - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        p.test.x.numpy(), (ds.x_test[keep] - mean) / std, rtol=1e-5, atol=1e-5
    )


def test_samples_split_is_the_closed_set():
    ds = _toy(norm="global")
    p = data.make_protocol(ds, "samples")
    assert p.classification and p.num_classes == 10 and len(p.test) == len(ds.y_test)
    m, s = float(ds.x_train.mean()), float(ds.x_train.std())
    np.testing.assert_allclose(p.test.x.numpy(), (ds.x_test - m) / s, rtol=1e-5, atol=1e-5)


def test_too_few_classes_for_a_class_split():
    ds = _toy()
    ds.y_train, ds.y_test = ds.y_train % 3, ds.y_test % 3
    with pytest.raises(SystemExit, match="at least 4 classes"):
        data.make_protocol(ds, "classes")


def test_default_split_per_dataset():
    assert data.default_split("digits") == "both"
    assert data.default_split("fashion-mnist") == "samples"
    for name in ("cub200", "cars196", "sop", "folder"):
        assert data.default_split(name) == "classes"


def test_proxy_losses_get_the_training_classes_only(tmp_path):
    res = retrieval.main(
        ["--losses", "sparsecircle,arcface,center", "--epochs", "1", "--split", "classes"]
        + ["--no-progress", "--no-plots", "--out", str(tmp_path)]
    )
    for r in res["losses"]:
        assert r["split"] == "classes" and not r.get("error"), r
        # 5 training classes x 128-D proxies (CenterLoss+Softmax: centers + 5-way classifier)
        expected = {"SparseCircleLoss": 5 * 128, "ArcFaceLoss": 5 * 128}
        expected["CenterLoss+Softmax"] = 5 * 128 + 5 * 128 + 5
        assert r["n_loss_params"] == expected[r["loss"]], r["loss"]
        assert "acc" not in r["metrics"] and "center_acc" not in r["metrics"]
        assert r["metrics"]["precision_at_1"] > 0.4  # 5 unseen classes: chance is ~0.2
    with open(tmp_path / "results.md") as f:
        md = f.read()
    assert "class-disjoint" in md and "Acc (logits)" not in md


def test_default_digits_run_shows_both_protocols(tmp_path):
    res = retrieval.main(
        ["--losses", "softmax", "--epochs", "1", "--no-progress", "--no-plots"]
        + ["--out", str(tmp_path)]
    )
    assert res["splits"] == ["samples", "classes"]
    assert [r["split"] for r in res["losses"]] == ["samples", "classes"]
    md = (tmp_path / "results.md").read_text()
    assert "`--split samples`" in md and "`--split classes`" in md


# ------------------------------------------------------------------------------------------
# --loss-args
# ------------------------------------------------------------------------------------------


def test_loss_args_parsing():
    got = bl.parse_loss_args(
        "SparseCircleLoss:m=0.4,gamma=80; arcface:margin=20 ;"
        "triplet:margin=0.1,miner.type_of_triplets=hard;center:weight_cent=0.01,alpha=0.3"
    )
    assert got["SparseCircleLoss"]["loss"] == {"m": 0.4, "gamma": 80}
    assert got["ArcFaceLoss"]["loss"] == {"margin": 20}
    assert got["TripletMarginLoss"]["loss"] == {"margin": 0.1}
    assert got["TripletMarginLoss"]["miner"] == {"type_of_triplets": "hard"}
    assert got["CenterLoss+Softmax"]["extras"] == {"weight_cent": 0.01}
    assert got["CenterLoss+Softmax"]["loss"] == {"alpha": 0.3}
    assert bl.parse_loss_args(None) == {} and bl.parse_loss_args("  ") == {}
    # base-class arguments (PML's mixins) are accepted too
    assert "embedding_reg_weight" in bl.accepted_kwargs(bl.LOSSES["CircleLoss"].loss_cls())


def test_loss_args_reach_the_loss():
    kw = bl.parse_loss_args("SparseCircleLoss:m=0.25,gamma=256;ms:miner.epsilon=0.3")
    m = bl.build_method("SparseCircleLoss", 4, 8, kw["SparseCircleLoss"])
    assert (m.loss.m, m.loss.gamma) == (0.25, 256) and m.hparams == {"m": 0.25, "gamma": 256}
    ms = bl.build_method("MultiSimilarityLoss", 4, 8, kw["MultiSimilarityLoss"])
    assert ms.miner.epsilon == 0.3 and "epsilon=0.3" in ms.hparams["miner"]
    # the Circle paper's fine-grained retrieval setting (Sun et al., CVPR 2020, Sec. 4.4)
    default = bl.build_method("SparseCircleLoss", 4, 8)
    assert (default.loss.m, default.loss.gamma) == (0.4, 80)
    pair = bl.build_method("CircleLoss", 4, 8)
    assert (pair.loss.m, pair.loss.gamma) == (0.4, 80)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("Nope:m=1", "unknown loss 'Nope'"),
        ("SparseCircleLoss:mm=0.4", "SparseCircleLoss has no argument 'mm'.*gamma"),
        ("SparseCircleLoss:num_classes=3", "has no argument 'num_classes'"),
        ("ArcFaceLoss:miner.epsilon=0.1", "ArcFaceLoss has no miner"),
        ("CircleLoss:miner.eps=0.1", "MultiSimilarityMiner has no argument 'eps'"),
        ("Softmax:lr=1", "Softmax has no argument 'lr'; it takes no arguments"),
        ("SparseCircleLoss m=0.4", "not of the form"),
        ("SparseCircleLoss:m", "'m' is not key=value"),
        ("SparseCircleLoss:impl=cuda_please", "SparseCircleLoss rejects impl='cuda_please'"),
        # sign and range, checked before the constructors (which accept all of these)
        ("CosFaceLoss:scale=-5", r"CosFaceLoss: scale=-5 is out of range; scale must be > 0"),
        ("ArcFaceLoss:scale=0", r"ArcFaceLoss: scale=0 is out of range; scale must be > 0"),
        ("CosFaceLoss:margin=-0.1", r"margin=-0.1 is out of range; margin must be >= 0"),
        ("SparseCircleLoss:gamma=-80", r"gamma=-80 is out of range; gamma must be > 0"),
        ("CircleLoss:m=-0.2", r"CircleLoss: m=-0.2 is out of range"),
        ("CircleLoss:miner.epsilon=-1", r"miner.epsilon=-1 is out of range"),
        ("CurricularFaceLoss:momentum=2", r"momentum=2 is out of range; momentum must be in"),
        ("centerloss:weight_cent=-1", r"weight_cent=-1 is out of range"),
        ("CosFaceLoss:scale=big", r"CosFaceLoss: scale='big' is not a number"),
        ("CosFaceLoss:scale=nan", r"is not a number|out of range"),
    ],
)
def test_loss_args_errors(spec, message):
    with pytest.raises(SystemExit, match=message):
        bl.parse_loss_args(spec)


def test_loss_args_recorded_and_used(tmp_path):
    args = ["--losses", "sparsecircle", "--epochs", "1", "--split", "samples"]
    args += ["--no-progress", "--no-plots"]
    a = retrieval.main(args + ["--out", str(tmp_path / "a")])
    b = retrieval.main(
        args + ["--out", str(tmp_path / "b"), "--loss-args", "SparseCircleLoss:m=0.25,gamma=256"]
    )
    assert b["losses"][0]["hparams"] == {"m": 0.25, "gamma": 256}
    assert a["losses"][0]["epoch_losses"] != b["losses"][0]["epoch_losses"]
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["loss_args"]["SparseCircleLoss"]["loss"] == {"m": 0.25, "gamma": 256}
    assert saved["config"]["loss_args"] == "SparseCircleLoss:m=0.25,gamma=256"
    assert "m=0.25, gamma=256" in (tmp_path / "b" / "results.md").read_text()


# ------------------------------------------------------------------------------------------
# --seeds
# ------------------------------------------------------------------------------------------


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5, 1 ,3") == [3, 4, 5, 1]
    for bad in ("a", "5-2", "", "-1"):
        with pytest.raises(SystemExit, match="--seeds"):
            parse_seeds(bad)


def test_aggregate_mean_and_sample_std():
    runs = [
        {"loss": "L", "source": "x", "split": "classes", "seed": s, "metrics": m, "timings_s": {}}
        for s, m in enumerate(
            [{"precision_at_1": 0.5}, {"precision_at_1": 0.7}, {"precision_at_1": 0.9}]
        )
    ]
    runs.append(
        {
            "loss": "L",
            "source": "x",
            "split": "classes",
            "seed": 3,
            "metrics": {},
            "diverged": {"epoch": 2, "what": "loss"},
            "timings_s": {},
        }  # fmt: skip
    )
    (s,) = report.aggregate(runs)
    st = s["stats"]["precision_at_1"]
    assert st["n"] == 3 and st["mean"] == pytest.approx(0.7)
    assert st["std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9
    assert s["n_runs"] == 4 and s["n_diverged"] == 1 and s["seeds"] == [0, 1, 2, 3]
    assert report.fmt_stat(st) == "0.7000 ± 0.2000"
    assert "diverged in 1/4 seeds" in report._status(s)


def test_seeds_run_each_loss_once_per_seed(tmp_path):
    out = tmp_path / "s"
    res = retrieval.main(
        ["--losses", "softmax,sparsecircle", "--seeds", "0,1,2", "--epochs", "1"]
        + ["--split", "samples", "--no-progress", "--out", str(out)]
    )
    assert [(r["loss"], r["seed"]) for r in res["losses"]] == [
        ("Softmax", 0),
        ("Softmax", 1),
        ("Softmax", 2),
        ("SparseCircleLoss", 0),
        ("SparseCircleLoss", 1),
        ("SparseCircleLoss", 2),
    ]
    first = [r["epoch_losses"] for r in res["losses"][:3]]
    assert first[0] != first[1] != first[2]  # the seeds differ
    for s in res["summary"]:
        p1 = [r["metrics"]["precision_at_1"] for r in res["losses"] if r["loss"] == s["loss"]]
        st = s["stats"]["precision_at_1"]
        assert st["values"] == p1
        assert st["mean"] == pytest.approx(np.mean(p1))
        assert st["std"] == pytest.approx(np.std(p1, ddof=1))
    md = (out / "results.md").read_text()
    assert "seeds 0,1,2" in md and " ± " in md and "over 3 seeds" in md
    # one seed of the three, alone, gives the same numbers (seeding is per run)
    one = retrieval.main(
        ["--losses", "sparsecircle", "--seed", "1", "--epochs", "1", "--split", "samples"]
        + ["--no-progress", "--no-plots", "--out", str(tmp_path / "one")]
    )
    assert one["losses"][0]["metrics"] == res["losses"][4]["metrics"]
    for f in ("loss_curves.png", "metrics.png"):
        assert os.path.getsize(out / f) > 0
    os.remove(out / "metrics.png")
    retrieval.main(["--plot-only", str(out)])
    assert os.path.getsize(out / "metrics.png") > 0


def test_old_results_still_plot(tmp_path):
    """results.json from before seeds and protocols (one seed, no summary) still plots."""
    src = os.path.join(BENCH_DIR, "results", "retrieval", "digits-2d")
    for f in ("results.json", "embeddings_test.npz"):
        with open(os.path.join(src, f), "rb") as a, open(tmp_path / f, "wb") as b:
            b.write(a.read())
    written = retrieval.main(["--plot-only", str(tmp_path)])
    assert written == {}
    for f in ("loss_curves.png", "metrics.png", "embeddings.png"):
        assert os.path.getsize(tmp_path / f) > 0


def test_both_protocols_at_2d_plot_each(tmp_path):
    res = retrieval.main(
        ["--losses", "softmax,standalone", "--epochs", "1", "--embedding-dim", "2"]
        + ["--no-progress", "--out", str(tmp_path)]
    )
    emb = np.load(tmp_path / "embeddings_test.npz")
    assert set(emb.files) == {
        "labels_samples",
        "labels_classes",
        "emb_samples_Softmax",
        "emb_samples_StandaloneCenterLoss",
        "emb_classes_Softmax",
        "emb_classes_StandaloneCenterLoss",
    }
    n_test = res["protocols"]["classes"]["n_test"]
    assert emb["emb_classes_Softmax"].shape == (n_test, 2)
    np.testing.assert_array_equal(np.unique(emb["labels_classes"]), np.arange(5))
    for f in ("embeddings_samples.png", "embeddings_classes.png"):
        assert os.path.getsize(tmp_path / f) > 0


def test_3d_plot_with_a_diverged_loss(tmp_path):
    """A diverged loss gets a labelled empty panel in the 3-D embedding plot too (3-D axes
    take text2D for axes-relative text; ``text`` there would read the string as z)."""
    from retrieval_bench import plots

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 20)
    np.savez(tmp_path / "embeddings_test.npz", labels=labels, emb_Softmax=rng.normal(size=(20, 3)))
    results = {
        "config": {"embedding_dim": 3, "dataset": "digits", "epochs": 2},
        "seed": 0,
        "losses": [
            {"loss": "Softmax", "metrics": {"precision_at_1": 1.0}},
            {"loss": "ArcFaceLoss", "metrics": None, "diverged": {"epoch": 2}},
        ],
    }
    written = plots._embeddings(plots._plt(), results, str(tmp_path))
    assert written and all(os.path.getsize(p) > 0 for p in written)
