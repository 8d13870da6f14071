"""The fused kernels' self-check (pml_extras/ops/kernel_check.py) and impl dispatch
(pml_extras/ops/dispatch.py) with a stand-in check (this process, no interpreter):
verify once per (family, device, dtype), then trust; fall back with one warning under
impl="auto", raise under impl="triton"; caching keys, warnings and errors, the opt-outs,
impl="torch", the import-failure warning on CUDA, the benchmark script's exit status.

The real check on the real kernels: test_selfcheck_real_kernels.py.
"""

from __future__ import annotations

import json
import re
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from selfcheck_fixtures import fresh_dispatch, load_script  # noqa: F401 (autouse)

from pml_extras.ops import class_lse, dispatch, pair_circle
from pml_extras.ops import kernel_check as selfcheck

# ------------------------------------------------------------- dispatch, stand-in check

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


class FakeCheck:
    """Stands in for selfcheck.run_kernel_check: records calls, fails the listed keys."""

    def __init__(self, failing=()):
        self.calls, self.failing = [], set(failing)

    def __call__(self, family, device, dtype, storage=None):
        self.calls.append((family, str(device), dtype) + ((storage,) if storage else ()))
        bad = (family, dtype) in self.failing
        return selfcheck.KernelCheck(
            family=family,
            device=str(device),
            dtype=selfcheck.dtype_label(dtype),
            passed=not bad,
            max_rel_err=0.37 if bad else 1e-7,
            output="circle.grad_W" if bad else "scaled.lse",
            tolerance=1e-4,
            seconds=0.1,
            device_name="Fake GPU (sm_89)",
            versions="triton 9.9, torch 9.9",
            errors={"circle.grad_W": 0.37 if bad else 1e-7},
        )


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA devices where Triton imports (no device needed: only dispatch is exercised)."""
    monkeypatch.setattr(dispatch, "_import_error", lambda device, family=None: None)
    monkeypatch.setattr(dispatch, "tf32_enabled", lambda: False)

    def install(failing=()):
        fake = FakeCheck(failing)
        monkeypatch.setattr(selfcheck, "run_kernel_check", fake)
        return fake

    return install


def test_check_runs_once_per_family_device_dtype(fake_gpu, monkeypatch):
    fake = fake_gpu()
    for _ in range(3):
        for fam in dispatch.FAMILIES:
            for dev in (CUDA0, CUDA1):
                for dt in (torch.float32, torch.bfloat16):
                    assert dispatch.resolve_impl("auto", dev, dt, family=fam) == "triton"
                    assert dispatch.resolve_impl("triton", dev, dt, family=fam) == "triton"
    assert len(fake.calls) == len(set(fake.calls)) == 2 * 2 * 2
    # TF32 on is another float32 specialisation: checked once more, then cached too.
    monkeypatch.setattr(dispatch, "tf32_enabled", lambda: True)
    for _ in range(2):
        dispatch.resolve_impl("auto", CUDA0, torch.float32, family="class_lse")
    assert len(fake.calls) == 9
    keys = dispatch.kernel_check_results()
    assert ("class_lse", "cuda:0", torch.float32, True, None) in keys and len(keys) == 9


def test_w_storage_dtype_is_in_the_key(fake_gpu):
    """Issue 21: bf16-stored W is another specialisation than float32 W under the same
    bf16 operands: checked once each, and the class op passes W's dtype."""
    fake = fake_gpu()
    for storage in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        dispatch.resolve_impl("auto", CUDA0, torch.bfloat16, family="class_lse", storage=storage)
    assert fake.calls == [
        ("class_lse", "cuda:0", torch.bfloat16, torch.float32),
        ("class_lse", "cuda:0", torch.bfloat16, torch.bfloat16),
    ]
    keys = set(dispatch.kernel_check_results())
    assert {k.storage for k in keys} == {torch.float32, torch.bfloat16}
    # float64 W has no Triton path: no check of its own (the kernels raise for it).
    dispatch.resolve_impl("auto", CUDA0, torch.bfloat16, family="class_lse", storage=torch.float64)
    assert len(fake.calls) == 3 and fake.calls[-1] == ("class_lse", "cuda:0", torch.bfloat16)


def test_operand_dtype_is_the_key(fake_gpu):
    fake = fake_gpu()
    # Promoted dtype float32 (autocast to bf16 operands): checked for bf16.
    dispatch.resolve_impl("auto", CUDA0, torch.float32, family="class_lse", operand=torch.bfloat16)
    assert fake.calls == [("class_lse", "cuda:0", torch.bfloat16)]


def test_auto_falls_back_with_one_warning(fake_gpu):
    fake = fake_gpu(failing=[("class_lse", torch.bfloat16)])
    with pytest.warns(dispatch.KernelCheckWarning) as record:
        assert dispatch.resolve_impl("auto", CUDA0, torch.bfloat16, family="class_lse") == "torch"
    (w,) = record
    text = str(w.message)
    for part in ("3.70e-01", "circle.grad_W", "cuda:0", "Fake GPU (sm_89)", "triton 9.9"):
        assert part in text, (part, text)
    assert "report" in text and "class_lse" in text and "bfloat16" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second check
        for _ in range(3):
            assert dispatch.resolve_impl("auto", CUDA0, torch.bfloat16, family="class_lse") == (
                "torch"
            )
        # Other keys are unaffected.
        assert dispatch.resolve_impl("auto", CUDA0, torch.float32, family="class_lse") == "triton"
        assert dispatch.resolve_impl("auto", CUDA1, torch.float32, family="pair_circle") == (
            "triton"
        )
    assert len(fake.calls) == 3


def test_triton_raises_every_time_with_the_details(fake_gpu):
    fake = fake_gpu(failing=[("pair_circle", torch.float16)])
    for _ in range(2):
        with pytest.raises(dispatch.KernelCheckError, match=r"3\.70e-01 in circle\.grad_W"):
            dispatch.resolve_impl("triton", CUDA0, torch.float16, family="pair_circle")
    assert len(fake.calls) == 1
    # An auto call after the error still warns once (it has not warned yet) and falls back.
    with pytest.warns(dispatch.KernelCheckWarning, match="Fake GPU"):
        assert dispatch.resolve_impl("auto", CUDA0, torch.float16, family="pair_circle") == "torch"


def test_first_check_inside_cuda_graph_capture_is_an_error(fake_gpu, monkeypatch):
    fake = fake_gpu()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
        dispatch.resolve_impl("auto", CUDA0, torch.bfloat16, family="class_lse")
    assert fake.calls == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    dispatch.resolve_impl("auto", CUDA0, torch.bfloat16, family="class_lse")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    # Checked before the capture: the cached outcome is used, nothing runs.
    assert dispatch.resolve_impl("auto", CUDA0, torch.bfloat16, family="class_lse") == "triton"
    assert len(fake.calls) == 1


def test_opt_outs_skip_the_check(fake_gpu, monkeypatch):
    fake = fake_gpu(failing=[("class_lse", torch.float32)])
    monkeypatch.setenv(dispatch.SKIP_ENV, "1")
    assert dispatch.resolve_impl("auto", CUDA0, torch.float32, family="class_lse") == "triton"
    assert dispatch.resolve_impl("triton", CUDA0, torch.float32, family="class_lse") == "triton"
    monkeypatch.setenv(dispatch.SKIP_ENV, "0")  # "0" keeps it on
    with pytest.warns(dispatch.KernelCheckWarning):
        assert dispatch.resolve_impl("auto", CUDA0, torch.float32, family="class_lse") == "torch"
    dispatch._reset()
    monkeypatch.delenv(dispatch.SKIP_ENV)
    monkeypatch.setattr(dispatch, "check_kernels", False)
    assert dispatch.resolve_impl("auto", CUDA0, torch.float32, family="class_lse") == "triton"
    assert len(fake.calls) == 1


def test_torch_float64_and_no_family_never_check(fake_gpu):
    fake = fake_gpu(failing=[(f, d) for f in dispatch.FAMILIES for d in dispatch.CHECK_DTYPES])
    assert dispatch.resolve_impl("torch", CUDA0, torch.float32, family="class_lse") == "torch"
    assert dispatch.resolve_impl("auto", CUDA0, torch.float64, family="class_lse") == "torch"
    assert dispatch.resolve_impl("auto", CUDA0, torch.float32) == "triton"  # no family
    assert fake.calls == []


def test_impl_torch_runs_no_check_end_to_end(monkeypatch):
    def boom(*args):
        raise AssertionError("impl='torch' ran the self-check")

    monkeypatch.setattr(selfcheck, "run_kernel_check", boom)
    monkeypatch.setattr(dispatch, "_interpreter_as_device", True)
    x, W = torch.randn(5, 8, requires_grad=True), torch.randn(8, 11, requires_grad=True)
    lse, cos_y = class_lse.class_logsumexp(x, W, torch.arange(5), "scaled", 8.0, impl="torch")
    (lse.sum() + cos_y.sum()).backward()
    e = F.normalize(torch.randn(6, 8), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pair_circle.all_pairs_circle_loss(e, e, labels, labels, self_compare=True, impl="torch")


def test_auto_on_cpu_stays_torch_without_the_hook(monkeypatch):
    monkeypatch.setattr(selfcheck, "run_kernel_check", FakeCheck([("class_lse", torch.float32)]))
    cpu = torch.device("cpu")
    assert dispatch.resolve_impl("auto", cpu, torch.float32, family="class_lse") == "torch"
    assert not dispatch.kernel_check_results()


def test_class_lse_keeps_its_names():
    # The dispatch functions moved; the old import path stays.
    assert class_lse.resolve_impl is dispatch.resolve_impl
    assert class_lse.triton_available is dispatch.triton_available


@pytest.mark.parametrize("family", dispatch.FAMILIES)
def test_auto_warns_once_when_triton_does_not_import_on_cuda(monkeypatch, family):
    import pml_extras.ops as ops

    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" raises ImportError
    for mod in dispatch.KERNEL_MODULES.values():
        monkeypatch.delitem(sys.modules, mod, raising=False)
        monkeypatch.delattr(ops, mod.rsplit(".", 1)[1], raising=False)
    monkeypatch.setattr(selfcheck, "run_kernel_check", FakeCheck())
    with pytest.warns(dispatch.TritonUnavailableWarning) as record:
        assert dispatch.resolve_impl("auto", CUDA0, torch.float32, family=family) == "torch"
    text = str(record[0].message)
    assert record[0].filename == __file__
    assert dispatch.KERNEL_MODULES[family] in text and "'triton'" in text, text
    assert re.search(r"(ModuleNotFound|Import)Error", text) and "impl='torch'" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_impl("auto", CUDA0, torch.float32, family=family) == "torch"
        assert dispatch.resolve_impl("auto", CUDA1, torch.bfloat16, family=family) == "torch"
    with pytest.raises(RuntimeError, match="triton"):
        dispatch.resolve_impl("triton", CUDA0, torch.float32, family=family)
    assert not dispatch.kernel_check_results()
    # On the CPU "auto" never wanted Triton: nothing to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_impl("auto", torch.device("cpu"), torch.float32) == "torch"


def test_rel_err():
    a = torch.tensor([1.0, 2.0, float("-inf")])
    assert selfcheck.rel_err(a, a) == 0.0
    assert selfcheck.rel_err(a + torch.tensor([0.0, 0.02, 0.0]), a) == pytest.approx(0.01)
    assert selfcheck.rel_err(torch.tensor([1.0, 2.0, 0.0]), a) == float("inf")
    assert selfcheck.rel_err(torch.tensor([1.0, float("nan"), 0.0]), a) != 0.0


# --------------------------------------------------------------------- benchmark script


def test_script_exit_status_and_lines(monkeypatch, capsys, tmp_path):
    script = load_script()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(selfcheck, "run_kernel_check", FakeCheck([("pair_circle", torch.float16)]))
    out = tmp_path / "r.json"
    assert script.main(["--device", "cpu", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith("SELF-CHECK")]
    assert len(lines) == 6
    pattern = (
        r"SELF-CHECK family=(\w+) device=cpu dtype=(\w+): (PASS|FAIL) max_rel_err=\S+ time=\S+s"
    )
    verdicts = {re.match(pattern, ln).groups() for ln in lines}
    assert ("pair_circle", "float16", "FAIL") in verdicts
    assert sum(v[2] == "FAIL" for v in verdicts) == 1
    assert "5 PASS, 1 FAIL" in text
    record = json.loads(out.read_text())
    assert len(record["results"]) == 6 and "torch" in record["versions"]
    assert sum(not r["passed"] for r in record["results"]) == 1
    assert script.main(["--device", "cpu", "--family", "class_lse"]) == 0
    for bad in (["--dtype", "float64"], ["--family", "nope"]):
        with pytest.raises(SystemExit) as exit_:
            script.main(["--device", "cpu", *bad])
        assert exit_.value.code == 2
