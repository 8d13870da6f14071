"""pml_extras._compat: the version shims answer what torch.autocast set, in both of their
forms (the device-argument API of torch >= 2.4 and the per-device one before it), eagerly
and inside a fullgraph compile (where a caught TypeError would be a Dynamo error)."""

from __future__ import annotations

import warnings

import pytest
import torch

from pml_extras import _compat


def autocast_state():
    return _compat.is_autocast_enabled("cpu"), _compat.get_autocast_dtype("cpu")


@pytest.fixture(params=["detected", "pre_2_4_form"])
def form(request, monkeypatch):
    if request.param == "pre_2_4_form":
        if not hasattr(torch, "is_autocast_cpu_enabled"):
            pytest.skip("this torch has no per-device autocast functions")
        monkeypatch.setattr(_compat, "_DEVICE_AUTOCAST_API", False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_queries_follow_torch_autocast(form, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the per-device functions
        assert autocast_state()[0] is False
        with torch.autocast("cpu", dtype=dtype):
            assert autocast_state() == (True, dtype)
            with torch.autocast("cpu", enabled=False):
                assert autocast_state()[0] is False
        assert autocast_state()[0] is False
        # No CUDA autocast on a CPU-only run, whatever the CPU state.
        with torch.autocast("cpu", dtype=dtype):
            assert _compat.is_autocast_enabled("cuda") is False


def test_detection_matches_this_torch():
    has_device_arg = True
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:
        has_device_arg = False
    assert _compat._DEVICE_AUTOCAST_API == (has_device_arg and hasattr(torch, "get_autocast_dtype"))


def test_operand_dtype_compiles_fullgraph_under_autocast():
    """The call site (ops.class_lse.operand_dtype) inside a fullgraph compile, under autocast."""
    from pml_extras.ops.class_lse import operand_dtype

    def f(x, w):
        return (x @ w.to(operand_dtype(x, w))).float().sum()

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert operand_dtype(x, w) == torch.bfloat16
        assert torch.equal(compiled(x, w), f(x, w))
    assert operand_dtype(x, w) == torch.float32
    assert torch.equal(compiled(x, w), f(x, w))
