"""How time and memory are measured.

Time: :func:`time_call` times one ``case.step(mode)``: CUDA events on GPU; on CPU wall time
(``perf_counter``) and process CPU time, the latter less sensitive to other processes on a
shared machine. The gradients are dropped afterwards, outside the timed region.

Peak memory, as *extra* bytes above what is held before the call (the inputs, W and the
loss module): on GPU ``torch.cuda.max_memory_allocated()`` minus
``torch.cuda.memory_allocated()`` before the call (:func:`cuda_extra_memory`); on CPU each
case runs in a fresh process (:class:`ChildRunner`: forked from a forkserver that has only
imported the libraries), does one warm-up call, resets the RSS high-water mark
(``echo 5 > /proc/self/clear_refs``) and reports ``VmHWM`` minus the ``VmRSS`` held before
the measured call. glibc's mmap threshold is pinned in that process so that freed large
blocks go back to the OS and RSS follows the live memory.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import time
import traceback
from typing import Optional, Tuple

import torch

from pml_extras import _env

from .providers import Case, Inputs, providers_for
from .setups import Setup


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(info["MemAvailable"] * 0.7)
    except (OSError, KeyError, ValueError):
        return 1 << 62


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_types = tuple(
        t
        for t in (
            getattr(torch.cuda, "OutOfMemoryError", None),
            getattr(torch, "OutOfMemoryError", None),
        )
        if t is not None
    )
    if isinstance(exc, oom_types):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(case: Case, mode: str, device: torch.device) -> Tuple[float, Optional[float]]:
    """(wall ms, process CPU ms or None on GPU) of one ``case.step(mode)``.

    The gradients are dropped afterwards, outside the timed region.
    """
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        case.step(mode)
        end.record()
        torch.cuda.synchronize(device)
        elapsed, cpu = start.elapsed_time(end), None
    else:
        c0, t0 = time.process_time(), time.perf_counter()
        case.step(mode)
        elapsed = (time.perf_counter() - t0) * 1e3
        cpu = (time.process_time() - c0) * 1e3
    case.reset()
    return elapsed, cpu


def cuda_extra_memory(case: Case, mode: str, device: torch.device) -> int:
    case.reset()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    case.step(mode)
    torch.cuda.synchronize(device)
    extra = _env.cuda_peak_extra_bytes(device, before)
    case.reset()
    return int(extra)


# Peak-memory primitives: one home, pml_extras._env (shared with the retrieval benchmark).
_proc_status_kb = _env.proc_status_kb
_reset_hwm = _env.reset_peak_rss


def _pin_malloc() -> None:
    """Fixed mmap threshold (no dynamic raise): freed big blocks go back to the OS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _memory_child(conn, spec: dict) -> None:
    """Runs in a fresh process: build one case, warm up, measure the peak RSS growth."""
    try:
        _pin_malloc()
        torch.set_num_threads(spec["threads"])
        setup = Setup(**spec["setup"])
        device = torch.device("cpu")
        provider = providers_for(setup.level)[spec["provider"]]
        inputs = Inputs(setup, device)
        case = provider.build(setup, inputs, device, spec["opts"])
        can_reset = _reset_hwm()
        if can_reset:
            case.step(spec["mode"])  # warm-up: lazy initialisation is not the loss's memory
        case.reset()
        gc.collect()
        _malloc_trim()
        before_kb = _proc_status_kb("VmRSS")
        if can_reset:
            _reset_hwm()
        case.step(spec["mode"])
        if can_reset:
            peak_kb = _proc_status_kb("VmHWM")
            method = "VmHWM after clear_refs"
        else:
            import resource

            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            method = "ru_maxrss (no warm-up; clear_refs unavailable)"
        conn.send({"extra_mem": max(0, peak_kb - before_kb) * 1024, "method": method})
    except BaseException as exc:  # noqa: B036 - everything goes back to the parent
        status = "skipped" if is_oom(exc) else "error"
        reason = f"{type(exc).__name__}: {exc}".strip()[:300]
        conn.send(
            {
                "status": status,
                "reason": ("out of memory: " if status == "skipped" else "") + reason,
                "trace": traceback.format_exc()[-2000:],
            }
        )
    finally:
        conn.close()


class ChildRunner:
    """Starts each CPU memory measurement in a fresh process from a forkserver."""

    def __init__(self, timeout_s: float = 900.0):
        self.ctx = multiprocessing.get_context("forkserver")
        main = _memory_child.__module__
        self.ctx.set_forkserver_preload(
            ["torch", "pytorch_metric_learning.losses", "pml_extras.losses", main]
        )
        self.timeout_s = timeout_s

    def measure(self, spec: dict) -> dict:
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_memory_child, args=(child, spec), daemon=True)
        proc.start()
        child.close()
        result = None
        try:
            if parent.poll(self.timeout_s):
                result = parent.recv()
        except EOFError:
            result = None
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if result is None:
            code = proc.exitcode
            why = "killed (out of memory?)" if code is not None and code < 0 else "no result"
            return {"status": "error", "reason": f"memory child exit code {code}: {why}"}
        return result
