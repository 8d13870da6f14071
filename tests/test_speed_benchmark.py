"""Smoke tests for benchmarks/speed.py: tiny grids on CPU, no timed assertions."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

import naive  # noqa: E402
import speed  # noqa: E402

CLASS_PROVIDERS = [
    "sparse_circle_torch",
    "curricular_torch",
    "arcface_torch",
    "cosface_torch",
    "pml_arcface",
    "naive_circle",
]
PAIR_PROVIDERS = ["pml_circle"]
MODES = ["fwd", "fwd+bwd"]

pytestmark = pytest.mark.usefixtures("single_thread")


def _tiny_args(out, *extra):
    return [
        "--device", "cpu", "--B", "8", "--D", "16", "--C", "64", "--dtype", "fp32",
        "--pair-B", "16", "--pair-D", "8", "--repeats", "2", "--warmup", "1",
        "--out", str(out), "--name", "tiny", *extra,
    ]  # fmt: skip


def _key(row):
    return (row["level"], row["C"], row["provider"], row["mode"])


def test_main_writes_rows_floors_and_ratios(tmp_path):
    providers = ",".join(CLASS_PROVIDERS + PAIR_PROVIDERS)
    result = speed.main(
        _tiny_args(
            tmp_path, "--providers", providers, "--modes", ",".join(MODES), "--memory", "none"
        )
    )
    with open(tmp_path / "tiny.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    meta = saved["meta"]
    assert meta["device"] == "cpu"
    assert meta["versions"]["torch"] == torch.__version__
    for field in ("pytorch_metric_learning", "pml_extras", "triton"):
        assert field in meta["versions"]
    assert "--providers" in meta["command"] and meta["command"].startswith("python ")

    rows = saved["rows"]
    expected = {
        ("class", C, p, m) for C in (64,) for p in ["floor"] + CLASS_PROVIDERS for m in MODES
    } | {("pair", None, p, m) for p in ["floor"] + PAIR_PROVIDERS for m in MODES}
    assert {_key(r) for r in rows} == expected
    assert len(rows) == len(expected)

    floors = {(r["level"], r["C"], r["mode"]): r for r in rows if r["provider"] == "floor"}
    for row in rows:
        assert row["status"] == "ok", row
        assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0
        assert len(row["time_samples_ms"]) == 2
        assert all(math.isfinite(t) and t > 0 for t in row["time_samples_ms"])
        floor = floors[(row["level"], row["C"], row["mode"])]
        assert row["floor_time_ms"] == floor["time_ms"]
        assert row["time_ratio"] == pytest.approx(row["time_ms"] / floor["time_ms"], rel=1e-12)
        assert row["cpu_time_ratio"] == pytest.approx(
            row["cpu_time_ms"] / floor["cpu_time_ms"], rel=1e-12
        )
        # Memory floor: dW + dx (class level), dx (pair level), fp32.
        w = 16 * row["C"] if row["level"] == "class" else 0
        x = 8 * 16 if row["level"] == "class" else 16 * 8
        assert row["floor_mem_bytes"] == 4 * (w + x)
    for floor in floors.values():
        assert floor["time_ratio"] == 1.0 and floor["mem_ratio"] == 1.0
        assert floor["mem_source"] == "analytical"

    with open(tmp_path / "tiny.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"time_ms", "time_ratio", "extra_mem_bytes", "mem_ratio"} <= set(csv_rows[0])
    md = (tmp_path / "tiny.md").read_text()
    assert meta["command"] in md and "| floor |" in md


def test_time_budget_skips_later_setups_and_partial_results_are_written(tmp_path, monkeypatch):
    """A run cut short (the GPU machine's per-command limit) keeps what it measured: results
    are written after every setup, and setups past --time-budget are reported as skipped."""
    writes = []
    real_write = speed.write_results

    def spy(result, out_dir, name, note):
        writes.append((result["meta"]["complete"], len(result["rows"]), note))
        return real_write(result, out_dir, name, note)

    monkeypatch.setattr(speed, "write_results", spy)
    args = _tiny_args(tmp_path, "--providers", "sparse_circle_torch", "--modes", "fwd")
    args += ["--memory", "none", "--C", "64,128", "--time-budget", "0"]
    rows = speed.main(args)["rows"]
    by_c = {}
    for row in rows:
        by_c.setdefault(row["C"], set()).add(row["status"])
    # The first setup always runs (no time spent yet); the later ones are skipped.
    assert by_c[64] == {"ok"}
    assert by_c[128] == {"skipped"} and set(by_c) == {64, 128}  # no pair-level provider
    assert all("time budget" in r["reason"] for r in rows if r["status"] == "skipped")
    # One partial write after the setup that ran, then the complete one.
    assert [w[0] for w in writes] == [False, True]
    assert writes[0][1] == 2 and "Partial" in writes[0][2]
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["meta"]["complete"] is True and len(saved["rows"]) == len(rows)


@pytest.mark.slow  # starts a forkserver, i.e. one fresh interpreter importing torch
def test_memory_child_and_skips(tmp_path):
    # One case through the fresh-process memory measurement; triton is recorded as skipped.
    args = _tiny_args(
        tmp_path, "--providers", "sparse_circle_torch,sparse_circle_triton", "--modes", "fwd+bwd"
    )
    args[args.index("--pair-B") + 1] = ""
    rows = speed.main(args)["rows"]
    assert {_key(r) for r in rows} == {
        ("class", C, p, "fwd+bwd")
        for C in (64,)
        for p in ("floor", "sparse_circle_torch", "sparse_circle_triton")
    }
    for row in rows:
        if row["provider"] == "sparse_circle_triton":
            assert row["status"] == "skipped" and "CUDA" in row["reason"]
            assert row["time_ms"] is None
        elif row["provider"] == "sparse_circle_torch":
            assert row["status"] == "ok"
            assert isinstance(row["extra_mem_bytes"], int) and row["extra_mem_bytes"] >= 0, row
            assert row["mem_ratio"] == row["extra_mem_bytes"] / row["floor_mem_bytes"]


def test_memory_estimate_skips_instead_of_crashing(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "available_bytes", lambda device: 1 << 20)
    args = _tiny_args(tmp_path, "--providers", "naive_circle", "--modes", "fwd", "--memory", "none")
    args[args.index("--C") + 1] = "100000"
    args[args.index("--pair-B") + 1] = ""
    rows = speed.main(args)["rows"]
    assert {r["provider"]: r["status"] for r in rows} == {
        "floor": "skipped",
        "naive_circle": "skipped",
    }
    assert all("available" in r["reason"] for r in rows)


def test_naive_baselines_match_ours():
    from pml_extras.losses import CurricularFaceLoss, SparseCircleLoss

    torch.manual_seed(0)
    B, D, C = 12, 16, 30
    x = torch.randn(B, D, dtype=torch.float64)
    labels = torch.randint(0, C, (B,))
    W = torch.randn(D, C, dtype=torch.float64)

    ours = SparseCircleLoss(C, D, impl="torch").double()
    ref = naive.NaiveClassCircleLoss(C, D).double()
    ours.W.data.copy_(W)
    ref.W.data.copy_(W)
    assert ref(x, labels).item() == pytest.approx(ours(x, labels).item(), rel=1e-9)

    ours = CurricularFaceLoss(C, D, impl="torch").double()
    ref = naive.NaiveCurricularFace(C, D).double()
    ours.W.data.copy_(W)
    ref.W.data.copy_(W)
    for _ in range(2):  # t moves between the calls
        assert ref(x, labels).item() == pytest.approx(ours(x, labels).item(), rel=1e-9)
        assert ref.t.item() == pytest.approx(ours.t.item(), rel=1e-9)


@pytest.mark.parametrize(
    "ours,theirs", [("arcface_torch", "pml_arcface"), ("cosface_torch", "pml_cosface")]
)
def test_margin_providers_compute_the_same_loss_as_pml(ours, theirs):
    """The providers compared in the tables build the same loss (margin, scale, shared W)."""
    setup = speed.Setup("class", 12, 16, 30, "fp64")
    device = torch.device("cpu")
    inputs = speed.Inputs(setup, device)
    values = {}
    for name in (ours, theirs):
        case = speed.PROVIDERS[name].build(setup, inputs, device, {"chunk_size": 7})
        loss_fn = case.keep[0]
        assert loss_fn.W.data_ptr() == inputs.W.data_ptr()  # the setup's W, shared
        values[name] = loss_fn(inputs.x, inputs.labels).item()
    assert values[ours] == pytest.approx(values[theirs], rel=1e-9)


@pytest.mark.parametrize("miner", ["ms", "all"])
def test_mined_pair_providers_compute_the_same_loss_as_pml(miner):
    """pair_circle_<miner> and pml_circle_<miner> evaluate the same pairs, outside the timing."""
    setup = speed.Setup("pair", 24, 8, None, "fp64")
    device = torch.device("cpu")
    inputs = speed.Inputs(setup, device)
    values = {}
    for name in (f"pair_circle_{miner}", f"pml_circle_{miner}"):
        case = speed.PAIR_PROVIDERS[name].build(setup, inputs, device, {})
        loss_fn, indices = case.keep
        assert sum(len(t) for t in indices) > 0
        case.step("fwd+bwd")
        assert inputs.x.grad is not None
        values[name] = (loss_fn(inputs.x, inputs.labels, indices).item(), inputs.x.grad.clone())
    ours, theirs = values.values()
    assert ours[0] == pytest.approx(theirs[0], rel=1e-9)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-9, atol=1e-9)
