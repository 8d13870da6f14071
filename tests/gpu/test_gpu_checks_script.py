"""benchmarks/gpu_checks.sh, executed on the CPU (GPU_CHECKS_CPU=1: the kernels under
TRITON_INTERPRET=1, tiny sizes), and the PASS/FAIL logic behind it (speed_bench.checks and
speed_bench.targets) on synthetic logs and rows.

Only the device differs from a GPU run: the same steps, the same speed.py preset, the same
verdict code. The limits are loosened here (the interpreter is ~100x slower than the
floor's matmuls) except one, set impossible, which must print FAIL.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEED_TESTS = "tests/benchmarks/test_speed_benchmark.py"
IMPORT_GRAPH_TESTS = "tests/project/test_import_graph.py"
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_checks.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from speed_bench import checks, targets  # noqa: E402

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _step_command(step: str) -> list:
    """The words after the script path in the script's ``if step NAME ...`` command."""
    text = open(SCRIPT).read().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(f"if step {step} "))
    words = shlex.split(line.split(";", 1)[0])
    script = next(w for w in words if w.startswith("benchmarks/") and w.endswith(".py"))
    args = words[words.index(script) + 1 :]
    # Array expansions ("${device[@]}") vanish; other variables become a placeholder.
    return [w if "$" not in w else "placeholder" for w in args if not w.endswith("[@]}")]


@needs_bash
def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_named_test_files_exist():
    named = re.findall(r"tests/[\w/]+\.py", open(SCRIPT).read())
    assert named, "the script names no test files"
    for path in named:
        assert os.path.isfile(os.path.join(ROOT, path)), path


def _array(name: str, which: int) -> list:
    """The words of the script's ``name=(...)`` assignment: which=0 the CPU rehearsal's,
    1 the GPU's."""
    found = re.findall(rf"^    {name}=\((.*?)\)$", open(SCRIPT).read(), flags=re.M)
    assert len(found) == 2, found
    return shlex.split(found[which])


def test_gpu_flags_are_accepted():
    """The GPU side of the script runs only on a lent GPU: its flags must at least parse."""
    import distributed_train
    import speed

    args = speed.parse_args(_step_command("speed") + _array("device", 1))
    assert args.time_budget == 420 and args.device == "cuda"
    args = speed.parse_args(_step_command("targets") + _array("device", 1))
    assert args.preset == "quick" and args.check and args.C == [100_000, 1_000_000]
    args = distributed_train.parse_args(_step_command("nccl_one_rank") + _array("dist", 1))
    assert args.backend == "nccl"


def _selection(var: str) -> list:
    """The default pytest selection the script assigns to ``var`` (pytest_sel, ...)."""
    text = open(SCRIPT).read()
    body = re.search(rf"^{var}=\((.*?)\)$", text, flags=re.S | re.M).group(1)
    return shlex.split(body.replace("\n", " "))


@pytest.mark.parametrize("var", ["pytest_sel", "memcheck_sel"])
def test_test_selections_collect_tests(var):
    """The CUDA-test and memcheck selections name tests that exist (a renamed test would
    otherwise select nothing, and show up only on a lent GPU)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + _selection(var),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert len(collected) >= 2, proc.stdout[-2000:]


# ------------------------------------------------------------ the CPU rehearsal

SELFCHECK_OK = """
print("SELF-CHECK class_lse: PASS (one-time cost 0.1 s)")
print("SELF-CHECK pair_circle: PASS (one-time cost 0.1 s)")
"""


@needs_bash
@pytest.mark.slow  # ~30 s of CPU: five python processes, the kernels interpreted
def test_cpu_rehearsal_prints_parseable_verdicts_and_a_deliberate_fail(tmp_path):
    selfcheck = tmp_path / "selfcheck.py"
    selfcheck.write_text(SELFCHECK_OK)
    out = tmp_path / "out"
    env = dict(
        os.environ,
        GPU_CHECKS_CPU="1",
        GPU_CHECKS_SELFCHECK=str(selfcheck),
        # One C; no time budget (a loaded machine); loose limits for the interpreted
        # kernels, and one impossible limit.
        GPU_CHECKS_SPEED_ARGS="--C 64 --time-budget 1e6 "
        "--limit class-time=1e9,class-mem=1e9,pair-time=1e9,kernel-specialisations=1",
        GPU_CHECKS_PYTEST=f"{SPEED_TESTS} -k 'margin_providers and arcface'",
        GPU_CHECKS_MEMCHECK_PYTEST=f"{SPEED_TESTS} -k 'margin_providers and cos'",
    )
    proc = subprocess.run(
        ["bash", SCRIPT, str(out), "quick"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    stdout = proc.stdout
    lines = [ln for ln in stdout.splitlines() if ln.split(" ", 1)[0] in checks.STATUSES]
    parsed = [checks.parse_line(ln) for ln in lines]
    assert lines and all(parsed), (stdout, proc.stderr[-3000:])
    by_target = {}
    for p in parsed:
        by_target.setdefault(p["target"], []).append(p)
    expected = {
        "selfcheck",
        "class-time",
        "class-mem",
        "pair-time",
        "class-operands",
        "kernel-specialisations",
        "cuda-tests",
        "memcheck",
        "wall-time",
    }
    assert set(by_target) == expected, stdout

    result = json.loads((out / "quick.json").read_text())
    rows = {(r["provider"], r["dtype"]): r for r in result["rows"] if r["level"] == "class"}
    # Every class-level Triton loss, on bf16 and autocast, measured against its floor.
    assert {p["subject"].split()[0] for p in by_target["class-time"]} == set(targets.CLASS_TRITON)
    assert len(by_target["class-time"]) == 2 * len(targets.CLASS_TRITON)
    for p in by_target["class-time"] + by_target["class-mem"]:
        assert p["status"] == "PASS", p
        provider, dtype = p["subject"].split()[0], p["subject"].split()[5]
        row = rows[(provider, dtype)]
        field = "time_ratio" if p["target"] == "class-time" else "mem_ratio"
        assert float(p["measure"].rstrip("x")) == pytest.approx(row[field], rel=5e-3)  # 3 digits
        assert row[field] > 0
    assert {r["dtype"] for r in rows.values()} == {"bf16", "autocast_bf16"}
    assert [p["status"] for p in by_target["pair-time"]] == ["PASS"], by_target["pair-time"]
    for p in by_target["class-operands"]:  # bf16 operands for bf16 input and autocast(bf16)
        assert "want bfloat16" in p["detail"]

    # The deliberately impossible limit.
    (spec,) = by_target["kernel-specialisations"]
    assert spec["status"] == "FAIL" and spec["op"] == ">"
    assert int(spec["measure"].split()[0]) == result["specialisations"]["count"] > 1
    # The check's verdict, and what quick leaves out of its budget, said as a SKIP.
    assert [p["status"] for p in by_target["selfcheck"]] == ["PASS", "SKIP"]
    assert "outside the quick budget" in by_target["selfcheck"][1]["detail"]
    assert [p["status"] for p in by_target["cuda-tests"]] == ["PASS"]
    assert [p["status"] for p in by_target["memcheck"]] == ["SKIP"]  # no sanitizer on CPU
    assert "SELF-CHECK class_lse: PASS" in stdout
    # The pytest plugin that counts the CUDA tests' specialisations ran and reported.
    assert "Triton kernel specialisations launched by the tests: " in stdout

    fails = sum(p["status"] == "FAIL" for p in parsed)
    assert fails == 1 + len(by_target["class-operands"]) - sum(
        p["status"] == "PASS" for p in by_target["class-operands"]
    )
    assert proc.returncode == fails, stdout
    summary = stdout.strip().splitlines()[-1]
    # SKIPs: memcheck (no sanitizer on CPU) and the self-check's dtypes outside quick.
    assert summary.startswith("targets: ") and f"{fails} FAIL" in summary and "2 SKIP" in summary


# ------------------------------------------------------ verdicts on synthetic input


def test_line_format_round_trips():
    o = checks.judge("class-time", "arcface_triton class B=8 bf16 fwd+bwd", 1.25, 1.5, "x", "d")
    assert o.status == "PASS"
    p = checks.parse_line(o.line())
    assert p["status"] == "PASS" and p["measure"] == "1.25x" and p["op"] == "<="
    assert p["limit"] == "1.5x" and p["subject"] == "arcface_triton class B=8 bf16 fwd+bwd"
    bad = checks.judge("memcheck", "compute-sanitizer", 3, 0, "errors")
    assert bad.status == "FAIL" and checks.parse_line(bad.line())["op"] == ">"
    none = checks.judge("pair-time", "x", None, 3.0)
    assert none.status == "FAIL" and checks.parse_line(none.line())["measure"] == "-"
    assert checks.parse_line("=== targets: python3 ...") is None
    with pytest.raises(ValueError, match="status"):
        checks.Outcome("MAYBE", "t", "s", 1.0, 1.0).line()


@pytest.mark.parametrize(
    "log,rc,status",
    [
        ("....\n4 passed, 2 skipped in 3.1s\n", 0, "PASS"),
        ("..F.\n1 failed, 3 passed in 3.1s\n", 1, "FAIL"),
        ("E\n1 error in 0.3s\n", 1, "FAIL"),
        ("ssss\n4 skipped in 0.2s\n", 0, "FAIL"),  # nothing verified
        ("no tests ran in 0.01s\n", 5, "FAIL"),
        ("Segmentation fault\n", 139, "FAIL"),  # crashed before any summary
    ],
)
def test_pytest_verdict(log, rc, status):
    assert checks.pytest_outcome(log, rc).status == status


def test_memcheck_and_selfcheck_verdicts():
    ok = "3 passed in 9.0s\n========= ERROR SUMMARY: 0 errors\n"
    assert checks.memcheck_outcome(ok, 0).status == "PASS"
    bad = "3 passed in 9.0s\n========= ERROR SUMMARY: 2 errors\n"
    assert checks.memcheck_outcome(bad, 1).status == "FAIL"
    assert checks.memcheck_outcome("3 passed in 9.0s\n", 0).status == "FAIL"  # no summary
    assert checks.memcheck_outcome(ok, 0, sanitizer=False).status == "SKIP"

    good = "SELF-CHECK class: PASS 0.2 s\nSELF-CHECK pair: PASS 0.1 s\n"
    assert checks.selfcheck_outcome(good, 0).status == "PASS"
    assert checks.selfcheck_outcome(good.replace("pair: PASS", "pair: FAIL"), 1).status == "FAIL"
    assert checks.selfcheck_outcome(good, 1).status == "FAIL"  # exit status counts
    assert checks.selfcheck_outcome("", 0).status == "FAIL"  # said nothing


def test_speed_step_crash_is_a_fail():
    passing = checks.judge("pair-time", "s", 2.0, 3.0).line()
    assert checks.target_lines(passing + "\n", 0) == [passing]
    crashed = checks.target_lines(passing + "\nTraceback ...\nRuntimeError: boom\n", 1)
    assert len(crashed) == 2 and crashed[-1].startswith("FAIL speed-targets")
    assert "boom" in crashed[-1]
    assert checks.target_lines("Traceback\n", 1)[0].startswith("FAIL speed-targets")


def test_summary_counts_and_exit_status():
    lines = [
        checks.judge("a", "s", 1.0, 2.0).line(),
        checks.judge("b", "s", 3.0, 2.0).line(),
        checks.Outcome("SKIP", "c", "s", None, 0, "errors", "tool missing").line(),
        "unrelated output",
    ]
    text, failed = checks.summary(lines)
    assert failed == 1 and text == "targets: 1 PASS, 1 FAIL, 1 SKIP (not verified)"
    assert checks.summary(["nothing"])[1] == 1  # no target line at all is a failure


def _row(provider, level="class", dtype="bf16", **fields):
    row = dict(level=level, B=8, D=4, C=16 if level == "class" else None, dtype=dtype,
               provider=provider, mode="fwd+bwd", status="ok", reason="", time_ms=3.0,
               floor_time_ms=2.0, time_ratio=1.5, extra_mem_bytes=150, floor_mem_bytes=100,
               mem_ratio=1.5, mem_source="cuda", kernels=[])  # fmt: skip
    row.update(fields)
    return row


def test_targets_judge_each_row_against_its_limit():
    rows = [
        _row("arcface_triton", time_ratio=1.5, mem_ratio=1.2),  # at the limit: PASS
        _row("cosface_triton", time_ratio=1.51, mem_ratio=1.6),
        _row("sparse_circle_triton", status="skipped", reason="time budget", time_ratio=None),
        _row("sparse_circle_torch", time_ratio=9.0),  # not a target provider
        _row("pair_circle_triton", level="pair", time_ratio=2.9),
    ]
    out = {(o.target, o.subject.split()[0]): o for o in targets.evaluate(rows)}
    assert out[("class-time", "arcface_triton")].status == "PASS"
    assert out[("class-time", "cosface_triton")].status == "FAIL"
    assert out[("class-mem", "arcface_triton")].status == "PASS"
    assert out[("class-mem", "cosface_triton")].status == "FAIL"
    skipped = out[("class-time", "sparse_circle_triton")]
    assert skipped.status == "FAIL" and "time budget" in skipped.detail
    assert ("class-time", "sparse_circle_torch") not in out
    assert out[("pair-time", "pair_circle_triton")].status == "PASS"
    # Limits can be overridden, and an unknown one is refused.
    loose = targets.evaluate(rows, targets.parse_limits("class-time=2,class-mem=2"))
    assert {o.status for o in loose if o.subject.startswith("cosface")} == {"PASS"}
    with pytest.raises(ValueError, match="class-speed"):
        targets.parse_limits("class-speed=2")
    # No row at all for a target: FAIL, not silence.
    missing = targets.evaluate([_row("arcface_triton")])
    assert [o.status for o in missing if o.target == "pair-time"] == ["FAIL"]


def test_operand_target_reads_the_kernels_op_dtype():
    key = "class_lse_triton._fwd_kernel[KIND=2,OP_DTYPE=triton.language.{},BLOCK_M=64](X:float32)"
    rows = [
        _row("arcface_triton", dtype="bf16", kernels=[key.format("bfloat16")]),
        _row("cosface_triton", dtype="autocast_bf16", kernels=[key.format("float32")]),
        _row("curricular_triton", dtype="fp32", kernels=[key.format("float32")]),
        _row("sparse_circle_triton", dtype="bf16", kernels=[]),
    ]
    out = {o.subject.split()[0]: o for o in targets.operand_outcomes(rows)}
    assert out["arcface_triton"].status == "PASS"
    assert out["cosface_triton"].status == "FAIL"  # autocast(bf16) ran fp32 operands
    assert out["curricular_triton"].status == "PASS"
    assert out["sparse_circle_triton"].status == "FAIL"  # nothing recorded: not verified


@needs_bash
@pytest.mark.slow  # ~20 s of CPU
def test_cpu_rehearsal_of_the_full_steps(tmp_path):
    """``full``: the speed grid and the one-rank training run (gloo on the CPU)."""
    env = dict(
        os.environ,
        GPU_CHECKS_CPU="1",
        GPU_CHECKS_SPEED_ARGS="--providers sparse_circle_torch,pml_circle --modes fwd+bwd",
    )
    proc = subprocess.run(
        ["bash", SCRIPT, str(tmp_path), "full"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    parsed = checks.parse_lines(proc.stdout)
    assert [(p["status"], p["target"], p["subject"]) for p in parsed] == [
        ("PASS", "step", "speed"),
        ("PASS", "step", "nccl_one_rank"),
    ], proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0
    rows = json.loads((tmp_path / "cpu.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"floor", "sparse_circle_torch", "pml_circle"}
    assert all(r["status"] == "ok" and r["time_ratio"] > 0 for r in rows)
    assert "eval:" in (tmp_path / "nccl_one_rank.log").read_text()


def test_memcheck_covers_bf16_class_and_pair_kernels_without_the_caching_allocator():
    """Issue 21: memcheck sanitizes a class loss and the pair kernels in bf16 (the wgmma
    code), not only float32, and without the caching allocator (whose blocks would hide
    an out-of-bounds access)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + _selection("memcheck_sel"),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    bf16 = [i for i in ids if "bfloat16" in i]
    assert any("sparse_circle" in i for i in bf16) and any("pair_circle" in i for i in bf16), ids
    text = open(SCRIPT).read().replace("\\\n", " ")
    memcheck = [ln for ln in text.splitlines() if ln.strip().startswith("if step memcheck")]
    assert memcheck and "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in memcheck[0], memcheck


@pytest.mark.parametrize(
    "budget, skipped",
    [({"PML_EXTRAS_SPECIALISATION_BUDGET": "0"}, True), ({}, False)],
    ids=["budget-0", "no-budget"],
)
def test_pytest_plugin_skips_what_does_not_fit_the_budget(budget, skipped):
    """The specialisation budget of the CUDA-test step: past it, tests are skipped with a
    "budget:" reason and named on one summary line; without a budget they run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks")]))
    env.pop("PML_EXTRAS_SPECIALISATION_BUDGET", None)
    env.pop("PML_EXTRAS_TEST_SECONDS_BUDGET", None)
    env.update(budget)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    cmd += ["-p", "speed_bench.pytest_plugin", IMPORT_GRAPH_TESTS, "-k", "detectors"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Triton kernel specialisations launched by the tests: " in out, out[-3000:]
    if skipped:
        assert "1 skipped" in out and "budget: 0 kernel specialisations launched" in out, out
        assert f"Skipped to fit the budget: 1 tests ({IMPORT_GRAPH_TESTS}::" in out, out
    else:
        assert "1 passed" in out and "Skipped to fit the budget" not in out, out


def test_device_wheels_cover_what_the_checks_import():
    """benchmarks/device_wheels.sh's list holds every distribution that importing the
    package, its losses, the CUDA tests' modules and the speed benchmark pulls in,
    except torch (on the device already) and what torch brings along (its own
    dependencies and triton). Read from a fresh interpreter's sys.modules: no download."""
    code = (
        "import sys, importlib.metadata as md\n"
        "sys.path[:0] = ['tests', 'benchmarks']\n"
        "import pml_extras, pml_extras.losses, pml_extras.distributed, conftest, reference\n"
        "import speed, selfcheck, hypothesis, pytest\n"
        "dists = md.packages_distributions()\n"
        "names = {d for m in list(sys.modules) for d in dists.get(m.split('.')[0], [])}\n"
        "print('\\n'.join(sorted(names)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {n.lower().replace("_", "-") for n in proc.stdout.split()}
    torch_side = {"torch", "triton", "typing-extensions", "sympy", "mpmath", "networkx"}
    torch_side |= {"jinja2", "markupsafe", "filelock", "fsspec", "setuptools"}
    text = open(os.path.join(ROOT, "benchmarks", "device_wheels.sh")).read()
    listed = {w.split("==")[0].lower() for w in re.findall(r"[\w.-]+==[\w.]+", text)}
    # Imported when present, inside try/except ImportError: colorama (tqdm,
    # torch._inductor), charset-normalizer (numpy.f2py).
    optional = {"colorama", "charset-normalizer"}
    missing = imported - torch_side - optional - listed - {"pml-extras"}
    assert not missing, f"imported on the device but not in device_wheels.sh: {missing}"
    assert {"pytorch-metric-learning", "numpy", "scipy", "pytest", "hypothesis"} <= listed
