"""One home for the run environment's descriptions and for peak-memory measurement.

The kernel self-check (in the package) and both benchmarks (speed, retrieval) describe
the device and the versions and measure peak memory; they all read it here, so that a
results file and a bug report name things alike.

* :func:`device_name`: "NVIDIA H100 80GB HBM3", or the CPU's model name;
* :func:`device_description`: the same with the compute capability, "... (sm_90)", or
  "<cpu> (Triton interpreter)" for CPU tensors (what the self-check runs on);
* :func:`versions`: {python, torch, cuda, triton, pytorch_metric_learning, numpy,
  pml_extras}, triton read from its metadata (importing it is slow), missing ones None;
  :func:`versions_line` the short form of a bug report;
* peak memory: on CUDA :func:`cuda_peak_extra_bytes` (``max_memory_allocated`` minus what
  was allocated before); on CPU the process's resident high-water mark,
  :func:`peak_rss_bytes` (``VmHWM``, else ``ru_maxrss``), with :func:`reset_peak_rss`
  (``clear_refs``) and :func:`proc_status_kb`; :class:`PeakRSSGrowth` measures one
  block's growth with them (every CPU memory figure of the benchmarks comes from it), and
  :func:`cuda_peak_bytes` is ``max_memory_allocated``.

Example:
    >>> sorted(versions())[:3]
    ['cuda', 'numpy', 'pml_extras']
    >>> peak_rss_bytes() > 0
    True
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Dict, Optional

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_description(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90)', or the CPU for the Triton interpreter; never
    raises (a broken driver still gets its report)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            major, minor = torch.cuda.get_device_capability(device)
            return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
        except Exception as exc:
            return f"CUDA device {device} (name unavailable: {exc})"
    return f"{platform.processor() or platform.machine() or 'CPU'} (Triton interpreter)"


def _version(distribution: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions() -> Dict[str, Optional[str]]:
    """Versions of what a result depends on; None for what is not installed."""
    # Read from the imported package when there is one (a checkout on PYTHONPATH has no
    # metadata); no import here, so that this module stays a leaf of the import graph.
    package = sys.modules.get("pml_extras")
    ours = getattr(package, "__version__", None) or _version("pml-extras")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "pytorch_metric_learning": _version("pytorch-metric-learning"),
        "numpy": _version("numpy"),
        "pml_extras": ours,
    }


def versions_line() -> str:
    """'triton 3.9.0, torch 2.13.0, CUDA 12.8': the short form for a bug report."""
    v = versions()
    triton_version = v["triton"] or "not installed"
    cuda = f", CUDA {v['cuda']}" if v["cuda"] else ""
    return f"triton {triton_version}, torch {v['torch']}{cuda}"


def proc_status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM); KeyError if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark (``echo 5 > /proc/self/clear_refs``); False
    where the kernel does not allow it (then the peak is the process's lifetime one)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's resident high-water mark: ``VmHWM`` (resettable), else ``ru_maxrss``."""
    try:
        return proc_status_kb("VmHWM") * 1024
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSSGrowth:
    """Context manager: the growth of the resident high-water mark over a block, above the
    resident set before it, in bytes (``.bytes``, after the block).

    It resets the high-water mark on entry (:func:`reset_peak_rss`); where the kernel does
    not allow that, the figure is the process's lifetime peak minus the resident set before
    (``.reset`` is False and ``.method`` says so). Run a warm-up call first (lazy
    initialisation is not the measured code's memory) and pin glibc's mmap threshold
    (``MALLOC_MMAP_THRESHOLD_``) so that freed buffers leave the resident set.

    Example:
        >>> with PeakRSSGrowth() as peak:
        ...     block = bytearray(1 << 20)
        >>> peak.bytes >= 0
        True
    """

    bytes: int = 0

    def __enter__(self) -> PeakRSSGrowth:
        self.reset = reset_peak_rss()
        self.method = (
            "VmHWM after clear_refs" if self.reset else "lifetime peak RSS (clear_refs unavailable)"
        )
        self.before = proc_status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        self.peak = peak_rss_bytes()
        self.bytes = max(0, self.peak - self.before)


def cuda_peak_bytes(device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated(device)``: the peak since the last
    ``torch.cuda.reset_peak_memory_stats``."""
    return int(torch.cuda.max_memory_allocated(device))


def cuda_peak_extra_bytes(device: torch.device, before: int) -> int:
    """Peak bytes allocated on ``device`` above ``before`` (``memory_allocated`` read
    before the measured call, after ``torch.cuda.reset_peak_memory_stats``)."""
    return cuda_peak_bytes(device) - int(before)


def cpu_count() -> Optional[int]:
    return os.cpu_count()


__all__ = [
    "PeakRSSGrowth",
    "cpu_model",
    "cuda_peak_bytes",
    "cuda_peak_extra_bytes",
    "device_description",
    "device_name",
    "peak_rss_bytes",
    "proc_status_kb",
    "reset_peak_rss",
    "versions",
    "versions_line",
]
