"""Speed and peak memory of the class-level and pair-level losses at face-recognition scale.

Structure: setup x provider x mode.

* A *setup* is ``(level, B, D, C, dtype)``: ``level="class"`` is a classification head with
  proxies W of shape (D, C); ``level="pair"`` is an all-pairs loss over a batch of B
  embeddings (C is then unused; labels have 4 samples per identity).
* A *provider* is one implementation (see ``PROVIDERS``): ours (``SparseCircleLoss``,
  ``CurricularFaceLoss``, ``ArcFaceLoss``, ``CosFaceLoss`` with ``impl="torch"`` and, on
  CUDA, ``impl="triton"``; the pair-level ``pml_extras.losses.circle_loss.CircleLoss``),
  PML's ``ArcFaceLoss``, ``CosFaceLoss`` and ``CircleLoss``, the straightforward dense
  versions of ``benchmarks/naive.py``, and the bare matmul ``floor``: x @ W forward and
  dC @ W^T, x^T @ dC backward, same shapes and dtype (pair level: x @ x^T, dS @ x,
  dS^T @ x).  Pair-level mined variants (``pair_circle_ms`` / ``pml_circle_ms``:
  MultiSimilarityMiner(epsilon=0.1) pairs; ``pair_circle_all`` / ``pml_circle_all``: every
  pair passed as mined pairs) compute their indices once per case, outside the timed and
  measured region.
* A *mode* is ``fwd`` (the training forward, autograd recording, no backward) or ``fwd+bwd``.

Time: median over ``--repeats`` calls after warm-up, timed with CUDA events on GPU and with
``time.perf_counter`` on CPU. Gradients are set to None before each call (as
``zero_grad(set_to_none=True)`` does), so allocating them is part of the call.

Peak memory, reported as *extra* bytes above what is held before the call (the inputs, W
and the loss module): on GPU ``torch.cuda.max_memory_allocated()`` minus
``torch.cuda.memory_allocated()`` before the call; on CPU each case runs in a fresh
process (forked from a forkserver that has only imported the libraries), does one warm-up
call, resets the RSS high-water mark (``echo 5 > /proc/self/clear_refs``) and reports
``VmHWM`` minus the ``VmRSS`` held before the measured call. glibc's mmap threshold is
pinned in that process so that freed large blocks go back to the OS and RSS follows the
live memory. The memory floor is the gradients the call has to produce: bytes of dW
plus bytes of dx (pair level: dx only).

Ratios: ``time_ratio = time_ms / floor time_ms`` and ``mem_ratio = extra_mem / floor_mem``,
for the same setup and mode. Cases whose estimated footprint does not fit the free
memory are recorded as skipped, and out-of-memory errors are caught and recorded.

Examples::

    python benchmarks/speed.py                       # default grid for the device
    python benchmarks/speed.py --device cpu --B 256 --D 128 --C 10000,100000 \\
        --dtype fp32 --providers sparse_circle_torch,naive_circle --modes fwd+bwd
    python benchmarks/plot_speed.py benchmarks/results/speed/cpu.json
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Other processes on a small shared machine make OpenMP's default busy-waiting very slow;
# this must be set before torch loads its OpenMP runtime (the forkserver inherits it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import naive  # noqa: E402

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
MODES = ("fwd", "fwd+bwd")
FLOOR = "floor"
MB = 1 << 20

DEFAULT_GRIDS = {
    # Face-recognition scale (the issue's grid).
    "cuda": {
        "B": [1024],
        "D": [512],
        "C": [100_000, 1_000_000],
        "dtype": ["bf16", "fp32"],
        "pair_B": [16384],
        "pair_D": [512],
        "repeats": 20,
        "warmup": 5,
    },
    # A few minutes on 2 idle cores (add --C 10000,100000,300000 for the C sweep).
    "cpu": {
        "B": [256],
        "D": [128],
        "C": [10_000, 100_000],
        "dtype": ["fp32"],
        "pair_B": [2048],
        "pair_D": [128],
        "repeats": 5,
        "warmup": 1,
    },
}


# --------------------------------------------------------------------------------------
# Setups, cases and providers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    level: str  # "class" or "pair"
    B: int
    D: int
    C: Optional[int]  # None for pair-level setups
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def dense_elems(self) -> int:
        """Elements of one B x C (class) or B x B (pair) matrix."""
        return self.B * (self.C if self.level == "class" else self.B)

    def floor_mem(self) -> int:
        """Bytes the fwd+bwd call must allocate at least: dW (class level) and dx."""
        grad_w = self.D * self.C if self.level == "class" else 0
        return (grad_w + self.B * self.D) * self.itemsize

    def key(self) -> Tuple:
        return (self.level, self.B, self.D, self.C, self.dtype)


class Inputs:
    """The tensors a setup's cases share: x (leaf), labels and, for classes, W's values."""

    def __init__(self, setup: Setup, device: torch.device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = setup.torch_dtype
        self.x = torch.randn(setup.B, setup.D, generator=gen, device=device, dtype=dtype)
        self.x.requires_grad_(True)
        if setup.level == "class":
            self.labels = torch.randint(0, setup.C, (setup.B,), generator=gen, device=device)
            self.W = torch.randn(setup.D, setup.C, generator=gen, device=device, dtype=dtype)
        else:
            # Face-recognition style batches: 4 samples per identity, shuffled.
            perm = torch.randperm(setup.B, generator=gen, device=device)
            self.labels = torch.div(perm, 4, rounding_mode="floor")
            self.W = None


class Case:
    """One provider on one setup: ``step(mode)`` runs one call, ``reset()`` drops grads."""

    def __init__(self, step: Callable[[str], None], leaves: Sequence[torch.Tensor], keep=()):
        self._step, self.leaves, self.keep = step, list(leaves), keep

    def reset(self) -> None:
        for t in self.leaves:
            t.grad = None

    def step(self, mode: str) -> None:
        self.reset()
        self._step(mode)


def _param(values: torch.Tensor) -> torch.nn.Parameter:
    # Shares the storage of ``values``: every provider of a setup sees the same W.
    return torch.nn.Parameter(values)


def _loss_case(loss_fn: torch.nn.Module, inputs: Inputs) -> Case:
    if inputs.W is not None:
        loss_fn.W = _param(inputs.W)
    loss_fn.to(inputs.x.device).train()
    x, labels = inputs.x, inputs.labels
    leaves = [x, *loss_fn.parameters()]

    def step(mode: str) -> None:
        loss = loss_fn(x, labels)
        if mode == "fwd+bwd":
            loss.backward()

    return Case(step, leaves, keep=(loss_fn,))


def _floor_case(setup: Setup, inputs: Inputs, device: torch.device) -> Case:
    x = inputs.x.detach()
    w = inputs.W if setup.level == "class" else x.t()
    n = setup.C if setup.level == "class" else setup.B
    gen = torch.Generator(device=device).manual_seed(1)
    grad_out = torch.randn(setup.B, n, generator=gen, device=device, dtype=setup.torch_dtype)

    @torch.no_grad()
    def step(mode: str) -> None:
        out = x @ w
        if mode == "fwd+bwd":
            grad_x = grad_out @ w.t()
            grad_w = x.t() @ grad_out
            del grad_x, grad_w
        del out

    return Case(step, [], keep=(grad_out,))


def _sparse_circle(impl):
    def build(setup, inputs, device, opts):
        from pml_extras.losses import SparseCircleLoss

        fn = SparseCircleLoss(
            setup.C, setup.D, m=0.25, gamma=256.0, impl=impl, chunk_size=opts.get("chunk_size")
        )
        return _loss_case(fn, inputs)

    return build


def _curricular(impl):
    def build(setup, inputs, device, opts):
        from pml_extras.losses import CurricularFaceLoss

        fn = CurricularFaceLoss(
            setup.C, setup.D, margin=0.5, scale=64.0, impl=impl, chunk_size=opts.get("chunk_size")
        )
        return _loss_case(fn, inputs)

    return build


def _margin(name, impl):
    """Ours: ArcFaceLoss / CosFaceLoss with PML's default margin and scale."""

    def build(setup, inputs, device, opts):
        from pml_extras import losses

        cls = getattr(losses, name)
        fn = cls(setup.C, setup.D, impl=impl, chunk_size=opts.get("chunk_size"))
        return _loss_case(fn, inputs)

    return build


def _pml(name, **kwargs):
    def build(setup, inputs, device, opts):
        from pytorch_metric_learning import losses

        cls = getattr(losses, name)
        if setup.level == "class":
            fn = cls(num_classes=setup.C, embedding_size=setup.D, **kwargs)
        else:
            fn = cls(**kwargs)
        return _loss_case(fn, inputs)

    return build


def _naive(cls):
    def build(setup, inputs, device, opts):
        return _loss_case(cls(1, setup.D), inputs)

    return build


def _pair_circle(impl: str):
    def build(setup, inputs, device, opts):
        from pml_extras.losses.circle_loss import CircleLoss

        return _loss_case(CircleLoss(m=0.25, gamma=256.0, impl=impl), inputs)

    return build


def _cuda_only_torch_path(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "on CPU impl='auto' is the PyTorch path: see pair_circle"
    return _has_pair_circle()


def mined_indices(miner: str, inputs: Inputs):
    """The pairs a pair-level mined provider hands to the loss, computed once per case, outside
    the timed and measured region: ``"ms"`` is MultiSimilarityMiner(epsilon=0.1) on the
    setup's embeddings, ``"all"`` every pair (the densest mining, 2 * B^2 int64 per side)."""
    from pytorch_metric_learning import miners
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    with torch.no_grad():
        if miner == "ms":
            return miners.MultiSimilarityMiner(epsilon=0.1)(inputs.x.detach(), inputs.labels)
        return lmu.get_all_pairs_indices(inputs.labels)


def _mined_pair(ours: bool, miner: str):
    def build(setup, inputs, device, opts):
        if ours:
            from pml_extras.losses.circle_loss import CircleLoss
        else:
            from pytorch_metric_learning.losses import CircleLoss
        loss_fn = CircleLoss(m=0.25, gamma=256.0).to(device).train()
        indices = mined_indices(miner, inputs)
        x, labels = inputs.x, inputs.labels

        def step(mode: str) -> None:
            loss = loss_fn(x, labels, indices)
            if mode == "fwd+bwd":
                loss.backward()

        return Case(step, [x], keep=(loss_fn, indices))

    return build


def _floor(setup, inputs, device, opts):
    return _floor_case(setup, inputs, device)


def _has_pair_circle() -> Optional[str]:
    try:
        from pml_extras.losses.circle_loss import CircleLoss  # noqa: F401
    except Exception as exc:  # the module is still being written
        return f"pml_extras.losses.circle_loss unavailable ({type(exc).__name__}: {exc})"
    return None


def _has_triton(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "impl='triton' needs a CUDA device"
    from pml_extras.ops.class_lse import triton_available

    if not triton_available(device):
        return "pml_extras.ops.class_lse_triton (or triton) is not importable"
    return None


@dataclass(frozen=True)
class Provider:
    name: str
    level: str
    build: Callable
    # Number of B x C (class) or B x B (pair) float32-sized temporaries alive at the peak,
    # for the fits-in-memory estimate. 0 for blockwise implementations.
    dense: float
    description: str
    check: Optional[Callable[[torch.device], Optional[str]]] = None
    blockwise: bool = False


PROVIDERS: Dict[str, Provider] = {
    p.name: p
    for p in [
        Provider(FLOOR, "class", _floor, 2, "bare matmuls x@W, dC@W^T, x^T@dC"),
        Provider(
            "sparse_circle_torch",
            "class",
            _sparse_circle("torch"),
            0,
            "ours: SparseCircleLoss(impl='torch'), blockwise",
            blockwise=True,
        ),
        Provider(
            "sparse_circle_triton",
            "class",
            _sparse_circle("triton"),
            0,
            "ours: SparseCircleLoss(impl='triton')",
            _has_triton,
            blockwise=True,
        ),
        Provider(
            "curricular_torch",
            "class",
            _curricular("torch"),
            0,
            "ours: CurricularFaceLoss(impl='torch'), blockwise",
            blockwise=True,
        ),
        Provider(
            "curricular_triton",
            "class",
            _curricular("triton"),
            0,
            "ours: CurricularFaceLoss(impl='triton')",
            _has_triton,
            blockwise=True,
        ),
        Provider(
            "arcface_torch",
            "class",
            _margin("ArcFaceLoss", "torch"),
            0,
            "ours: ArcFaceLoss(impl='torch'), blockwise",
            blockwise=True,
        ),
        Provider(
            "arcface_triton",
            "class",
            _margin("ArcFaceLoss", "triton"),
            0,
            "ours: ArcFaceLoss(impl='triton')",
            _has_triton,
            blockwise=True,
        ),
        Provider(
            "cosface_torch",
            "class",
            _margin("CosFaceLoss", "torch"),
            0,
            "ours: CosFaceLoss(impl='torch'), blockwise",
            blockwise=True,
        ),
        Provider(
            "cosface_triton",
            "class",
            _margin("CosFaceLoss", "triton"),
            0,
            "ours: CosFaceLoss(impl='triton')",
            _has_triton,
            blockwise=True,
        ),
        Provider("pml_arcface", "class", _pml("ArcFaceLoss"), 8, "PML ArcFaceLoss (dense)"),
        Provider("pml_cosface", "class", _pml("CosFaceLoss"), 8, "PML CosFaceLoss (dense)"),
        Provider(
            "naive_circle",
            "class",
            _naive(naive.NaiveClassCircleLoss),
            8,
            "straightforward dense class-level Circle loss (benchmarks/naive.py)",
        ),
        Provider(
            "naive_curricular",
            "class",
            _naive(naive.NaiveCurricularFace),
            8,
            "straightforward dense CurricularFace, authors' code (benchmarks/naive.py)",
        ),
    ]
}
PAIR_PROVIDERS: Dict[str, Provider] = {
    p.name: p
    for p in [
        Provider(FLOOR, "pair", _floor, 2, "bare matmuls x@x^T, dS@x, dS^T@x"),
        Provider(
            "pair_circle",
            "pair",
            _pair_circle("auto"),
            0,
            "ours: pml_extras.losses.circle_loss.CircleLoss (impl='auto': the fused Triton "
            "kernels on CUDA, the blockwise PyTorch path on CPU)",
            lambda device: _has_pair_circle(),
            blockwise=True,
        ),
        Provider(
            "pair_circle_torch",
            "pair",
            _pair_circle("torch"),
            0,
            "ours: CircleLoss(impl='torch'), the blockwise PyTorch path (CUDA runs only)",
            _cuda_only_torch_path,
            blockwise=True,
        ),
        Provider(
            "pml_circle",
            "pair",
            _pml("CircleLoss", m=0.25, gamma=256.0),
            12,
            "PML CircleLoss (dense B x B)",
        ),
        # Mined pairs (indices computed outside the timed region, see mined_indices).
        Provider(
            "pair_circle_ms",
            "pair",
            _mined_pair(True, "ms"),
            0,
            "ours: CircleLoss with MultiSimilarityMiner(epsilon=0.1) pairs",
            lambda device: _has_pair_circle(),
            blockwise=True,
        ),
        Provider(
            "pml_circle_ms",
            "pair",
            _mined_pair(False, "ms"),
            12,
            "PML CircleLoss with MultiSimilarityMiner(epsilon=0.1) pairs (dense B x B)",
        ),
        Provider(
            "pair_circle_all",
            "pair",
            _mined_pair(True, "all"),
            0,
            "ours: CircleLoss with every pair passed as mined pairs",
            lambda device: _has_pair_circle(),
            blockwise=True,
        ),
        Provider(
            "pml_circle_all",
            "pair",
            _mined_pair(False, "all"),
            12,
            "PML CircleLoss with every pair passed as mined pairs (dense B x B)",
        ),
    ]
}


def providers_for(level: str) -> Dict[str, Provider]:
    return PROVIDERS if level == "class" else PAIR_PROVIDERS


def estimate_bytes(provider: Provider, setup: Setup, opts: dict) -> int:
    """Rough peak footprint of one case, for skipping cases that cannot fit."""
    item = max(setup.itemsize, 4)
    inputs = (setup.D * (setup.C or 0) + setup.B * setup.D) * setup.itemsize
    dense = provider.dense * setup.dense_elems() * item
    if provider.blockwise:  # a handful of B x chunk float32 blocks
        dense = 12 * setup.B * min(setup.C or setup.B, 65536) * 4
    return 2 * inputs + setup.floor_mem() + int(dense)


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


def _is_oom(exc: BaseException) -> bool:
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


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
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
    extra = torch.cuda.max_memory_allocated(device) - before
    case.reset()
    return int(extra)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


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


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
        status = "skipped" if _is_oom(exc) else "error"
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


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


def build_setups(args, device: torch.device) -> List[Setup]:
    grid = DEFAULT_GRIDS["cuda" if device.type == "cuda" else "cpu"]

    def pick(name):
        value = getattr(args, name)
        return grid[name] if value is None else value

    setups = []
    for dtype in pick("dtype"):
        for B in pick("B"):
            for D in pick("D"):
                for C in pick("C"):
                    setups.append(Setup("class", B, D, C, dtype))
        for B in pick("pair_B"):
            for D in pick("pair_D"):
                setups.append(Setup("pair", B, D, None, dtype))
    return setups


def default_providers(device: torch.device) -> List[str]:
    names = [n for n in list(PROVIDERS) + list(PAIR_PROVIDERS) if n != FLOOR]
    if device.type != "cuda":
        names = [n for n in names if not n.endswith("_triton")]
    return list(dict.fromkeys(names))


def _row(setup: Setup, provider: str, mode: str, **fields) -> dict:
    row = {
        "level": setup.level,
        "B": setup.B,
        "D": setup.D,
        "C": setup.C,
        "dtype": setup.dtype,
        "provider": provider,
        "mode": mode,
        "status": "ok",
        "reason": "",
        "time_ms": None,
        "time_samples_ms": [],
        "time_min_ms": None,
        "cpu_time_ms": None,
        "cpu_time_samples_ms": [],
        "floor_time_ms": None,
        "floor_cpu_time_ms": None,
        "cpu_time_ratio": None,
        "time_ratio": None,
        "extra_mem_bytes": None,
        "mem_source": "",
        "floor_mem_bytes": setup.floor_mem(),
        "mem_ratio": None,
        "over_floor_mem_bytes": None,
        "chunk_size": None,
    }
    row.update(fields)
    return row


def _fail(row: dict, exc: BaseException, log) -> None:
    oom = _is_oom(exc)
    row.update(status="skipped" if oom else "error", reason=f"{type(exc).__name__}: {exc}"[:300])
    row.update(time_ms=None, time_samples_ms=[], cpu_time_samples_ms=[])
    if not oom:
        log(traceback.format_exc())


def run_setup(setup, names, modes, device, args, runner, log) -> List[dict]:
    """All cases of one setup. Timing is round-robin over (provider, mode), so that load
    from other processes spreads evenly over the providers being compared."""
    table = providers_for(setup.level)
    opts = {"chunk_size": args.chunk_size}
    # The floor first: every ratio of this setup refers to it.
    ordered = [FLOOR] + [n for n in names if n != FLOOR and n in table]
    try:
        inputs = Inputs(setup, device)
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc):
            raise
        reason = f"inputs do not fit: {exc}"[:300]
        return [_row(setup, n, m, status="skipped", reason=reason) for n in ordered for m in modes]
    rows: List[dict] = []
    cases: Dict[str, Case] = {}
    for name in ordered:
        provider = table[name]
        reason = provider.check(device) if provider.check else None
        need, have = estimate_bytes(provider, setup, opts), available_bytes(device)
        if reason is None and need > have:
            reason = f"estimated {need / MB:.0f} MiB > available {have / MB:.0f} MiB"
        chunk = None
        if provider.blockwise and setup.level == "class":
            from pml_extras.ops.class_lse import default_chunk_size

            chunk = args.chunk_size or default_chunk_size(setup.B, setup.C)
        new = [_row(setup, name, m, chunk_size=chunk) for m in modes]
        rows += new
        if reason is not None:
            for row in new:
                row.update(status="skipped", reason=reason)
            log(f"  {name:<22} skipped: {reason}")
            continue
        try:
            cases[name] = provider.build(setup, inputs, device, opts)
            for row in new:  # warm-up
                for _ in range(args.warmup):
                    cases[name].step(row["mode"])
                cases[name].reset()
        except Exception as exc:  # noqa: BLE001
            for row in new:
                _fail(row, exc, log)
            cases.pop(name, None)
            log(f"  {name:<22} {new[0]['status']}: {new[0]['reason']}")
    _sync(device)
    for _ in range(args.repeats):
        for row in rows:
            case = cases.get(row["provider"])
            if row["status"] != "ok" or case is None:
                continue
            try:
                wall, cpu = time_call(case, row["mode"], device)
                row["time_samples_ms"].append(wall)
                if cpu is not None:
                    row["cpu_time_samples_ms"].append(cpu)
            except Exception as exc:  # noqa: BLE001
                case.reset()
                _fail(row, exc, log)
    for row in rows:
        if row["status"] == "ok" and row["time_samples_ms"]:
            row["time_ms"] = statistics.median(row["time_samples_ms"])
            row["time_min_ms"] = min(row["time_samples_ms"])
        if row["status"] == "ok" and row["cpu_time_samples_ms"]:
            row["cpu_time_ms"] = statistics.median(row["cpu_time_samples_ms"])
    # Memory, one case at a time.
    for row in rows:
        name, mode = row["provider"], row["mode"]
        if row["status"] != "ok":
            continue
        if name == FLOOR:
            row.update(extra_mem_bytes=setup.floor_mem(), mem_source="analytical")
        elif args.memory == "none":
            row["mem_source"] = "not measured"
        elif device.type == "cuda":
            try:
                extra = cuda_extra_memory(cases[name], mode, device)
                row.update(extra_mem_bytes=extra, mem_source="cuda max_memory_allocated")
            except Exception as exc:  # noqa: BLE001
                cases[name].reset()
                row["mem_source"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        else:
            spec = {
                "setup": setup.__dict__,
                "provider": name,
                "mode": mode,
                "opts": opts,
                "threads": torch.get_num_threads(),
            }
            res = runner.measure(spec)
            if "extra_mem" in res:
                row.update(extra_mem_bytes=res["extra_mem"], mem_source=res["method"])
            else:
                row["mem_source"] = f"{res['status']}: {res['reason']}"
        log("  " + _short(row))
    cases.clear()
    del inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _case_key(r: dict) -> Tuple:
    return (r["level"], r["B"], r["D"], r["C"], r["dtype"], r["mode"])


def add_ratios(rows: List[dict]) -> None:
    """time / floor time, cpu time / floor cpu time and extra / floor memory, per row."""
    floors = {_case_key(r): r for r in rows if r["provider"] == FLOOR and r["status"] == "ok"}
    for r in rows:
        floor = floors.get(_case_key(r), {})
        r["floor_time_ms"] = floor.get("time_ms")
        r["floor_cpu_time_ms"] = floor.get("cpu_time_ms")
        if r["time_ms"] is not None and r["floor_time_ms"]:
            r["time_ratio"] = r["time_ms"] / r["floor_time_ms"]
        if r["cpu_time_ms"] is not None and r["floor_cpu_time_ms"]:
            r["cpu_time_ratio"] = r["cpu_time_ms"] / r["floor_cpu_time_ms"]
        if r["extra_mem_bytes"] is not None and r["floor_mem_bytes"]:
            r["mem_ratio"] = r["extra_mem_bytes"] / r["floor_mem_bytes"]
            r["over_floor_mem_bytes"] = r["extra_mem_bytes"] - r["floor_mem_bytes"]


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def _short(row: dict) -> str:
    return (
        f"{row['provider']:<22} {row['mode']:<8} "
        f"{_fmt(row['time_ms'], '.2f')} ms  extra {_fmt(row['extra_mem_bytes'], '.1f', MB)} MiB"
        + (f"  [{row['status']}: {row['reason']}]" if row["status"] != "ok" else "")
    )


def _columns(rows: List[dict]) -> List[Tuple[str, Callable[[dict], str]]]:
    cols = [
        ("level", lambda r: r["level"]),
        ("B", lambda r: str(r["B"])),
        ("D", lambda r: str(r["D"])),
        ("C", lambda r: "-" if r["C"] is None else str(r["C"])),
        ("dtype", lambda r: r["dtype"]),
        ("mode", lambda r: r["mode"]),
        ("provider", lambda r: r["provider"]),
        ("time ms", lambda r: _fmt(r["time_ms"], ".1f")),
        ("x floor", lambda r: _fmt(r["time_ratio"], ".2f")),
    ]
    if any(r.get("cpu_time_ms") is not None for r in rows):
        cols += [
            ("cpu ms", lambda r: _fmt(r["cpu_time_ms"], ".1f")),
            ("x floor", lambda r: _fmt(r["cpu_time_ratio"], ".2f")),
        ]
    cols += [
        ("extra MiB", lambda r: _fmt(r["extra_mem_bytes"], ".1f", MB)),
        ("x floor", lambda r: _fmt(r["mem_ratio"], ".2f")),
        ("extra-floor MiB", lambda r: _fmt(r["over_floor_mem_bytes"], ".1f", MB)),
        ("note", _note),
    ]
    return cols


def _note(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    if row["provider"] == FLOOR:
        return "floor (memory: analytical dW + dx)"
    if row["extra_mem_bytes"] is None and row["mem_source"]:
        return f"memory {row['mem_source']}"
    return ""


def format_table(rows: List[dict], markdown: bool = False) -> str:
    columns = _columns(rows)
    header = [h for h, _ in columns]
    body = [[cell(r) for _, cell in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(c[i]) for c in body]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in body])


def comparison_lines(rows: List[dict]) -> List[str]:
    """Blockwise vs straightforward, per class-level setup and mode."""
    pairs = [
        ("sparse_circle_torch", "naive_circle"),
        ("curricular_torch", "naive_curricular"),
        ("sparse_circle_triton", "naive_circle"),
        ("curricular_triton", "naive_curricular"),
        ("pair_circle", "pml_circle"),
        ("pair_circle_ms", "pml_circle_ms"),
        ("pair_circle_all", "pml_circle_all"),
    ]
    index = {_case_key(r) + (r["provider"],): r for r in rows if r["status"] == "ok"}
    out = []
    for key in dict.fromkeys(k[:6] for k in index):
        for ours, ref in pairs:
            a, b = index.get(key + (ours,)), index.get(key + (ref,))
            if not a or not b or a["time_ms"] is None or b["time_ms"] is None:
                continue
            level, B, D, C, dtype, mode = key
            mem = ""
            if a["extra_mem_bytes"] is not None and b["extra_mem_bytes"] is not None:
                mem = (
                    f"; extra memory {a['extra_mem_bytes'] / MB:.1f} vs "
                    f"{b['extra_mem_bytes'] / MB:.1f} MiB"
                )
            cpu = ""
            if a.get("cpu_time_ms") and b.get("cpu_time_ms"):
                cpu = (
                    f"; cpu {a['cpu_time_ms']:.1f} vs {b['cpu_time_ms']:.1f} ms "
                    f"(x{a['cpu_time_ms'] / b['cpu_time_ms']:.2f})"
                )
            out.append(
                f"- {level} B={B} D={D} C={C} {dtype} {mode}: {ours} vs {ref}: "
                f"{a['time_ms']:.1f} vs {b['time_ms']:.1f} ms "
                f"(x{a['time_ms'] / b['time_ms']:.2f}){cpu}{mem}"
            )
    return out


def _versions() -> dict:
    from importlib import metadata

    import pytorch_metric_learning

    import pml_extras

    try:  # the installed version, without importing triton (slow)
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    return {
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "pml_extras": getattr(pml_extras, "__version__", None),
        "triton": triton_version,
        "python": platform.python_version(),
    }


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CSV_FIELDS = [
    "level",
    "B",
    "D",
    "C",
    "dtype",
    "mode",
    "provider",
    "status",
    "reason",
    "time_ms",
    "floor_time_ms",
    "time_ratio",
    "time_min_ms",
    "cpu_time_ms",
    "floor_cpu_time_ms",
    "cpu_time_ratio",
    "extra_mem_bytes",
    "floor_mem_bytes",
    "mem_ratio",
    "over_floor_mem_bytes",
    "mem_source",
    "chunk_size",
    "time_samples_ms",
    "cpu_time_samples_ms",
]


def write_results(result: dict, out_dir: str, name: str, note: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "csv", "md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            samples = {
                k: " ".join(f"{t:.3f}" for t in row[k])
                for k in ("time_samples_ms", "cpu_time_samples_ms")
            }
            writer.writerow({**row, **samples})
    meta = result["meta"]
    lines = [
        f"# Speed and memory: {meta['device_name']} ({meta['device']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"torch {meta['versions']['torch']}, pytorch-metric-learning "
        f"{meta['versions']['pytorch_metric_learning']}, pml_extras "
        f"{meta['versions']['pml_extras']}, triton {meta['versions']['triton']}, "
        f"{meta['threads']} threads; {meta['timing']}; memory: {meta['memory']}. "
        f"Load average (1/5/15 min) before {meta['loadavg_1_5_15_before']}, after "
        f"{meta['loadavg_1_5_15_after']} on {meta['cpu_count']} CPUs; {meta['elapsed_s']} s.",
        "",
        "time ms: median wall-clock; cpu ms (CPU runs): median process CPU time, less "
        "sensitive to other processes on a shared machine; `x floor`: divided by the same "
        "figure for the bare matmuls of the same shapes and mode; extra MiB: peak memory "
        "above what is held before the call; its "
        "`x floor`: extra / (bytes of dW + dx); extra-floor: extra minus that floor, i.e. "
        "the memory beyond the gradients the call must produce. `fwd` is the training "
        "forward (autograd recording), `fwd+bwd` includes the backward.",
        "",
        format_table(result["rows"], markdown=True),
        "",
    ]
    comparison = comparison_lines(result["rows"])
    if comparison:
        lines += ["## Blockwise vs straightforward", "", *comparison, ""]
    if note:
        lines += ["## Notes", "", note, ""]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines))
    return paths


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _ints(text: str) -> List[int]:
    return [int(float(t)) for t in text.split(",") if t.strip()]


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=_ints, help="class-level batch sizes, e.g. 256,1024")
    p.add_argument("--D", type=_ints, help="embedding sizes, e.g. 128,512")
    p.add_argument("--C", type=_ints, help="numbers of classes, e.g. 10000,100000")
    p.add_argument("--dtype", type=_names, help="fp32,bf16 (also fp16, fp64)")
    p.add_argument(
        "--pair-B", dest="pair_B", type=_ints, help="pair-level batch sizes ('' for none)"
    )
    p.add_argument("--pair-D", dest="pair_D", type=_ints, help="pair-level embedding sizes")
    p.add_argument(
        "--providers",
        type=_names,
        help=f"comma list; default: all that run on the device. Known: "
        f"{', '.join(dict.fromkeys(list(PROVIDERS) + list(PAIR_PROVIDERS)))}. "
        "The floor is always measured.",
    )
    p.add_argument("--modes", type=_names, default=list(MODES), help="fwd,fwd+bwd")
    p.add_argument("--repeats", type=int, help="timed calls per case (median reported)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--memory",
        default="auto",
        choices=["auto", "none"],
        help="'none' skips the memory measurement",
    )
    p.add_argument(
        "--chunk-size",
        dest="chunk_size",
        type=int,
        help="chunk_size passed to our class-level losses (default: theirs)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--out", default=os.path.join(_HERE, "results", "speed"))
    p.add_argument("--name", help="output file stem (default: cpu or cuda)")
    p.add_argument("--note", default="", help="text appended to the Markdown report")
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds; once spent, the remaining setups are skipped (and reported as such; "
        "the first always runs). Results are written after every setup either way.",
    )
    args = p.parse_args(argv)
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; expected {MODES}")
    for dtype in args.dtype or []:
        if dtype not in DTYPES:
            p.error(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    known = set(PROVIDERS) | set(PAIR_PROVIDERS)
    for name in args.providers or []:
        if name not in known:
            p.error(f"unknown provider {name!r}; expected one of {sorted(known)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    command = "python " + shlex.join(
        [os.path.relpath(__file__) if argv is not None else sys.argv[0]]
        + list(sys.argv[1:] if argv is None else argv)
    )
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    grid = DEFAULT_GRIDS["cuda" if device.type == "cuda" else "cpu"]
    if args.repeats is None:
        args.repeats = grid["repeats"]
    if args.warmup is None:
        args.warmup = grid["warmup"]
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.providers or default_providers(device)
    setups = build_setups(args, device)
    runner = ChildRunner() if device.type == "cpu" and args.memory != "none" else None

    def log(msg: str) -> None:
        print(msg, flush=True)

    started, load_before = time.time(), _loadavg()
    timing, memory = _methods(device, args)
    descriptions = {
        n: p.description
        for n, p in list(PROVIDERS.items()) + list(PAIR_PROVIDERS.items())
        if n in names or n == FLOOR
    }

    def result(rows: List[dict], complete: bool) -> dict:
        meta = {
            "device": device.type,
            "device_name": _device_name(device),
            "versions": _versions(),
            "command": command,
            "argv": list(sys.argv[1:] if argv is None else argv),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "timing": timing,
            "memory": memory,
            "floor_time": "bare matmuls of the same shapes/dtype: forward x@W; backward also "
            "dC@W^T and x^T@dC (pair level: x@x^T, dS@x, dS^T@x)",
            "floor_mem": "bytes of dW + dx (pair level: dx)",
            "providers": descriptions,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
            "elapsed_s": round(time.time() - started, 1),
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": _loadavg(),
            "cpu_count": os.cpu_count(),
            "complete": complete,
        }
        return {"meta": meta, "rows": rows}

    name = args.name or device.type
    rows: List[dict] = []
    for setup in setups:
        table = providers_for(setup.level)
        if not any(n in table for n in names):
            continue
        log(f"[{setup.level} B={setup.B} D={setup.D} C={setup.C} {setup.dtype}]")
        spent = time.time() - started
        # The first setup always runs: a run that measures nothing is no use.
        if args.time_budget is not None and rows and spent > args.time_budget:
            reason = (
                f"time budget: {spent:.0f} s of {args.time_budget:.0f} s spent before this setup"
            )
            log(f"  skipped: {reason}")
            ordered = [FLOOR] + [n for n in names if n != FLOOR and n in table]
            rows += [
                _row(setup, n, m, status="skipped", reason=reason)
                for n in ordered
                for m in args.modes
            ]
            continue
        rows += run_setup(setup, names, args.modes, device, args, runner, log)
        add_ratios(rows)
        # Written after every setup, so a run cut short (a device time limit) keeps what it
        # measured; meta.complete says whether every setup ran.
        partial_note = (
            args.note + " " if args.note else ""
        ) + "(Partial: the run was still going.)"
        write_results(result(rows, False), args.out, name, partial_note)
    add_ratios(rows)
    final = result(rows, True)
    print()
    print(format_table(rows))
    for line in comparison_lines(rows):
        print(line)
    paths = write_results(final, args.out, name, args.note)
    print("\nwrote " + ", ".join(paths.values()))
    return final


def _methods(device: torch.device, args) -> Tuple[str, str]:
    """How time and memory were measured, for the report."""
    if device.type == "cuda":
        timing = f"CUDA-event median of {args.repeats} after {args.warmup} warm-up"
        memory = "torch.cuda.max_memory_allocated minus memory_allocated before the call"
    else:
        timing = f"perf_counter median of {args.repeats} after {args.warmup} warm-up"
        memory = (
            "peak RSS growth (VmHWM after clear_refs, minus VmRSS before the call) in a "
            "fresh forkserver process per case, after one warm-up call"
        )
    if args.memory == "none":
        memory = "not measured"
    return timing, memory


if __name__ == "__main__":
    main()
