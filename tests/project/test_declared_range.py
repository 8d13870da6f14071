"""Declared range = tested range: the floors in pyproject.toml are the pair .ci/oldest
installs, README.md states the same floors, and the Python floor is the one CI runs."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OLDEST = (ROOT / ".ci" / "oldest").read_text()
README = (ROOT / "README.md").read_text()


def floor(name: str) -> str:
    """The lower bound ``name>=X`` in the package's dependencies."""
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}>=([0-9.]+)(,<[0-9.]+)?", dep.replace(" ", ""))
        if m:
            return m.group(1)
    raise AssertionError(f"no {name}>=... in pyproject.toml's dependencies")


def oldest_pin(var: str) -> str:
    m = re.search(rf'^{var}="([0-9.]+)"$', OLDEST, flags=re.M)
    assert m, f"{var} not set in .ci/oldest"
    return m.group(1)


def test_oldest_job_installs_the_declared_floors():
    for name, var in [("torch", "OLDEST_TORCH"), ("pytorch-metric-learning", "OLDEST_PML")]:
        pin, low = oldest_pin(var), floor(name)
        # A patch release of the floor's minor: torch 2.4.1 tests torch>=2.4.
        assert pin.split(".")[:2] == low.split(".")[:2], (name, pin, low)
        assert f'"{name}==${var}"' in OLDEST


def test_oldest_job_runs_the_core_in_its_own_venv():
    assert "-m pytest -q -m core" in OLDEST
    assert ".venv-ci-oldest" in OLDEST
    assert ".venv-ci-oldest/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "bash .ci/oldest" in (ROOT / ".ci" / "run").read_text()


def test_readme_states_the_floors():
    line = (
        f"Requires Python ≥ {PYPROJECT['project']['requires-python'].removeprefix('>=')}, "
        f"torch ≥ {floor('torch')} and pytorch-metric-learning ≥ "
        f"{floor('pytorch-metric-learning')}, < 3."
    )
    assert line in " ".join(README.split()), line
    pair = f"torch {oldest_pin('OLDEST_TORCH')} with PML {oldest_pin('OLDEST_PML')}"
    assert pair in " ".join(README.split()), pair


def test_python_floor_is_what_ci_runs():
    py = PYPROJECT["project"]["requires-python"]
    assert py == ">=3.11", py  # CI runs 3.11 only; a lower floor would be untested
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    assert sys.version_info[:2] >= (3, 11)
