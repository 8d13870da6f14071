"""Running the cases of one setup, and the ratios against the floor of the same run.

Timing is round-robin over (provider, mode), so that load from other processes spreads
evenly over the providers being compared; memory is measured one case at a time after.
Cases whose estimated footprint does not fit the free memory are recorded as skipped, and
out-of-memory errors are caught and recorded. Ratios: ``time_ratio = time_ms / floor
time_ms`` and ``mem_ratio = extra_mem / floor_mem`` for the same setup and mode.
"""

from __future__ import annotations

import contextlib
import gc
import time
import traceback
from typing import Dict, List

import torch

from .providers import Case, Inputs, estimate_bytes, providers_for
from .report import case_key, short_line
from .setups import FLOOR, MB, Setup
from .timing import available_bytes, cuda_extra_memory, is_oom, summarise, sync, time_case


def make_row(setup: Setup, provider: str, mode: str, **fields) -> dict:
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
        "time_iqr_ms": None,
        "time_runs": None,
        "time_blocks": None,
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
        # Build + warm-up time (the first call compiles the Triton kernels) and, when
        # counted, the kernel specialisations launched there (their operand dtypes).
        "warmup_s": None,
        "kernels": [],
    }
    row.update(fields)
    return row


def _fail(row: dict, exc: BaseException, log) -> None:
    oom = is_oom(exc)
    row.update(status="skipped" if oom else "error", reason=f"{type(exc).__name__}: {exc}"[:300])
    row.update(time_ms=None, time_samples_ms=[], cpu_time_samples_ms=[])
    if not oom:
        log(traceback.format_exc())


def run_setup(setup, names, modes, device, args, runner, log, counter=None) -> List[dict]:
    """All cases of one setup. Timing is round-robin over (provider, mode), so that load
    from other processes spreads evenly over the providers being compared.

    ``counter``: a :class:`~.specialisations.SpecialisationCounter`, held around each
    provider's build and warm-up (never around timed calls: its hooks cost microseconds)."""
    table = providers_for(setup.level)
    opts = {"chunk_size": args.chunk_size}
    # The floor first: every ratio of this setup refers to it.
    ordered = [FLOOR] + [n for n in names if n != FLOOR and n in table]
    try:
        inputs = Inputs(setup, device)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        reason = f"inputs do not fit: {exc}"[:300]
        return [
            make_row(setup, n, m, status="skipped", reason=reason) for n in ordered for m in modes
        ]
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
        new = [make_row(setup, name, m, chunk_size=chunk) for m in modes]
        rows += new
        if reason is not None:
            for row in new:
                row.update(status="skipped", reason=reason)
            log(f"  {name:<22} skipped: {reason}")
            continue
        before = dict(counter.launches) if counter is not None else {}
        t0 = time.perf_counter()
        try:
            with counter if counter is not None else contextlib.nullcontext():
                cases[name] = provider.build(setup, inputs, device, opts)
                for row in new:  # warm-up
                    for _ in range(args.warmup):
                        cases[name].step(row["mode"])
                    cases[name].reset()
                sync(device)
            # Every specialisation this provider launched (not only the new ones).
            launched = [] if counter is None else counter.launched_since(before)
            kernels = [] if counter is None else counter.keys(launched)
            for row in new:
                row.update(warmup_s=round(time.perf_counter() - t0, 3), kernels=kernels)
        except Exception as exc:  # noqa: BLE001
            for row in new:
                _fail(row, exc, log)
            cases.pop(name, None)
            log(f"  {name:<22} {new[0]['status']}: {new[0]['reason']}")
    sync(device)
    # One measurement (many timed calls) per case per round; the rounds are pooled.
    measured: Dict[int, list] = {id(row): [] for row in rows}
    for _ in range(args.repeats):
        for row in rows:
            case = cases.get(row["provider"])
            if row["status"] != "ok" or case is None:
                continue
            try:
                measured[id(row)].append(
                    time_case(
                        case, row["mode"], device, args.timer, args.min_run_time, row["provider"]
                    )
                )
            except Exception as exc:  # noqa: BLE001
                case.reset()
                _fail(row, exc, log)
    for row in rows:
        if row["status"] == "ok" and measured[id(row)]:
            row.update(summarise(measured[id(row)]))
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
        log("  " + short_line(row))
    cases.clear()
    del inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: List[dict]) -> None:
    """time / floor time, cpu time / floor cpu time and extra / floor memory, per row."""
    floors = {case_key(r): r for r in rows if r["provider"] == FLOOR and r["status"] == "ok"}
    for r in rows:
        floor = floors.get(case_key(r), {})
        r["floor_time_ms"] = floor.get("time_ms")
        r["floor_cpu_time_ms"] = floor.get("cpu_time_ms")
        if r["time_ms"] is not None and r["floor_time_ms"]:
            r["time_ratio"] = r["time_ms"] / r["floor_time_ms"]
        if r["cpu_time_ms"] is not None and r["floor_cpu_time_ms"]:
            r["cpu_time_ratio"] = r["cpu_time_ms"] / r["floor_cpu_time_ms"]
        if r["extra_mem_bytes"] is not None and r["floor_mem_bytes"]:
            r["mem_ratio"] = r["extra_mem_bytes"] / r["floor_mem_bytes"]
            r["over_floor_mem_bytes"] = r["extra_mem_bytes"] - r["floor_mem_bytes"]
