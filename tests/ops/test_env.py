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
