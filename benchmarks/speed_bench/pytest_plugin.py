"""A pytest plugin that counts the Triton kernel specialisations a test run launches, and
can hold the run to a budget of them.

``python -m pytest -p speed_bench.pytest_plugin ...`` (``benchmarks/`` on the path) prints,
in the terminal summary, ``Triton kernel specialisations launched by the tests: N (...)``:
each is one compilation on a GPU, so this is what the CUDA tests' compile time scales with.

Budget (``benchmarks/gpu_checks.sh`` sets it so that its quick run fits its wall time):
``PML_EXTRAS_SPECIALISATION_BUDGET=N`` skips every test that would start once N distinct
specialisations have been launched, and ``PML_EXTRAS_TEST_SECONDS_BUDGET=S`` every test
that would start S seconds after the session began (a test's own compilations cannot be
known before it runs: the budget is checked between tests). Each such test is skipped
with a reason starting ``budget:``, and the summary adds one line,
``Skipped to fit the budget: K tests (...)``, naming them.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional

import pytest

SPECIALISATIONS_ENV = "PML_EXTRAS_SPECIALISATION_BUDGET"
SECONDS_ENV = "PML_EXTRAS_TEST_SECONDS_BUDGET"

_counter = None
_start = 0.0
_skipped: List[str] = []


def _env_number(name: str) -> Optional[float]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise pytest.UsageError(f"{name} must be >= 0, got {raw!r}")
    return value


def pytest_configure(config):
    global _counter, _start
    from .specialisations import SpecialisationCounter

    # Read (and validated) once, before any test runs.
    config._pml_budget = (_env_number(SPECIALISATIONS_ENV), _env_number(SECONDS_ENV))
    _skipped.clear()
    _start = time.monotonic()
    _counter = SpecialisationCounter().__enter__()


def over_budget(count: int, elapsed: float, limits) -> Optional[str]:
    """Why the next test does not fit (None when it does)."""
    most, seconds = limits
    if most is not None and count >= most:
        return f"budget: {count} kernel specialisations launched, budget {most:g}"
    if seconds is not None and elapsed >= seconds:
        return f"budget: {elapsed:.0f} s spent, budget {seconds:g} s"
    return None


def pytest_runtest_setup(item):
    if _counter is None:
        return
    why = over_budget(_counter.count, time.monotonic() - _start, item.config._pml_budget)
    if why:
        _skipped.append(item.nodeid)
        pytest.skip(why)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _counter is None:
        return
    from .specialisations import compiled_variants

    compiled = compiled_variants()
    extra = "" if compiled is None else f"; in Triton's caches: {compiled}"
    terminalreporter.write_line(
        f"Triton kernel specialisations launched by the tests: {_counter.summary()}{extra}"
    )
    if _skipped:
        shown = ", ".join(_skipped[:20]) + (", ..." if len(_skipped) > 20 else "")
        terminalreporter.write_line(f"Skipped to fit the budget: {len(_skipped)} tests ({shown})")


def pytest_unconfigure(config):
    global _counter
    if _counter is not None:
        _counter.__exit__(None, None, None)
        _counter = None
