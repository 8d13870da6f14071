"""Shared pytest / hypothesis configuration.

Profiles (select with HYPOTHESIS_PROFILE=<name>; "ci" is the default):

* ``ci``: deadline off, 30 examples, derandomised so that CI runs are reproducible.
* ``dev``: a quick local loop, 10 examples.
* ``explore``: random (not derandomised) search with many more examples, for hunting bugs.
* ``mutation``: like ``ci`` without shrinking or the example database, for quick
  "does the suite notice this deliberate bug" runs.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

# The test modules import the naive references with ``import reference``.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("explore", max_examples=300, **_COMMON)
# For mutation ("sabotage") runs: same examples as ci, no shrinking, no example database.
settings.register_profile(
    "mutation",
    max_examples=30,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    **_COMMON,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-tensor tests on one intra-op thread.

    On a loaded 2-core machine, OpenMP synchronisation dominates ops on tensors this small
    (10x slower wall time observed). Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
