"""Speed and peak memory of the class-level and pair-level losses at face-recognition scale.

The entry point of the speed benchmark; the code is the ``speed_bench`` package next to this
file (setups, providers, timing, sweep, report, targets: see its docstring for the method).
Every figure is a ratio to the bare matmuls of the same shapes measured in the same run.

Run ``python benchmarks/speed.py`` for the device's default grid, ``--preset quick`` for the
issue's targets as PASS/FAIL lines; ``--help`` lists every flag, with examples.

With ``--check`` (``--preset quick`` sets it) the exit status is the number of failed
targets.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from speed_bench.cli import main, parse_args  # noqa: E402
from speed_bench.providers import PAIR_PROVIDERS, PROVIDERS, Case, Provider  # noqa: E402
from speed_bench.setups import DTYPES, MODES, Inputs, Setup  # noqa: E402

__all__ = [
    "DTYPES",
    "MODES",
    "PAIR_PROVIDERS",
    "PROVIDERS",
    "Case",
    "Inputs",
    "Provider",
    "Setup",
    "main",
    "parse_args",
]

if __name__ == "__main__":
    result = main()
    sys.exit(min(result.get("failed_targets", 0), 100))
