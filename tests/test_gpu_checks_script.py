"""benchmarks/gpu_checks.sh only runs on a GPU machine; here we keep it from rotting.

It must parse, name test files that exist, and pass flags that the benchmark scripts'
own parsers accept (a renamed flag would otherwise only show up on a lent GPU).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_checks.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _command(script_name: str) -> list:
    """The arguments the script passes to ``benchmarks/<script_name>``, $vars dropped."""
    text = open(SCRIPT).read().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if f"benchmarks/{script_name}" in ln)
    words = shlex.split(line)
    args = words[words.index(f"benchmarks/{script_name}") + 1 :]
    return [w if "$" not in w else "placeholder" for w in args]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_named_test_files_exist():
    named = re.findall(r"tests/[\w/]+\.py", open(SCRIPT).read())
    assert named, "the script names no test files"
    for path in named:
        assert os.path.isfile(os.path.join(ROOT, path)), path


def test_speed_flags_are_accepted():
    import speed

    args = speed.parse_args(_command("speed.py"))
    assert args.device == "cuda"


def test_distributed_flags_are_accepted():
    import distributed_train

    args = distributed_train.parse_args(_command("distributed_train.py"))
    assert args.backend == "nccl"
