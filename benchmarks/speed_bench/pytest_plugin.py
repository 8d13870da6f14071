"""A pytest plugin that counts the Triton kernel specialisations a test run launches.

``python -m pytest -p speed_bench.pytest_plugin ...`` (``benchmarks/`` on the path) prints,
in the terminal summary, ``Triton kernel specialisations launched by the tests: N (...)``:
each is one compilation on a GPU, so this is what the CUDA tests' compile time scales with.
"""

from __future__ import annotations

_counter = None


def pytest_configure(config):
    global _counter
    from .specialisations import SpecialisationCounter

    _counter = SpecialisationCounter().__enter__()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _counter is None:
        return
    from .specialisations import compiled_variants

    compiled = compiled_variants()
    extra = "" if compiled is None else f"; in Triton's caches: {compiled}"
    terminalreporter.write_line(
        f"Triton kernel specialisations launched by the tests: {_counter.summary()}{extra}"
    )


def pytest_unconfigure(config):
    global _counter
    if _counter is not None:
        _counter.__exit__(None, None, None)
        _counter = None
