"""Shared pytest / hypothesis configuration.

The suite's core (``-m core``): the test files that CI also runs on the oldest torch / PML
pair that ``pyproject.toml`` declares (``.ci/oldest``), listed in ``CORE_FILES`` below.

Profiles (select with HYPOTHESIS_PROFILE=<name>; "ci" is the default):

* ``ci``: deadline off, 30 examples, derandomised so that CI runs are reproducible.
* ``dev``: a quick local loop, 10 examples.
* ``explore``: random (not derandomised) search with many more examples, for hunting bugs.
* ``mutation``: like ``ci`` without shrinking or the example database, for quick
  "does the suite notice this deliberate bug" runs.
* ``oldest``: like ``ci`` with 10 examples, for the core on the oldest torch / PML pair.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

# The test modules import the naive references (``import reference``) and the other
# helpers of tests/helpers/ by their names.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

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
# The oldest-pair job (.ci/oldest): like ci with fewer examples. It checks that the code
# runs right on old torch / PML, not the search depth the main suite already has.
settings.register_profile("oldest", max_examples=10, derandomize=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _subnormals_stay_representable():
    """torch 2.4's inductor builds its CPU kernels with -ffast-math, and loading one sets
    the thread's flush-to-zero / denormals-are-zero bits for the rest of the process (seen
    on 2.4.1, not on 2.13). Every later test would then run without subnormals, and
    hypothesis refuses to draw floats at all. Restore IEEE arithmetic after such a test."""
    yield
    if sys.float_info.min / 2 == 0.0:
        torch.set_flush_denormal(False)


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


# The suite's core, marked ``core``: the losses, PML integration, torch.compile and the
# distributed layer. CI runs ``pytest -m core`` on the oldest declared torch / PML pair
# (.ci/oldest), within about 4 minutes on 2 cores. Base names, so that moving a file into a
# folder keeps it in the core; a name that matches no file is an error, not a silent skip.
CORE_FILES = frozenset(
    {
        "test_bad_input.py",
        "test_center_losses.py",
        "test_class_circle.py",
        "test_class_lse_op.py",
        "test_compat.py",
        "test_compile.py",
        "test_curricular_face.py",
        "test_distributed_clip.py",
        "test_sharded_losses.py",
        "test_wrapper_gradients.py",
        "test_reshard.py",
        "test_distributed_recipe.py",
        "test_distributed_sync.py",
        "test_margin_losses.py",
        "test_margin_losses_in_pml.py",
        "test_proxy_loss_base.py",
        "test_pair_circle_loss.py",
        "test_pair_circle_mined.py",
        "test_pair_gather.py",
        "test_fixed_order.py",
        "test_pml_integration.py",
    }
)


# Left out of the core (the main suite still runs them): the 3-rank repeats of the 2-rank
# distributed runs and the largest numerics-only shapes, which reach no version-dependent
# code that the cases kept do not.
CORE_LEAVE_OUT = ("[world3", "test_class_vs_pair_odd_shapes[401-")


def pytest_configure(config):
    here = Path(__file__).resolve().parent
    found = {p.name for p in here.rglob("test_*.py")}
    missing = sorted(CORE_FILES - found)
    if missing:
        raise pytest.UsageError(
            f"tests/conftest.py CORE_FILES names test files that do not exist: {missing}"
        )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in CORE_FILES and not any(k in item.nodeid for k in CORE_LEAVE_OUT):
            item.add_marker(pytest.mark.core)
