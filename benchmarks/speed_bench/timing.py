"""How time and memory are measured.

Time: :func:`time_case` takes one measurement of ``case.step(mode)`` per round; the sweep
runs ``--repeats`` rounds, round-robin over the cases, and pools them
(:func:`summarise`). Two timers, chosen by ``--timer``:

* ``torch`` (CPU, and CUDA where asked): ``torch.utils.benchmark.Timer.blocked_autorange``
  with ``min_run_time = --min-run-time``. It picks the block size (calls per timed block)
  so that the timer's overhead is negligible, synchronises CUDA itself, and returns a
  ``Measurement`` (per-call median, IQR, blocks x calls per block). On CPU its clock also
  records the process CPU time at each block's start and end, so the CPU time comes from
  the same blocks as the wall time; it is less sensitive to other processes on a shared
  machine.
* ``triton`` (the CUDA default when triton imports): ``triton.testing.do_bench`` with
  ``rep = --min-run-time``: CUDA events around each call, the L2 cache flushed and the
  gradients set to None before each call, outside the timed region. Its per-call times
  are wrapped in the same ``Measurement``, so both timers report alike.

Each call drops the gradients of the previous one first (``Case.step``), so allocating them
is part of the time. Every row of a run uses the same timer, the floor included, so the
ratios compare like with like.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional

import torch

from pml_extras import _env

from .providers import Case, Inputs, providers_for
from .setups import Setup

if TYPE_CHECKING:
    from torch.utils.benchmark import Measurement

# torch.utils.benchmark is imported where a measurement is taken: it pulls in
# torch.utils.cpp_extension and setuptools (tenths of a second), which `speed.py --help`,
# the checks and the device-wheel audit (tests/gpu/test_gpu_checks_script.py) do not need.


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


TIMERS = ("auto", "torch", "triton")


def resolve_timer(name: str, device: torch.device) -> str:
    """``auto``: ``triton`` (``do_bench``) on CUDA when triton imports, else ``torch``."""
    if name not in TIMERS:
        raise ValueError(f"unknown timer {name!r}; expected one of {TIMERS}")
    if name == "triton" and device.type != "cuda":
        raise ValueError(f"timer 'triton' (triton.testing.do_bench) needs CUDA, got {device}")
    if name != "auto":
        return name
    if device.type == "cuda":
        try:
            import inspect

            from triton.testing import do_bench

            # return_mode="all" (per-call times) is needed; an old triton without it
            # falls back to torch.utils.benchmark.
            if '"all"' in inspect.getsource(do_bench):
                return "triton"
        except (ImportError, OSError, TypeError):
            pass
    return "torch"


@dataclass
class TimeMeasurement:
    """One round's measurement of one case: per-call wall seconds as a
    ``torch.utils.benchmark`` ``Measurement``, and on CPU the process CPU seconds of the
    same blocks (None on CUDA)."""

    wall: Measurement
    cpu: Optional[Measurement]


class _Clocks:
    """The Timer's clock: ``perf_counter`` for the wall time, and the process CPU time read
    at the same instants. ``timeit`` reads its clock exactly twice per block (before and
    after), so consecutive pairs of marks are the blocks' CPU times."""

    def __init__(self):
        self.cpu_marks: List[float] = []

    def __call__(self) -> float:
        self.cpu_marks.append(time.process_time())
        return time.perf_counter()


def _task_label(mode: str, name: str) -> dict:
    # Labels as torch.utils.benchmark.Compare groups them: provider (row) x mode (column).
    return {"label": "speed_bench", "sub_label": name, "description": mode}


def torch_timer_measurement(
    case: Case, mode: str, device: torch.device, min_run_time: float, name: str = ""
) -> TimeMeasurement:
    """``torch.utils.benchmark.Timer.blocked_autorange`` of ``case.step(mode)``."""
    from torch.utils import benchmark

    kwargs = dict(
        stmt="case.step(mode)",
        globals={"case": case, "mode": mode},
        num_threads=torch.get_num_threads(),
        **_task_label(mode, name),
    )
    clocks = None
    if device.type != "cuda":
        clocks = _Clocks()
        kwargs["timer"] = clocks  # default timer on CUDA: it synchronises the device
    timer = benchmark.Timer(**kwargs)
    if clocks is not None:
        clocks.cpu_marks.clear()
    wall = timer.blocked_autorange(min_run_time=min_run_time)
    cpu = None
    if clocks is not None:
        # The last len(raw_times) pairs of marks are the measured blocks (the block-size
        # estimate before them is a warm-up).
        marks = clocks.cpu_marks[-2 * len(wall.raw_times) :]
        if len(marks) != 2 * len(wall.raw_times):
            raise RuntimeError(
                f"timer read its clock {len(clocks.cpu_marks)} times, fewer than twice per "
                f"block ({len(wall.raw_times)} blocks)"
            )
        cpu_raw = [b - a for a, b in zip(marks[::2], marks[1::2])]
        cpu = benchmark.Measurement(wall.number_per_run, cpu_raw, wall.task_spec)
    case.reset()
    return TimeMeasurement(wall, cpu)


def triton_do_bench_measurement(
    case: Case, mode: str, min_run_time: float, name: str = "", do_bench: Optional[Callable] = None
) -> TimeMeasurement:
    """``triton.testing.do_bench(return_mode="all")`` of ``case.step(mode)`` (CUDA), its
    per-call milliseconds wrapped in a ``Measurement`` of one call per block.

    ``do_bench`` defaults to triton's; the tests pass a stand-in with its contract."""
    from torch.utils.benchmark import Measurement
    from torch.utils.benchmark.utils.common import TaskSpec

    if do_bench is None:
        from triton.testing import do_bench
    ms = do_bench(
        lambda: case.step(mode),
        warmup=max(1, round(min_run_time * 250)),
        rep=max(1, round(min_run_time * 1000)),
        grad_to_none=case.leaves,
        return_mode="all",
    )
    if not ms:
        raise RuntimeError("triton.testing.do_bench returned no times")
    spec = TaskSpec(
        stmt="case.step(mode)",
        setup="pass",
        num_threads=torch.get_num_threads(),
        **_task_label(mode, name),
    )
    case.reset()
    return TimeMeasurement(Measurement(1, [t / 1e3 for t in ms], spec), None)


def time_case(
    case: Case, mode: str, device: torch.device, timer: str, min_run_time: float, name: str = ""
) -> TimeMeasurement:
    """One round's measurement of ``case.step(mode)`` with the resolved ``timer``."""
    if timer == "triton":
        return triton_do_bench_measurement(case, mode, min_run_time, name)
    return torch_timer_measurement(case, mode, device, min_run_time, name)


def summarise(rounds: List[TimeMeasurement]) -> dict:
    """A row's time fields from its rounds: the pooled per-call median and IQR
    (``Measurement.merge``), the minimum, one median per round, and how many calls and
    blocks were timed. Milliseconds."""
    from torch.utils.benchmark import Measurement

    wall = Measurement.merge([r.wall for r in rounds])[0]
    out = {
        "time_ms": wall.median * 1e3,
        "time_iqr_ms": wall.iqr * 1e3,
        "time_min_ms": min(wall.times) * 1e3,
        "time_samples_ms": [r.wall.median * 1e3 for r in rounds],
        "time_runs": sum(r.wall.number_per_run * len(r.wall.raw_times) for r in rounds),
        "time_blocks": len(wall.raw_times),
        "cpu_time_ms": None,
        "cpu_time_samples_ms": [],
    }
    if all(r.cpu is not None for r in rounds):
        cpu = Measurement.merge([r.cpu for r in rounds])[0]
        out["cpu_time_ms"] = cpu.median * 1e3
        out["cpu_time_samples_ms"] = [r.cpu.median * 1e3 for r in rounds]
    return out


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
        can_reset = _env.reset_peak_rss()
        if can_reset:
            case.step(spec["mode"])  # warm-up: lazy initialisation is not the loss's memory
        case.reset()
        gc.collect()
        _malloc_trim()
        with _env.PeakRSSGrowth() as peak:
            case.step(spec["mode"])
        extra_kb = peak.bytes // 1024
        method = peak.method if peak.reset else peak.method + ", no warm-up"
        conn.send({"extra_mem": extra_kb * 1024, "method": method})
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
