"""pml_extras/_env.py: the one home of version / device strings and peak memory, which the
self-check and both benchmarks read (issue 19)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from pml_extras import _env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_versions_and_device_strings():
    v = _env.versions()
    assert v["torch"] == torch.__version__ and v["cuda"] == torch.version.cuda
    import pytorch_metric_learning

    assert v["pytorch_metric_learning"] == pytorch_metric_learning.__version__
    line = _env.versions_line()
    assert line.startswith("triton ") and f"torch {torch.__version__}" in line
    assert _env.device_description(torch.device("cpu")).endswith("(Triton interpreter)")
    assert _env.device_name(torch.device("cpu")) == _env.cpu_model() != ""


def test_every_reader_delegates_to_the_one_home():
    from retrieval_bench import env as retrieval_env
    from speed_bench import report

    from pml_extras.ops import kernel_check

    shared = _env.versions()
    for reader in (report.versions(), retrieval_env.versions()):
        for key in ("torch", "pytorch_metric_learning", "python"):
            assert reader[key] == shared[key], (key, reader)
    assert kernel_check.versions() == _env.versions_line()
    cpu = torch.device("cpu")
    assert kernel_check.device_description(cpu) == _env.device_description(cpu)
    assert report.device_name(cpu) == _env.device_name(cpu)
    assert _env.cpu_model() in retrieval_env.device_name(cpu)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_rss_sees_an_allocation():
    import mmap

    _env.reset_peak_rss()
    before = _env.proc_status_kb("VmRSS") * 1024
    # 64 MiB of fresh anonymous pages, each touched. (A malloc'd array can reuse pages a
    # long-running process already holds, so RSS need not grow: the test flaked in the
    # full suite that way.)
    block = mmap.mmap(-1, 64 << 20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    peak = _env.peak_rss_bytes()
    block.close()
    assert peak - before >= 60 << 20, (peak, before)
    with pytest.raises(KeyError):
        _env.proc_status_kb("NoSuchField")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_rss_growth_counts_the_block_and_not_what_was_held_before():
    import mmap

    def touched(size):
        block = mmap.mmap(-1, size)  # fresh anonymous pages (see the test above)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        return block

    touched(160 << 20).close()  # an earlier, higher peak: the reset on entry forgets it
    held = touched(64 << 20)  # resident before the block: not its growth
    with _env.PeakRSSGrowth() as quiet:
        pass
    with _env.PeakRSSGrowth() as busy:
        inner = touched(48 << 20)
        inner.close()  # freed inside: the peak still counts it
    held.close()
    assert quiet.reset and quiet.method == "VmHWM after clear_refs"
    assert 0 <= quiet.bytes < 8 << 20, quiet.bytes
    assert 44 << 20 <= busy.bytes < 64 << 20, busy.bytes
    assert busy.peak - busy.before == busy.bytes


def test_peak_memory_is_measured_only_in_env():
    """One home: no other module of the package or the benchmarks reads the RSS high-water
    mark, resets it, or reads CUDA's peak allocation itself."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    home = root / "pml_extras" / "_env.py"
    offenders = []
    for path in sorted([*root.glob("pml_extras/**/*.py"), *root.glob("benchmarks/**/*.py")]):
        if path == home:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            found = None
            if isinstance(node, ast.Attribute) and node.attr in (
                "ru_maxrss",
                "max_memory_allocated",
            ):
                found = node.attr
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith(("VmHWM", "VmRSS", "/proc/self/clear_refs")):
                    found = node.value
            if found:
                offenders.append(f"{path.relative_to(root)}:{node.lineno}: {found}")
    assert offenders == []
