"""The scripts behind benchmarks/results/lowdim: aggregation, the angle-only bound, and a
one-epoch run of the sweep driver (so that its variants build and train)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOWDIM = os.path.join(ROOT, "benchmarks", "results", "lowdim")
sys.path.insert(0, LOWDIM)

import aggregate  # noqa: E402
import angular_bound  # noqa: E402
import run as lowdim_run  # noqa: E402


def write_run(root, setup, seed, losses):
    path = root / setup / f"seed{seed}"
    path.mkdir(parents=True)
    entries = []
    for name, acc, diverged in losses:
        metrics = {} if diverged else {"acc": acc, "mean_average_precision_at_r": acc / 2}
        entries.append({"loss": name, "metrics": metrics, "diverged": diverged})
    (path / "results.json").write_text(json.dumps({"losses": entries}))


def test_aggregate_means_stds_and_points_against_softmax(tmp_path, monkeypatch):
    write_run(tmp_path, "digits-2d", 0, [("Softmax", 0.8, False), ("X", 0.7, False)])
    write_run(tmp_path, "digits-2d", 1, [("Softmax", 0.9, False), ("X", 0.8, False)])
    write_run(tmp_path, "digits-2d", 2, [("Softmax", 0.85, False), ("Y", None, True)])
    monkeypatch.setattr(aggregate, "HERE", str(tmp_path))
    aggregate.main()
    text = (tmp_path / "summary.md").read_text()
    # X: mean 0.75, population std 0.05; softmax mean 0.85, so -10.0 points.
    assert "| X | 2 | 0.750 ± 0.050 | -10.0 | 0.375 ± 0.025 |" in text
    assert "| Y | 1 | diverged in 1 of 1 seeds |  | n/a |" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["digits-2d"]["Softmax"]["acc"] == pytest.approx(0.85)


def test_arc_bound_is_the_best_arc_labelling():
    rng = np.random.default_rng(0)
    c, n = 10, 2000
    labels = rng.integers(0, c, n)
    # Each class on its own arc of 36 degrees: the angle says everything.
    angle = (labels + rng.uniform(0.05, 0.95, n)) * 2 * math.pi / c - math.pi
    radius = rng.uniform(0.1, 5.0, n)  # the radius must not matter
    emb = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    assert angular_bound.arc_bound(emb, labels, 360) == 1.0
    # Two classes sharing every arc in equal numbers: the best labelling gets half.
    shared = np.repeat(np.linspace(-math.pi + 0.01, math.pi - 0.01, 500), 2)
    emb2 = np.stack([np.cos(shared), np.sin(shared)], 1)
    assert angular_bound.arc_bound(emb2, np.tile([0, 1], 500), 36) == pytest.approx(0.5)


def test_angular_bound_writes_its_table(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    d = tmp_path / "digits-2d" / "seed0"
    d.mkdir(parents=True)
    labels = rng.integers(0, 3, 300)
    np.savez(d / "embeddings_test.npz", labels=labels, emb_A=rng.normal(size=(300, 2)))
    monkeypatch.setattr(angular_bound, "HERE", str(tmp_path))
    out = tmp_path / "bound.md"
    angular_bound.main(["--bins", "12", "--out", str(out)])
    row = [ln for ln in out.read_text().splitlines() if ln.startswith("| A |")]
    expected = angular_bound.arc_bound(np.load(d / "embeddings_test.npz")["emb_A"], labels, 12)
    assert row == [f"| A | {expected:.3f} |"]


def test_sweep_variants_build_and_train_one_epoch(tmp_path):
    variants = "cfE_order_frozen,cfE_spreadL0.05_mhalf,scE_spreadL0.05,afE_auto"
    out = tmp_path / "sweep"
    cmd = [sys.executable, os.path.join(LOWDIM, "sweep.py"), "--dataset", "digits"]
    cmd += ["--embedding-dim", "2", "--epochs", "1", "--losses", variants, "--out", str(out)]
    cmd += ["--threads", "1", "--no-progress", "--no-plots", "--knn", "torch"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["loss"]: r for r in json.loads((out / "results.json").read_text())["losses"]}
    assert set(runs) == set(variants.split(","))
    for r in runs.values():
        assert not r.get("diverged") and not r.get("error"), r
        assert 0.0 <= r["metrics"]["acc"] <= 1.0
    # The margins the names promise: pi/10 for the half-separation rule in 2-D.
    assert runs["cfE_spreadL0.05_mhalf"]["hparams"]["margin"] == pytest.approx(math.pi / 10)
    assert runs["afE_auto"]["hparams"]["margin"] == pytest.approx(math.pi / 10)
    assert runs["cfE_order_frozen"]["hparams"]["frozen"] is True


def test_lowdim_driver_runs_todays_benchmark(tmp_path):
    """run.py drives today's benchmarks/retrieval.py (no copy pinned through git show):
    its registered losses train, in the closed set, and the run records the driver."""
    src = open(os.path.join(LOWDIM, "run.py")).read()
    assert '"show"' not in src and not hasattr(lowdim_run, "BENCH_COMMIT")
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(LOWDIM, "run.py"), "--dataset", "digits"]
    cmd += ["--embedding-dim", "2", "--epochs", "1", "--out", str(out), "--threads", "1"]
    cmd += ["--losses", "SparseCircleLoss,CurricularFaceLoss(paper),Softmax", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["splits"] == ["samples"] and saved["lowdim"]["driver"].endswith("run.py")
    runs = {r["loss"]: r for r in saved["losses"]}
    assert set(runs) == {"SparseCircleLoss", "CurricularFaceLoss(paper)", "Softmax"}
    for r in runs.values():
        assert not r.get("error") and 0.0 <= r["metrics"]["acc"] <= 1.0, r
    assert runs["CurricularFaceLoss(paper)"]["hparams"]["scale"] == 64.0
    assert (out / "embeddings.png").exists()
