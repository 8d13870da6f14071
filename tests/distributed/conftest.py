"""The worker runs the multi-process test files share (one per world size, per session)."""

from __future__ import annotations

import pytest
from _dist_harness import CONFIGS, spawn


@pytest.fixture(scope="session", params=[2, 3], ids=["world2", "world3"])
def run(request, tmp_path_factory):
    """Each rank's results of every scenario of ``_dist_worker.py`` (suites ``SUITES``)."""
    world = request.param
    cfg = CONFIGS[world]
    results = spawn(world, cfg["sizes"], cfg["num_classes"], tmp_path_factory.mktemp(f"w{world}"))
    return dict(world=world, results=results, **cfg)
