"""Shared by both self-check test modules: the autouse fixture (no cached check, no warning
given, checks enabled, before and after every test) and the benchmark script's loader."""

from __future__ import annotations

import os

import pytest

from pml_extras.ops import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """Every test starts with no cached check and no warning given, checks enabled."""
    dispatch._reset()
    monkeypatch.setattr(dispatch, "check_kernels", True)
    monkeypatch.delenv(dispatch.SKIP_ENV, raising=False)
    yield
    dispatch._reset()


def load_script():
    """benchmarks/selfcheck.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "selfcheck_script", os.path.join(ROOT, "benchmarks", "selfcheck.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
