"""The fused kernels' self-check on the real kernels (classes ``TestInterpreted*``), in a
child pytest process under ``TRITON_INTERPRET=1`` started by ``test_interpreter_selfcheck_suite``
(the variable must be set before triton is imported; see tests/ops/test_class_lse_triton.py).
There the private hook ``dispatch._interpreter_as_device`` makes impl="auto" treat the
CPU as a Triton device, so the whole path runs as it would on a GPU:

    TRITON_INTERPRET=1 python -m pytest tests/ops/test_selfcheck_real_kernels.py -k Interpreted

The dispatch logic with a stand-in check: test_selfcheck.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

_CHILD = "PML_EXTRAS_SELFCHECK_CHILD"
if os.environ.get(_CHILD) == "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pml_extras.ops import class_lse, dispatch, pair_circle  # noqa: E402
from pml_extras.ops import kernel_check as selfcheck  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401, E402

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a test dependency on Linux
    HAVE_TRITON = False

interpreted = pytest.mark.skipif(
    not INTERPRET or not HAVE_TRITON,
    reason="runs in a TRITON_INTERPRET=1 child process (test_interpreter_selfcheck_suite)",
)
from selfcheck_fixtures import fresh_dispatch, load_script  # noqa: E402, F401 (autouse)

# ------------------------------------------------------- the real check (interpreter)


def test_interpreter_selfcheck_suite():
    if INTERPRET:
        pytest.skip("already under TRITON_INTERPRET=1: the interpreter tests run directly")
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **{_CHILD: "1"})
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-rfEs"]
    cmd += ["-p", "no:cacheprovider", "-o", "addopts=", "-k", "Interpreted", "--durations=5"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    passed = re.search(r"(\d+) passed", summary)
    assert proc.returncode == 0, f"interpreter tests failed:\n{out[-8000:]}"
    assert passed and int(passed.group(1)) >= 8, f"too few interpreter tests ran:\n{out[-4000:]}"
    assert not re.search(r"\d+ (skipped|failed|error)", summary), out[-4000:]


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn, change=None):
        self.fn, self.change, self.calls = fn, change, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self.fn(*args, **kwargs)
        return out if self.change is None else self.change(out)


@pytest.fixture
def hook(monkeypatch):
    """impl="auto" treats this CPU (under the interpreter) as a Triton device; the check
    calls are counted."""
    monkeypatch.setattr(dispatch, "_interpreter_as_device", True)
    counter = Counter(selfcheck.run_kernel_check)
    monkeypatch.setattr(selfcheck, "run_kernel_check", counter)
    return counter


def _class_case(B=9, D=16, C=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dtype).requires_grad_()
    W = torch.randn(D, C, generator=g).requires_grad_()
    return x, W, torch.randint(0, C, (B,), generator=g)


def _class_loss(x, W, t, impl="auto", kind="scaled"):
    lse, cos_y = class_lse.class_logsumexp(x, W, t, kind, 16.0, 0.25, impl=impl)
    return (lse - 2.0 * cos_y).sum()


def _one_kind(monkeypatch):
    """The perturbation tests need to show the check catches a change, not cover every
    transform: one kind keeps them a second each under the interpreter."""
    monkeypatch.setattr(selfcheck, "_CLASS_KINDS", {"scaled": selfcheck._CLASS_KINDS["scaled"]})


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("sms", [4, 108, 132, 144])
def test_training_problem_has_the_production_specialisations(monkeypatch, sms):
    """Issue 21: the check's training-shaped problem compiles what training runs: D, B, C
    multiples of 16 (D = 512 on a GPU), several class splits of more than one tile each
    in the forward with u (bf16 and fp32 W) and without (NEED_U=False), and more than
    one column tile per split in the pair forward; for the interpreter's 4 "SMs" and
    A100 / H100 / H200-like counts (the split arithmetic is the launchers' own)."""
    import triton

    from pml_extras.ops import _triton_common as tc
    from pml_extras.ops import class_lse_triton as clt
    from pml_extras.ops import pair_circle_triton as pct

    for module in (tc, clt, pct):
        monkeypatch.setattr(module, "sm_count", lambda device: sms)
    device = torch.device("cpu") if sms == 4 else torch.device("cuda", 0)
    shapes = selfcheck.production_shapes(device)
    B, D, C = shapes["class"]
    assert B % 16 == D % 16 == C % 16 == 0 and (D == 512) == (device.type == "cuda")
    cfg = clt._configs.current
    for need_u, itemsize in [(True, 2), (True, 4), (False, 2), (False, 4)]:
        _, _, n_groups = clt._d_layout(D, cfg, itemsize == 4)
        n_groups = n_groups if need_u else 1
        splits, per_split = clt._n_splits(B, C, n_groups, need_u, itemsize, device, cfg)
        assert splits > 1 and per_split > 1, (need_u, itemsize, splits, per_split)
    rows, d = shapes["pair"]
    assert rows % 16 == d % 16 == 0
    pcfg = pct._configs.current
    n_rows, n_tiles = triton.cdiv(rows, pcfg.fwd_block_m), triton.cdiv(rows, pcfg.fwd_block_n)
    splits, per_split = pct._splits(n_rows, n_tiles, False, device, pcfg)
    assert splits > 1 and per_split > 1, (splits, per_split)


@interpreted
class TestInterpretedCheck:
    def test_correct_class_kernels_pass_and_are_used(self, hook, monkeypatch):
        import torch.distributed as dist

        from pml_extras.ops import class_lse_triton as clt

        # No collective may run during the check (every rank checks alone).
        for name in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_into_tensor"):
            monkeypatch.setattr(dist, name, lambda *a, **k: pytest.fail("collective in check"))
        rng = torch.get_rng_state()
        fwd = Counter(clt.forward)
        monkeypatch.setattr(clt, "forward", fwd)
        x, W, t = _class_case()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _class_loss(x, W, t).backward()
        assert hook.calls == 1
        (result,) = dispatch.kernel_check_results().values()
        assert result.passed and result.family == "class_lse" and result.dtype == "float32"
        assert 0 < result.max_rel_err <= result.tolerance == 1e-4
        # Every kind: the edge problem's lse, cos_y, grad_x, grad_W (2 parts), the training
        # problem's lse, cos_y, grad_x, grad_W and its no-grad lse and cos_y.
        assert len(result.errors) == 3 * 5 + 3 * 6
        assert torch.equal(torch.get_rng_state(), rng)  # the user's RNG is untouched
        used = fwd.calls  # the check's 3 kinds x (1 + 2) forwards, then the user's call
        assert used == 10
        for _ in range(3):  # trusted from now on: no further check
            _class_loss(x, W, t).backward()
        assert hook.calls == 1 and fwd.calls == used + 3
        # Same numbers as the PyTorch path (the user's call went to the kernels).
        x2, W2 = x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
        torch.testing.assert_close(
            _class_loss(x.detach(), W.detach(), t), _class_loss(x2, W2, t, impl="torch")
        )

    def test_correct_pair_kernels_pass_and_are_used(self, hook, monkeypatch):
        from pml_extras.ops import pair_circle_triton as pct

        fwd = Counter(pct.forward)
        monkeypatch.setattr(pct, "forward", fwd)
        e = F.normalize(torch.randn(10, 16, generator=torch.Generator().manual_seed(1)), dim=1)
        labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 0])
        opts = dict(self_compare=True, operand_dtype=torch.float16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = pair_circle.all_pairs_circle_loss(e, e, labels, labels, **opts)
        assert hook.calls == 1 and fwd.calls == 6  # the check's 3 + 2 (training), then ours
        (result,) = dispatch.kernel_check_results().values()
        assert result.passed and (result.family, result.dtype) == ("pair_circle", "float16")
        pair_circle.all_pairs_circle_loss(e, e, labels, labels, **opts)
        assert hook.calls == 1 and fwd.calls == 7
        want = pair_circle.all_pairs_circle_loss(e, e, labels, labels, **opts, impl="torch")
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)

    def test_perturbed_loss_falls_back_and_triton_raises(self, hook, monkeypatch):
        from pml_extras.ops import class_lse_triton as clt

        _one_kind(monkeypatch)
        bump = lambda out: (out[0] * (1 + 1e-3), *out[1:])  # noqa: E731
        fwd = Counter(clt.forward, bump)
        monkeypatch.setattr(clt, "forward", fwd)
        x, W, t = _class_case()
        with pytest.raises(dispatch.KernelCheckError) as err:
            _class_loss(x, W, t, impl="triton")
        msg = str(err.value)
        # The perturbed lse, and through it the gradients (the backward reuses lse).
        # (the worst output may be the edge problem's or the training-shaped one's)
        assert re.search(r"max relative error \d\.\d\de-0\d in (training\.)?scaled\.", msg), msg
        assert "scaled.lse 1.00e-03" in msg and "tolerance 1e-04" in msg, msg
        assert "(Triton interpreter)" in msg and f"torch {torch.__version__}" in msg
        assert "triton " in msg and "report" in msg
        with pytest.warns(dispatch.KernelCheckWarning, match=r"scaled\.lse 1\.00e-03"):
            loss = _class_loss(x, W, t)
        assert hook.calls == 1
        calls = fwd.calls
        loss.backward()
        _class_loss(x, W, t).backward()  # no second warning (the fixture would not mind,
        assert fwd.calls == calls and hook.calls == 1  # but the kernels stay unused)
        torch.testing.assert_close(loss, _class_loss(x, W, t, impl="torch"), rtol=0, atol=0)

    def test_perturbed_gradient_falls_back(self, hook, monkeypatch):
        from pml_extras.ops import class_lse_triton as clt

        _one_kind(monkeypatch)

        def bump(out):
            grad_x, grad_w = out
            grad_w = grad_w.clone()
            grad_w[3, 32] += 0.1 * grad_w.abs().max()  # one entry, on a tile edge
            return grad_x, grad_w

        monkeypatch.setattr(clt, "backward", Counter(clt.backward, bump))
        x, W, t = _class_case(dtype=torch.bfloat16)
        with pytest.warns(dispatch.KernelCheckWarning) as record:
            assert (
                dispatch.resolve_impl(
                    "auto",
                    x.device,
                    torch.float32,
                    family="class_lse",
                    operand=torch.bfloat16,
                    storage=W.dtype,  # as class_logsumexp passes it: the same key
                )
                == "torch"
            )
        msg = str(record[0].message)
        assert re.search(r"in (training\.)?scaled\.grad_W ", msg) and "bfloat16" in msg, msg
        with pytest.raises(dispatch.KernelCheckError, match="scaled.grad_W"):
            _class_loss(x, W, t, impl="triton")
        # float32 operands are another key: checked (and failed) on their own.
        with pytest.warns(dispatch.KernelCheckWarning, match="float32"):
            _class_loss(x.detach().float(), W, t)
        assert hook.calls == 2

    def test_compile_failure_falls_back_and_triton_raises(self, hook, monkeypatch):
        from pml_extras.ops import class_lse_triton as clt
        from pml_extras.ops import pair_circle_triton as pct

        def broken(*args, **kwargs):
            raise RuntimeError("PTX assembly aborted (simulated)\nptxas fatal: sm_75")

        monkeypatch.setattr(clt, "forward", broken)
        monkeypatch.setattr(pct, "forward", broken)
        x, W, t = _class_case()
        with pytest.warns(dispatch.KernelCheckWarning, match="failed to compile or run") as rec:
            loss = _class_loss(x, W, t)
        assert rec[0].filename == __file__  # attributed to the caller's line, not ours
        assert "RuntimeError: PTX assembly aborted (simulated) | ptxas fatal" in str(rec[0].message)
        loss.backward()  # the PyTorch path
        with pytest.raises(dispatch.KernelCheckError, match="PTX assembly aborted"):
            _class_loss(x, W, t, impl="triton")
        e = F.normalize(torch.randn(6, 8), dim=1)
        labels = torch.tensor([0, 0, 1, 1, 2, 2])
        with pytest.warns(dispatch.KernelCheckWarning, match="pair_circle"):
            got = pair_circle.all_pairs_circle_loss(e, e, labels, labels, self_compare=True)
        want = pair_circle.all_pairs_circle_loss(
            e, e, labels, labels, self_compare=True, impl="torch"
        )
        assert torch.equal(got, want)
        with pytest.raises(dispatch.KernelCheckError, match="simulated"):
            pair_circle.all_pairs_circle_loss(e, e, labels, labels, impl="triton")
        assert hook.calls == 2  # one per family, however many calls

    def test_torch_compile_runs_the_check_once_outside_the_graph(self, hook, monkeypatch):
        _one_kind(monkeypatch)
        x, W, t = _class_case(seed=3)

        def step(x, W, t):
            return _class_loss(x, W, t) * 0.5

        compiled = torch.compile(step, backend="aot_eager")
        grads = []
        for fn in (compiled, step, compiled):
            x.grad = W.grad = None
            loss = fn(x, W, t)
            loss.backward()
            grads.append((loss.detach(), x.grad.clone(), W.grad.clone()))
        assert hook.calls == 1
        (result,) = dispatch.kernel_check_results().values()
        assert result.passed
        for got in (grads[0], grads[2]):
            for a, b in zip(got, grads[1]):
                torch.testing.assert_close(a, b)

    def test_check_ignores_the_callers_context(self, hook, monkeypatch):
        # Under no_grad / inference_mode / autocast the check still runs forward and
        # backward on the exact operand dtype.
        _one_kind(monkeypatch)
        x, W, t = _class_case()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            lse, _ = class_lse.class_logsumexp(x.detach(), W.detach(), t, "scaled", 16.0)
        assert hook.calls == 1 and lse.dtype == torch.float32
        (((_, _, dtype, _, storage), result),) = dispatch.kernel_check_results().items()
        assert storage == torch.float32  # W's dtype is in the key
        assert dtype == torch.bfloat16 and result.passed, result.describe()

    def test_check_runs_the_training_specialisations(self, monkeypatch):
        """The launches the check makes: bf16-stored W, D a multiple of 16, the forward
        with and without u (NEED_U=False), each over several splits of more than one
        tile; the pair forward likewise."""
        from pml_extras.ops import class_lse_triton as clt
        from pml_extras.ops import pair_circle_triton as pct

        _one_kind(monkeypatch)
        seen, splits = [], []
        real_fwd, real_n, real_s = clt._forward_impl, clt._n_splits, pct._splits

        def forward_impl(*args):
            seen.append((args[2].dtype, args[9], args[0].shape[1]))
            return real_fwd(*args)

        def n_splits(*args):
            splits.append(("class", args[3], *real_n(*args)))
            return tuple(splits[-1][2:])

        def pair_splits(*args):
            splits.append(("pair", not args[2], *real_s(*args)))
            return tuple(splits[-1][2:])

        monkeypatch.setattr(clt, "_forward_impl", forward_impl)
        monkeypatch.setattr(clt, "_n_splits", n_splits)
        monkeypatch.setattr(pct, "_splits", pair_splits)
        result = selfcheck.run_kernel_check("class_lse", "cpu", torch.bfloat16, torch.bfloat16)
        assert result.passed and result.storage == "bfloat16", result.describe()
        assert "W stored as bfloat16" in result.describe()
        assert {(torch.bfloat16, True, 64), (torch.bfloat16, False, 64)} <= set(seen)
        for need_u in (True, False):
            assert any(s[:2] == ("class", need_u) and min(s[2:]) > 1 for s in splits), splits
        result = selfcheck.run_kernel_check("pair_circle", "cpu", torch.bfloat16)
        assert result.passed, result.describe()
        assert any(s[:2] == ("pair", True) and min(s[2:]) > 1 for s in splits), splits

    def test_script_runs_the_real_check(self, capsys):
        # The script's own code on the real kernels, in this (interpreter) process: a
        # second child would spend most of its time importing torch and triton again.
        script = load_script()
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"selfcheck-{os.getpid()}.json")
        argv = ["--device", "cpu", "--family", "class_lse", "--dtype", "float16", "--out", out]
        assert script.main(argv) == 0
        text = capsys.readouterr().out
        match = re.search(
            r"^SELF-CHECK family=class_lse device=cpu dtype=float16: PASS "
            r"max_rel_err=(\S+) time=(\S+)s$",
            text,
            re.M,
        )
        assert match, text
        assert 0 < float(match.group(1)) <= selfcheck.tolerance("class_lse", torch.float16)
        with open(out) as f:
            (result,) = json.load(f)["results"]
        os.remove(out)
        assert result["passed"] and result["dtype"] == "float16"
