"""Smoke tests for benchmarks/speed.py (the speed_bench package): tiny grids on CPU, no timed
assertions."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)

import naive  # noqa: E402
import speed  # noqa: E402
import speed_bench.cli  # noqa: E402
import speed_bench.sweep  # noqa: E402

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

    # Plotting reads the JSON, apart from measuring: one figure per (level, B, D, dtype).
    import plot_speed

    written = plot_speed.main([str(tmp_path / "tiny.json"), "--out", str(tmp_path / "plots")])
    assert sorted(os.path.basename(p) for p in written) == [
        "tiny_class_B8_D16_fp32.png",
        "tiny_pair_B16_D8_fp32.png",
    ]
    assert all(os.path.getsize(p) > 1000 for p in written)


def test_time_budget_skips_later_setups_and_partial_results_are_written(tmp_path, monkeypatch):
    """A run cut short (the GPU machine's per-command limit) keeps what it measured: results
    are written after every setup, and setups past --time-budget are reported as skipped."""
    writes = []
    real_write = speed_bench.cli.write_results

    def spy(result, out_dir, name, note):
        writes.append((result["meta"]["complete"], len(result["rows"]), note))
        return real_write(result, out_dir, name, note)

    monkeypatch.setattr(speed_bench.cli, "write_results", spy)
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
    monkeypatch.setattr(speed_bench.sweep, "available_bytes", lambda device: 1 << 20)
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

    # The benchmark's settings, stated: the paper's m/gamma and s=64 (not "auto").
    ours = SparseCircleLoss(C, D, m=0.25, gamma=256.0, impl="torch").double()
    ref = naive.NaiveClassCircleLoss(C, D).double()
    ours.W.data.copy_(W)
    ref.W.data.copy_(W)
    assert ref(x, labels).item() == pytest.approx(ours(x, labels).item(), rel=1e-9)

    ours = CurricularFaceLoss(C, D, margin=0.5, scale=64.0, impl="torch").double()
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


class _Spy(torch.nn.Module):
    """Records what a loss sees: the embeddings' and W's dtypes and the autocast state."""

    def __init__(self, C, D):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(D, C))
        self.seen = []

    def forward(self, x, labels):
        self.seen.append(
            (x.dtype, self.W.dtype, torch.is_autocast_enabled("cpu"), (x @ self.W).dtype)
        )
        return (x @ self.W).float().logsumexp(1).mean()


@pytest.mark.parametrize(
    "dtype,expected",
    [
        ("bf16", (torch.bfloat16, torch.bfloat16, False, torch.bfloat16)),
        ("autocast_bf16", (torch.float32, torch.float32, True, torch.bfloat16)),
        ("fp32", (torch.float32, torch.float32, False, torch.float32)),
    ],
)
def test_setups_hand_the_loss_what_users_train_with(dtype, expected):
    """bf16 setups pass bf16 embeddings and W; autocast setups fp32 ones, under autocast."""
    from speed_bench.providers import PROVIDERS as table
    from speed_bench.providers import _loss_case

    setup = speed.Setup("class", 6, 8, 10, dtype)
    device = torch.device("cpu")
    inputs = speed.Inputs(setup, device)
    spy = _Spy(10, 8)
    case = _loss_case(spy, inputs, setup)
    case.step("fwd+bwd")
    assert spy.seen == [expected]
    # The user's dtypes are kept: gradients come back in the parameters' own dtype.
    assert inputs.x.grad.dtype == inputs.x.dtype == spy.W.grad.dtype == setup.torch_dtype
    assert not torch.is_autocast_enabled("cpu")  # the backward ran outside autocast
    # The floor multiplies in the operand dtype (autocast: cast once, outside the timing).
    floor = table["floor"].build(setup, inputs, device, {})
    assert {t.dtype for t in floor.keep} == {setup.operand_dtype}
    assert setup.operand_dtype == expected[3]


def test_autocast_and_bf16_rows(tmp_path):
    args = _tiny_args(tmp_path, "--providers", "sparse_circle_torch,pml_arcface,pml_circle")
    args[args.index("--dtype") + 1] = "bf16,autocast_bf16"
    rows = speed.main(args + ["--modes", "fwd+bwd", "--memory", "none", "--pair-dtype", "bf16"])[
        "rows"
    ]
    assert {(r["level"], r["dtype"]) for r in rows} == {
        ("class", "bf16"),
        ("class", "autocast_bf16"),
        ("pair", "bf16"),
    }
    for row in rows:
        assert row["status"] == "ok", row
        assert row["time_ratio"] > 0
        item = 4 if row["dtype"] == "autocast_bf16" else 2  # dW + dx in the params' dtype
        assert row["floor_mem_bytes"] == item * (16 * (row["C"] or 0) + row["B"] * row["D"])
        assert row["warmup_s"] > 0 or row["provider"] == "floor"


def test_hybrid_provider_says_where_it_cannot_run(monkeypatch):
    """sparse_circle_hybrid: SparseCircleLoss(impl="hybrid"); skipped on CPU without the
    interpreter (a Triton device is needed), and on CUDA where torch.mm lacks out_dtype."""
    from speed_bench import providers

    from pml_extras.ops import dispatch

    p = providers.PROVIDERS["sparse_circle_hybrid"]
    assert p.level == "class" and "impl='hybrid'" in p.description
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "CUDA" in p.check(torch.device("cpu"))
    monkeypatch.setattr(providers, "_has_triton", lambda device: None)
    monkeypatch.setattr(dispatch, "mm_has_out_dtype", lambda: False)
    assert "out_dtype" in p.check(torch.device("cuda"))
    monkeypatch.setattr(dispatch, "mm_has_out_dtype", lambda: True)
    assert p.check(torch.device("cuda")) is None


def test_quick_preset_and_overrides():
    args = speed.parse_args(["--preset", "quick"])
    assert (args.B, args.D, args.C) == ([1024], [512], [100_000, 1_000_000])
    assert args.dtype == ["bf16", "autocast_bf16"] and args.pair_dtype == ["bf16"]
    assert args.check and args.count_specialisations and args.modes == ["fwd+bwd"]
    assert set(args.providers) >= {"sparse_circle_triton", "pair_circle_triton"}
    # Both class implementations in one run, against one floor (issue 21).
    assert "sparse_circle_hybrid" in args.providers
    from speed_bench.setups import build_setups

    setups = build_setups(args, torch.device("cuda"))
    assert len(setups) == 5 and sum(s.level == "pair" for s in setups) == 1
    small = speed.parse_args(["--preset", "quick", "--C", "64", "--limit", "class-time=2"])
    assert small.C == [64] and small.limits == {"class-time": 2.0} and small.B == [1024]
    with pytest.raises(SystemExit):
        speed.parse_args(["--limit", "nonsense=1"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--dtype", "autocast_int8"])


COUNTER_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from speed_bench.specialisations import SpecialisationCounter, compiled_variants
from pml_extras.losses import ArcFaceLoss, SparseCircleLoss
torch.manual_seed(0)
loss = ArcFaceLoss(40, 16, impl="triton")
other = SparseCircleLoss(40, 16, impl="triton")
x, y = torch.randn(8, 16, requires_grad=True), torch.randint(0, 40, (8,))
with SpecialisationCounter() as counter:
    hooked = counter.hooked
    loss(x, y).backward()
    first, first_launches = counter.count, sum(counter.launches.values())
    loss(x, y).backward()                     # same specialisations again
    again, launches = counter.count, sum(counter.launches.values())
    other(x, y).backward()                    # another transform (KIND): new ones
    with_other, inside = counter.count, sum(counter.launches.values())
loss(x, y).backward()                         # after exit: not recorded
print(first, first_launches, again, launches, with_other, inside,
      sum(counter.launches.values()), hooked, compiled_variants())
print("\n".join(counter.keys()))
"""


@pytest.mark.slow  # a fresh interpreter with TRITON_INTERPRET=1
def test_specialisation_counter_counts_distinct_launch_signatures():
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", COUNTER_SCRIPT, BENCH_DIR],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, *keys = proc.stdout.strip().splitlines()
    first, first_launches, again, launches, with_other, inside, total, hooked, compiled = (
        head.split()
    )
    assert int(first) >= 2 and again == first  # repeats add launches, not specialisations
    assert int(launches) == 2 * int(first_launches)
    assert int(with_other) > int(first)
    assert total == inside  # nothing recorded after exit
    assert int(hooked) >= 2 and compiled == "None"  # the interpreter compiles nothing
    assert len(keys) == int(with_other)
    kinds = {k.split("KIND=")[1].split(",")[0] for k in keys if "KIND=" in k}
    assert len(kinds) == 2 and all("OP_DTYPE=" in k for k in keys if "KIND=" in k)


def test_compiled_variants_reads_triton_caches(monkeypatch):
    """On a GPU the count is cross-checked against Triton's per-device kernel caches; a
    stand-in module with that layout runs the code here."""
    import types

    from speed_bench.specialisations import compiled_variants, kernels

    def body(X, BLOCK):
        pass

    class FakeJIT:
        def __init__(self, caches):
            self.fn, self.pre_run_hooks, self.device_caches = body, [], caches

        def add_pre_run_hook(self, hook):
            self.pre_run_hooks.append(hook)

    compiled = types.ModuleType("fake_kernels")
    compiled.k1 = FakeJIT({0: ({"a": 1, "b": 2}, {}, None, None, None)})
    compiled.k2 = FakeJIT({0: ({"c": 3}, {}, None, None, None), 1: ({"d": 4}, {}, 0, 0, 0)})
    compiled.not_a_kernel = 3
    monkeypatch.setitem(sys.modules, "fake_kernels", compiled)
    assert set(kernels(["fake_kernels", "no_such_module"])) == {
        "fake_kernels.k1",
        "fake_kernels.k2",
    }
    assert compiled_variants(["fake_kernels"]) == 4
    interpreted = types.ModuleType("fake_interpreted")
    interpreted.k = types.SimpleNamespace(fn=body, add_pre_run_hook=lambda h: None)
    monkeypatch.setitem(sys.modules, "fake_interpreted", interpreted)
    assert compiled_variants(["fake_interpreted"]) is None  # the interpreter compiles nothing


class _KnownCost:
    """A stand-in case whose call costs a known time: ``sleep`` (wall time, almost no CPU
    time) or ``spin`` (busy CPU time); it counts its calls and gradient resets."""

    def __init__(self, seconds, kind):
        self.seconds, self.kind, self.calls, self.resets = seconds, kind, 0, 0
        self.leaves = [torch.zeros(3, requires_grad=True)]

    def reset(self):
        self.resets += 1
        for t in self.leaves:
            t.grad = None

    def step(self, mode):
        self.reset()
        self.calls += 1
        if self.kind == "sleep":
            import time

            time.sleep(self.seconds)
        else:
            import time

            end = time.process_time() + self.seconds
            while time.process_time() < end:
                pass


def test_timing_is_torch_utils_benchmark_with_known_costs():
    """Each round is a torch.utils.benchmark Measurement of many calls (blocked_autorange),
    not one hand-timed call; the wall clock sees a sleep, the CPU clock does not, and both
    see a busy spin. A hand loop (one call per round) fails the run counts."""
    from speed_bench.timing import summarise, time_case
    from torch.utils.benchmark import Measurement

    device, min_run_time, rounds = torch.device("cpu"), 0.03, 2
    cases = {"sleep": _KnownCost(0.002, "sleep"), "spin": _KnownCost(0.002, "spin")}
    measured = {name: [] for name in cases}
    for _ in range(rounds):  # round-robin, as the sweep does
        for name, case in cases.items():
            measured[name].append(time_case(case, "fwd", device, "torch", min_run_time, name))
    for name, case in cases.items():
        for m in measured[name]:
            assert isinstance(m.wall, Measurement) and isinstance(m.cpu, Measurement)
            assert m.wall.task_spec.sub_label == name and m.wall.task_spec.description == "fwd"
            timed = m.wall.number_per_run * len(m.wall.raw_times)
            # blocked_autorange times calls until min_run_time is spent
            assert sum(m.wall.raw_times) >= min_run_time and timed >= 10
            assert len(m.cpu.raw_times) == len(m.wall.raw_times)
        row = summarise(measured[name])
        assert row["time_runs"] == sum(
            m.wall.number_per_run * len(m.wall.raw_times) for m in measured[name]
        )
        assert case.calls > row["time_runs"] > rounds  # plus the block-size estimate
        assert len(row["time_samples_ms"]) == len(row["cpu_time_samples_ms"]) == rounds
        assert row["time_blocks"] >= rounds and row["time_iqr_ms"] >= 0
        assert (
            row["time_min_ms"]
            <= row["time_ms"]
            <= max(t * 1e3 for m in measured[name] for t in m.wall.times)
        )
        # Known costs: 2 ms per call (generous upper bounds for a loaded shared machine).
        assert 2.0 <= row["time_ms"] < 12.0, row
        if name == "sleep":
            assert row["cpu_time_ms"] < 0.5, row
        else:
            assert 1.9 <= row["cpu_time_ms"] <= row["time_ms"] + 0.1, row
        assert case.leaves[0].grad is None  # gradients dropped after the measurement


def test_do_bench_timer_contract_and_choice():
    """triton.testing.do_bench (CUDA only, so a stand-in with its contract here): per-call
    milliseconds with return_mode="all", gradients reset by do_bench, wrapped in the same
    Measurement; the timer choice and its errors."""
    from speed_bench.timing import resolve_timer, summarise, triton_do_bench_measurement
    from torch.utils.benchmark import Measurement

    case = _KnownCost(0.001, "sleep")
    seen = {}

    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        import time

        seen.update(warmup=warmup, rep=rep, grad_to_none=grad_to_none, mode=return_mode)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    rounds = [triton_do_bench_measurement(case, "fwd+bwd", 0.04, "x", do_bench) for _ in "ab"]
    assert seen == {"warmup": 10, "rep": 40, "grad_to_none": case.leaves, "mode": "all"}
    for m in rounds:
        assert isinstance(m.wall, Measurement) and m.cpu is None
        assert m.wall.number_per_run == 1 and len(m.wall.raw_times) == 5
        assert all(0.001 <= t < 0.05 for t in m.wall.raw_times)  # seconds, not ms
    row = summarise(rounds)
    assert row["time_runs"] == 10 and row["cpu_time_ms"] is None
    assert 1.0 <= row["time_ms"] < 50.0
    with pytest.raises(RuntimeError, match="no times"):
        triton_do_bench_measurement(case, "fwd", 0.01, "x", lambda fn, **kw: [])

    cpu = torch.device("cpu")
    assert resolve_timer("auto", cpu) == "torch" and resolve_timer("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="needs CUDA, got cpu"):
        resolve_timer("triton", cpu)
    with pytest.raises(ValueError, match="'hand'"):
        resolve_timer("hand", cpu)
    with pytest.raises(SystemExit, match="--timer"):
        speed.main(["--device", "cpu", "--timer", "triton", "--B", "4", "--pair-B", ""])


def test_rows_carry_the_measurement_statistics(tmp_path):
    """The JSON rows and the report say how the time was measured: pooled
    torch.utils.benchmark measurements, each of at least --min-run-time."""
    args = _tiny_args(tmp_path, "--providers", "sparse_circle_torch", "--modes", "fwd")
    args[args.index("--pair-B") + 1] = ""
    result = speed.main(args + ["--memory", "none", "--min-run-time", "0.02"])
    assert "torch.utils.benchmark.Timer.blocked_autorange" in result["meta"]["timing"]
    assert "2 rounds of >= 20 ms" in result["meta"]["timing"]
    for row in result["rows"]:
        assert row["status"] == "ok", row
        assert row["time_blocks"] >= 2 and row["time_runs"] >= row["time_blocks"]
        # each round timed at least min_run_time of calls
        assert row["time_runs"] * row["time_ms"] >= 0.5 * 2 * 20.0, row
        assert row["time_iqr_ms"] >= 0 and row["time_min_ms"] <= row["time_ms"]
    with open(tmp_path / "tiny.csv") as f:
        saved = list(csv.DictReader(f))
    assert {"time_iqr_ms", "time_runs", "time_blocks"} <= set(saved[0])
