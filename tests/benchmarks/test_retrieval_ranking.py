"""The retrieval benchmark as a ranking: failures are errors (with their exit codes), the
baselines on the right split, L2 normalisation before k-NN, identical batch/augmentation
streams across losses and worker counts, and the confidence-interval arithmetic."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)

import retrieval  # noqa: E402
from _retrieval_fixtures import make_folder  # noqa: E402
from retrieval_bench import baselines, data, report, training  # noqa: E402
from retrieval_bench import losses as bl  # noqa: E402
from retrieval_bench.env import seed_everything  # noqa: E402
from retrieval_bench.images import load_image_dataset  # noqa: E402
from retrieval_bench.models import make_model  # noqa: E402

FAST = ["--epochs", "1", "--no-progress", "--no-plots"]


def _main(tmp_path, *extra, name="out"):
    return retrieval.main([*FAST, "--out", str(tmp_path / name), *extra])


def _exit(tmp_path, *extra) -> SystemExit:
    with pytest.raises(SystemExit) as ei:
        _main(tmp_path, *extra)
    return ei.value


# ------------------------------------------------------------------------------------------
# failures are errors
# ------------------------------------------------------------------------------------------


def test_batch_too_big_for_a_small_folder_is_a_clear_error(tmp_path):
    # 4 classes x 3 images: --split classes trains on 2 classes (6 images); the image
    # defaults (batch 32, m = 4) need 8 classes. PML's sampler would assert; we say why.
    make_folder(str(tmp_path / "data"), ["a", "b", "c", "d"], per_class=3)
    e = _exit(
        tmp_path,
        *("--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--model", "mlp"),
        *("--image-size", "8", "--workers", "0"),
    )
    msg = str(e.code)
    assert isinstance(e.code, str)  # SystemExit(str): exit status 1
    assert "--batch-size 32 needs at least 8 classes at --m-per-class 4" in msg
    assert "has 6 training samples, fewer than --batch-size 32" in msg
    assert not (tmp_path / "out" / "results.json").exists()  # nothing trained


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "30", "--m-per-class", "4"], "--m-per-class 4 does not divide"),
        (["--batch-size", "128", "--m-per-class", "8"], "needs at least 16 classes"),
        (["--batch-size", "4000"], "fewer than --batch-size 4000"),
        (["--embedding-dim", "1"], "--embedding-dim 1: must be >= 2"),
        (["--embedding-dim", "0"], "--embedding-dim 0: must be >= 2"),
        (["--m-per-class", "0"], "--m-per-class 0: must be >= 1"),
        (["--loss-args", "CosFaceLoss:scale=-5"], "CosFaceLoss: scale=-5 is out of range"),
        (["--reference", "nope"], "--reference 'nope': not a loss"),
    ],
)
def test_bad_command_lines_exit_with_a_message(tmp_path, args, message):
    e = _exit(tmp_path, "--losses", "softmax,cosface", "--split", "classes", *args)
    assert isinstance(e.code, str) and message in e.code


class _Broken(torch.nn.Module):
    def forward(self, emb, labels, indices_tuple=None):
        raise RuntimeError("not implemented yet")


def _add_broken(monkeypatch):
    monkeypatch.setitem(
        bl.LOSSES,
        "Broken",
        bl.LossSpec("test", "custom", ("broken",), builder=lambda c, d: bl.Method(_Broken())),
    )


def test_every_run_failing_exits_nonzero_one_line_each(tmp_path, monkeypatch, capsys):
    _add_broken(monkeypatch)
    e = _exit(tmp_path, "--losses", "broken", "--seeds", "0,1", "--split", "classes")
    assert isinstance(e.code, str)
    lines = e.code.splitlines()
    assert lines[0] == "error: all 2 runs failed:"
    assert lines[1:] == [
        f"ERROR: classes: Broken (seed {s}): RuntimeError: not implemented yet" for s in (0, 1)
    ]
    assert "Traceback" not in capsys.readouterr().err  # one line per failure, no tracebacks
    # the table was still written, with the failure in it
    assert "error: RuntimeError: not implemented yet" in (tmp_path / "out/results.md").read_text()


def test_partial_failure_is_listed_and_exits_zero(tmp_path, monkeypatch, capsys):
    _add_broken(monkeypatch)
    res = _main(tmp_path, "--losses", "broken,softmax", "--split", "classes")
    assert res["losses"][0]["error"] and res["losses"][1]["metrics"]
    assert "1 of 2 runs failed" in capsys.readouterr().err
    md = (tmp_path / "out/results.md").read_text()
    assert "| Broken | test |" in md and "error: RuntimeError" in md


def test_exit_codes_of_the_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(BENCH_DIR)}
    script = os.path.join(BENCH_DIR, "retrieval.py")
    bad = subprocess.run(
        [sys.executable, script, "--embedding-dim", "1", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 1 and "--embedding-dim 1: must be >= 2" in bad.stderr


def test_hidden_folders_and_files_are_not_classes(tmp_path):
    make_folder(str(tmp_path), ["a", "b", "c", "d"], per_class=2)
    make_folder(str(tmp_path / ".ipynb_checkpoints"), ["x"], per_class=2)
    make_folder(str(tmp_path / ".cache"), [], per_class=0)
    make_folder(str(tmp_path / "a"), [".hidden"], per_class=1)
    (tmp_path / "b" / ".DS_Store.png").write_bytes(b"not an image")
    ds = load_image_dataset("folder", str(tmp_path), image_size=8, workers=0)
    assert ds.class_names == ["a", "b", "c", "d"]
    assert len(ds.paths) == 8 and not any("/." in p for p in ds.paths)


# ------------------------------------------------------------------------------------------
# baselines and normalisation
# ------------------------------------------------------------------------------------------


def _p_at_1(emb: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out cosine 1-NN accuracy in float64, independent of PML and faiss."""
    e = emb.astype(np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return float((labels[sim.argmax(1)] == labels).mean())


def test_baselines_are_on_each_seeds_test_split(tmp_path):
    res = _main(tmp_path, "--losses", "softmax", "--split", "classes", "--seeds", "0,1")
    base = {(r["loss"], r["seed"]): r for r in res["baselines"]}
    assert set(base) == {(b, s) for b in (baselines.RAW, baselines.UNTRAINED) for s in (0, 1)}
    ds = data.load_digits()
    parts = res["class_partitions"]
    assert parts["classes/seed0"] != parts["classes/seed1"]  # --seeds draws the partition
    for seed in (0, 1):
        train_c, test_c = (
            [int(n) for n in parts[f"classes/seed{seed}"][k]] for k in ("train", "test")
        )
        assert sorted(train_c + test_c) == list(range(10)) and not set(train_c) & set(test_c)
        # raw input, recomputed here: test images of the test classes, standardised per
        # pixel with the training-class images' statistics, cosine 1-NN
        tr, te = np.isin(ds.y_train, train_c), np.isin(ds.y_test, test_c)
        xtr = ds.x_train[tr].reshape(tr.sum(), -1).astype(np.float64)
        std = xtr.std(0)
        std[std == 0] = 1
        x = (ds.x_test[te].reshape(te.sum(), -1) - xtr.mean(0)) / std
        want = _p_at_1(x, ds.y_test[te])
        assert base[(baselines.RAW, seed)]["metrics"]["precision_at_1"] == pytest.approx(want)
        # the untrained network: the initialisation every loss starts from at this seed
        seed_everything(seed)
        model, _ = make_model("mlp", (1, 8, 8), 128)
        model.eval()
        with torch.no_grad():
            emb = model(torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)).numpy()
        got = base[(baselines.UNTRAINED, seed)]["metrics"]["precision_at_1"]
        assert got == pytest.approx(_p_at_1(emb, ds.y_test[te]))
    md = (tmp_path / "out/results.md").read_text()
    assert "| baseline: raw input | baseline |" in md and "| baseline: untrained network |" in md
    assert "vs best baseline" in md


def test_weights_add_the_frozen_backbone_baseline(tmp_path):
    from types import SimpleNamespace

    from retrieval_bench.evaluation import retrieval_metrics, select_knn

    model, _ = make_model("resnet18", (3, 16, 16), 8)
    path = str(tmp_path / "w.pt")
    torch.save(model.backbone.state_dict(), path)
    make_folder(str(tmp_path / "data"), ["a", "b", "c", "d"], per_class=3)
    ds = load_image_dataset("folder", str(tmp_path / "data"), image_size=16, workers=0)
    proto = data.make_protocol(ds, "classes", partition_seed=0)
    args = SimpleNamespace(
        model="resnet18", embedding_dim=8, weights=path, pretrained=False, amp=None,
        eval_batch_size=4,
    )  # fmt: skip
    knn, dev, _ = select_knn(torch.device("cpu"), "torch")
    runs = baselines.baseline_runs(proto, args, torch.device("cpu"), knn, dev, seed=0)
    assert [r["loss"] for r in runs] == [baselines.RAW, baselines.UNTRAINED, baselines.FROZEN]
    assert "512-D" in runs[2]["what"]
    # the frozen backbone's features, recomputed: the loaded backbone on the test images
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.backbone(x) for x in proto.test.eval_batches(4, dev)])
    want = retrieval_metrics(
        torch.nn.functional.normalize(feats, dim=1), proto.test.labels, knn=knn, device=dev
    )
    assert runs[2]["metrics"] == pytest.approx(want)
    # without --weights there is no frozen-backbone row
    args.weights = None
    assert len(baselines.baseline_runs(proto, args, torch.device("cpu"), knn, dev, seed=0)) == 2


def test_every_embedding_is_normalised_before_knn(tmp_path, monkeypatch):
    seen = []
    real = training.retrieval_metrics

    def spy(emb, labels, **kw):
        seen.append(torch.linalg.vector_norm(torch.as_tensor(emb).float(), dim=1))
        return real(emb, labels, **kw)

    monkeypatch.setattr(training, "retrieval_metrics", spy)
    res = _main(tmp_path, "--losses", "softmax,standalone,arcface", "--split", "classes")
    # Softmax and the standalone center loss do not normalise: normalised, then raw
    assert len(seen) == 5
    for i in (0, 2, 4):  # the scores in the table
        assert torch.allclose(seen[i], torch.ones_like(seen[i]), atol=1e-5)
    for i in (1, 3):  # the unnormalised scores beside them
        assert not torch.allclose(seen[i], torch.ones_like(seen[i]), atol=1e-2)
    by = {r["loss"]: r for r in res["losses"]}
    assert (
        "metrics_unnormalized" in by["Softmax"] and "metrics_unnormalized" not in by["ArcFaceLoss"]
    )
    assert "MAP@R unnormalised" in (tmp_path / "out/results.md").read_text()


# ------------------------------------------------------------------------------------------
# identical streams
# ------------------------------------------------------------------------------------------


class _Recorder(torch.nn.Module):
    """Wraps the model and records every training input batch it sees."""

    def __init__(self, inner, log):
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, x):
        if self.training:
            self.log.append(x.detach().clone())
        return self.inner(x)


def test_every_loss_sees_the_same_batches_and_crops_whatever_the_workers(tmp_path, monkeypatch):
    make_folder(str(tmp_path / "data"), [f"c{i}" for i in range(6)], per_class=4, size=(30, 22))
    logs = {}
    real = training.model_for

    def recording(*a, **kw):
        model, info = real(*a, **kw)
        return _Recorder(model, logs[current]), info

    monkeypatch.setattr(training, "model_for", recording)
    # a proxy loss draws its proxies from torch's RNG, a pair loss draws nothing: they
    # consume different amounts of the global RNG before the first batch
    for current, loss, workers in [
        ("arcface-0", "arcface", "0"),
        ("ms-0", "ms", "0"),
        ("arcface-2", "arcface", "2"),
    ]:
        logs[current] = []
        _main(
            tmp_path,
            *("--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--model", "mlp"),
            *("--image-size", "8", "--workers", workers, "--losses", loss, "--epochs", "2"),
            *("--batch-size", "6", "--m-per-class", "2", "--split", "classes"),
            name=current,
        )
    ref = logs["arcface-0"]
    assert len(ref) == 4  # 2 epochs x 2 batches of 6 among 12 training images
    assert not torch.equal(ref[0], ref[2])  # epochs differ
    for other in ("ms-0", "arcface-2"):
        assert len(logs[other]) == len(ref)
        for a, b in zip(ref, logs[other]):
            assert torch.equal(a, b), other


def test_batch_stream_ignores_the_global_rngs():
    labels = np.repeat(np.arange(5), 8)
    a = training.batch_stream(labels, 10, 2, seed=3, epoch=1)
    np.random.seed(0)
    torch.manual_seed(0)
    np.random.rand(17)
    b = training.batch_stream(labels, 10, 2, seed=3, epoch=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = training.batch_stream(labels, 10, 2, seed=3, epoch=2)
    assert not torch.equal(a[0], c[0])
    for batch in a[0]:  # m = 2 per class, 5 classes per batch
        assert sorted(np.bincount(labels[batch.numpy()], minlength=5).tolist()) == [2] * 5


# ------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------

T_0975_DF2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (tables)


def test_t_interval_by_hand():
    ci = report.t_interval([0.30, 0.35, 0.40])
    # mean 0.35, sample std 0.05, half-width t * s / sqrt(n)
    assert ci["mean"] == pytest.approx(0.35)
    assert ci["half"] == pytest.approx(T_0975_DF2 * 0.05 / math.sqrt(3), rel=1e-9)
    assert ci["half"] == pytest.approx(0.124207, abs=1e-6)
    assert report.t_interval([0.5])["half"] is None
    # 10 values, df 9: t = 2.262157
    v = [0.1 * i for i in range(10)]
    half = 2.2621571627409915 * np.std(v, ddof=1) / math.sqrt(10)
    assert report.t_interval(v)["half"] == pytest.approx(half, rel=1e-9)


def _runs(loss, vals, split="classes"):
    return [
        {"loss": loss, "seed": s, "split": split, "metrics": {report.RANK_METRIC: v}}
        for s, v in enumerate(vals)
    ]


def test_paired_difference_by_hand():
    runs = _runs("L", [0.50, 0.60, 0.70]) + _runs("R", [0.45, 0.50, 0.62])
    d = report.paired_difference(runs, "classes", "L", "R")
    # differences 0.05, 0.10, 0.08: mean 0.07667, sample std 0.025166
    sd = math.sqrt(((0.05 - 0.23 / 3) ** 2 + (0.10 - 0.23 / 3) ** 2 + (0.08 - 0.23 / 3) ** 2) / 2)
    assert d["mean"] == pytest.approx(0.23 / 3)
    assert d["half"] == pytest.approx(T_0975_DF2 * sd / math.sqrt(3), rel=1e-9)
    assert d["lo"] > 0 and d["resolved"] == 1 and d["seeds"] == [0, 1, 2]
    # same means but the differences disagree in sign: not resolved
    runs = _runs("L", [0.50, 0.60, 0.70]) + _runs("R", [0.40, 0.65, 0.52])
    assert report.paired_difference(runs, "classes", "L", "R")["resolved"] == 0
    runs = _runs("L", [0.40, 0.41, 0.42]) + _runs("R", [0.50, 0.52, 0.53])
    assert report.paired_difference(runs, "classes", "L", "R")["resolved"] == -1
    # only seeds both finished are paired
    runs = _runs("L", [0.5, 0.6, 0.7]) + _runs("R", [0.4, 0.5])
    assert report.paired_difference(runs, "classes", "L", "R")["seeds"] == [0, 1]


def test_best_baseline_is_the_reference_and_marks_losses(tmp_path):
    res = _main(tmp_path, "--losses", "softmax", "--split", "classes", "--seeds", "0,1")
    bs = res["baseline_summary"]
    best = max(bs, key=lambda s: s["stats"][report.RANK_METRIC]["mean"])["loss"]
    assert res["ranking"]["classes"]["reference"] == best
    d = res["ranking"]["classes"]["differences"]["Softmax"]
    loss = [r["metrics"][report.RANK_METRIC] for r in res["losses"]]
    ref = [r["metrics"][report.RANK_METRIC] for r in res["baselines"] if r["loss"] == best]
    assert d["mean"] == pytest.approx(np.mean(np.subtract(loss, ref)))
    md = (tmp_path / "out/results.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| Softmax |"))
    assert report.verdict(d) in row


# ------------------------------------------------------------------------------------------
# validation folds and tuning
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes, k", [(5, 2), (8, 4), (50, 4), (11, 3)])
def test_class_folds_partition_the_training_classes(num_classes, k):
    from retrieval_bench.folds import class_folds

    folds = class_folds(num_classes, k, seed=3)
    assert len(folds) == k
    vals = [c for _, va in folds for c in va]
    assert sorted(vals) == list(range(num_classes))  # each class validated exactly once
    for tr, va in folds:
        assert not set(tr) & set(va) and sorted(tr + va) == list(range(num_classes))
        assert len(va) in (num_classes // k, num_classes // k + 1)
    assert class_folds(num_classes, k, seed=3) == folds
    with pytest.raises(SystemExit, match="--folds 4 needs at least 8 training classes"):
        class_folds(7, 4, seed=0)


def test_folds_and_tuning_never_touch_the_test_classes(tmp_path, monkeypatch):
    """Every model trained while tuning and every validation split holds training-class
    images only; the test split is embedded only by the final runs and the baselines."""
    from retrieval_bench import cli, folds

    seen = []  # (phase, protocol) of every train_and_evaluate call
    real = cli.train_and_evaluate
    phase = {"now": "final"}

    def spy(name, protocol, *a, **kw):
        seen.append((phase["now"], protocol))
        return real(name, protocol, *a, **kw)

    real_tune = cli.tune

    def tune_spy(*a, **kw):
        phase["now"] = "tuning"
        try:
            return real_tune(*a, **kw)
        finally:
            phase["now"] = "final"

    monkeypatch.setattr(cli, "train_and_evaluate", spy)
    monkeypatch.setattr(cli, "tune", tune_spy)
    res = _main(
        tmp_path,
        *("--losses", "cosface", "--split", "classes", "--folds", "2", "--tune", "2"),
        *("--batch-size", "64", "--seeds", "1"),
    )
    # digits: the seed-1 partition; the test split's images are the 'test' classes' test
    # images, and fold sources are subsets of the training split (ArraySource rows)
    proto = data.make_protocol(data.load_digits(), "classes", partition_seed=1)
    test_rows = {tuple(r) for r in proto.test.x.reshape(len(proto.test), -1).numpy().round(5)}
    train_rows = {tuple(r) for r in proto.train.x.reshape(len(proto.train), -1).numpy().round(5)}
    tuning = [p for ph, p in seen if ph == "tuning"]
    final = [p for ph, p in seen if ph == "final"]
    assert len(tuning) == 2 * 2 and len(final) == 2  # 2 trials x 2 folds; 2 fold models
    for p in tuning:
        for src in (p.train, p.test):
            rows = {tuple(r) for r in src.x.reshape(len(src), -1).numpy().round(5)}
            assert rows <= train_rows and not rows & test_rows
        assert not set(p.train_classes) & set(p.test_classes)  # class-disjoint
        assert set(p.train_classes) | set(p.test_classes) <= set(proto.train_classes)
    for p in final:
        assert p.test is not None and len(p.test) == len(proto.test)
        assert set(p.train_classes) < set(proto.train_classes)
    r = res["losses"][0]
    assert (
        r["tuning"]["best"]["loss"] == next(t for t in r["tuning"]["trials"] if t["best"])["values"]
    )
    assert r["hparams"]["margin"] == r["tuning"]["best"]["loss"]["margin"]  # final runs use it
    assert r["embedding_dim_concatenated"] == 2 * 128 and "metrics_separated" in r
    assert len(r["folds"]) == 2
    md = (tmp_path / "out/results.md").read_text()
    assert "MAP@R 128-D separated" in md and "--tune 2" in md
    _ = folds  # imported for the module under test


def test_tune_needs_folds(tmp_path):
    e = _exit(tmp_path, "--losses", "cosface", "--split", "classes", "--tune", "2")
    assert "--tune needs --folds" in e.code


def test_merging_single_seed_runs_equals_one_run_of_both_seeds(tmp_path):
    args = ("--losses", "softmax,cosface", "--split", "classes")
    both = _main(tmp_path, *args, "--seeds", "0,1", name="both")
    _main(tmp_path, *args, "--seeds", "0", name="s0")
    _main(tmp_path, *args, "--seeds", "1", name="s1")
    merged = retrieval.main(
        ["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]
        + ["--no-plots"]
    )
    assert merged["seeds"] == [0, 1]
    for key in ("summary", "baseline_summary"):
        assert [s["stats"] for s in merged[key]] == [s["stats"] for s in both[key]]
    assert merged["ranking"] == json.loads(json.dumps(both["ranking"]))
    assert [m["seeds"] for m in merged["merged_from"]] == [[0], [1]]
    with pytest.raises(SystemExit, match="already merged"):
        retrieval.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--no-plots"])
    e = _exit(tmp_path, "--merge", str(tmp_path / "s0"), str(tmp_path / "nope"))
    assert "nope/results.json not found" in e.code


def test_long_class_lists_are_shortened_in_the_table():
    short = "train on classes 2,4,6-8 (30000)"
    assert report._short(short) == short
    long = "train on classes " + ",".join(str(c) for c in range(0, 600, 2)) + " (6000)"
    assert report._short(long) == "train on 300 classes (listed in results.json) (6000)"
