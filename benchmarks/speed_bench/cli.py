"""The command line of ``benchmarks/speed.py``: grid, providers, measurement and reports.

Examples::

    python benchmarks/speed.py                       # default grid for the device
    python benchmarks/speed.py --device cpu --B 256 --D 128 --C 10000,100000 \\
        --dtype fp32 --providers sparse_circle_torch,naive_circle --modes fwd+bwd
    python benchmarks/speed.py --dtype bf16,autocast_bf16      # half operands, AMP
    python benchmarks/speed.py --preset quick       # the issue's targets, PASS/FAIL lines
    python benchmarks/plot_speed.py benchmarks/results/speed/cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

from . import BENCH_DIR
from .predicted import predicted_lines
from .providers import (
    PAIR_PROVIDERS,
    PROVIDERS,
    all_provider_names,
    default_providers,
    providers_for,
)
from .report import comparison_lines, device_name, format_table, loadavg, versions, write_results
from .setups import DTYPES, FLOOR, MODES, PRESETS, build_setups, grid_for
from .sweep import add_ratios, make_row, run_setup
from .targets import (
    SPECIALISATIONS_LIMIT,
    evaluate,
    operand_outcomes,
    parse_limits,
    specialisations_outcome,
)
from .timing import TIMERS, ChildRunner, resolve_timer


def _ints(text: str) -> List[int]:
    return [int(float(t)) for t in text.split(",") if t.strip()]


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="speed.py",
        description="Speed and peak memory of the class-level and pair-level losses, as "
        "ratios to the bare matmuls of the same shapes measured in the same run.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--B", type=_ints, help="class-level batch sizes, e.g. 256,1024")
    p.add_argument("--D", type=_ints, help="embedding sizes, e.g. 128,512")
    p.add_argument("--C", type=_ints, help="numbers of classes, e.g. 10000,100000")
    p.add_argument(
        "--dtype",
        type=_names,
        help="storage dtypes fp32,bf16,fp16,fp64, or autocast_bf16 / autocast_fp16 (fp32 W "
        "and embeddings, the forward under torch.autocast)",
    )
    p.add_argument(
        "--pair-B", dest="pair_B", type=_ints, help="pair-level batch sizes ('' for none)"
    )
    p.add_argument("--pair-D", dest="pair_D", type=_ints, help="pair-level embedding sizes")
    p.add_argument(
        "--pair-dtype",
        dest="pair_dtype",
        type=_names,
        help="pair-level dtypes (default: those of --dtype)",
    )
    p.add_argument(
        "--providers",
        type=_names,
        help=f"comma list; default: all that run on the device. Known: "
        f"{', '.join(all_provider_names())}. The floor is always measured.",
    )
    p.add_argument("--modes", type=_names, help="fwd,fwd+bwd (default both)")
    p.add_argument(
        "--repeats",
        type=int,
        help="measurement rounds per case, round-robin over the cases; each round is one "
        "torch.utils.benchmark / do_bench measurement (median of the pooled calls reported)",
    )
    p.add_argument("--warmup", type=int, help="untimed calls before timing")
    p.add_argument(
        "--timer",
        default="auto",
        choices=list(TIMERS),
        help="'torch': torch.utils.benchmark.Timer.blocked_autorange; 'triton': "
        "triton.testing.do_bench (CUDA only); 'auto': triton on CUDA, torch on CPU",
    )
    p.add_argument(
        "--min-run-time",
        dest="min_run_time",
        type=float,
        help="seconds of timed calls per measurement (blocked_autorange's min_run_time, "
        "do_bench's rep); default: the device's grid",
    )
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
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "speed"))
    p.add_argument("--name", help="output file stem (default: cpu or cuda; preset: its name)")
    p.add_argument("--note", default="", help="text appended to the Markdown report")
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds; once spent, the remaining setups are skipped (and reported as such; "
        "the first always runs). Results are written after every setup either way.",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named option set; 'quick': the issue's targets (B=1024, D=512, C=100k,1M, "
        "bf16 and autocast_bf16; pair B=16384) with --check. Explicit flags override it.",
    )
    p.add_argument(
        "--check",
        action="store_true",
        default=None,
        help="judge the targets (speed_bench.targets): one PASS/FAIL line each; the exit "
        "status of speed.py is the number of FAILs",
    )
    p.add_argument(
        "--limit",
        help="override target limits, e.g. 'class-time=1.5,pair-time=3,kernel-specialisations=24'",
    )
    p.add_argument(
        "--count-specialisations",
        dest="count_specialisations",
        action="store_true",
        default=None,
        help="count the Triton kernel specialisations launched during warm-up",
    )
    args = p.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.modes is None:
        args.modes = list(MODES)
    args.check = bool(args.check)
    args.count_specialisations = bool(args.count_specialisations or args.check)
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; expected {MODES}")
    for dtype in (args.dtype or []) + (args.pair_dtype or []):
        if dtype not in DTYPES:
            p.error(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    known = set(PROVIDERS) | set(PAIR_PROVIDERS)
    for name in args.providers or []:
        if name not in known:
            p.error(f"unknown provider {name!r}; expected one of {sorted(known)}")
    try:
        args.limits = parse_limits(args.limit)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _methods(device: torch.device, args) -> Tuple[str, str]:
    """How time and memory were measured, for the report."""
    rounds = (
        f"{args.repeats} rounds of >= {args.min_run_time * 1e3:.0f} ms each, round-robin, "
        f"after {args.warmup} warm-up calls; median per call over the pooled calls"
    )
    if args.timer == "triton":
        timing = f"triton.testing.do_bench (CUDA events, L2 flushed before each call), {rounds}"
    else:
        clock = "synchronised perf_counter" if device.type == "cuda" else "perf_counter"
        timing = f"torch.utils.benchmark.Timer.blocked_autorange ({clock}), {rounds}"
    if device.type == "cuda":
        memory = "torch.cuda.max_memory_allocated minus memory_allocated before the call"
    else:
        memory = (
            "peak RSS growth (VmHWM after clear_refs, minus VmRSS before the call) in a "
            "fresh forkserver process per case, after one warm-up call"
        )
    if args.memory == "none":
        memory = "not measured"
    return timing, memory


def _counter(args):
    if not args.count_specialisations:
        return None
    from .specialisations import SpecialisationCounter

    return SpecialisationCounter()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the benchmark; returns ``{"meta", "rows"}`` (plus ``targets`` with --check and
    ``specialisations`` when counted), as written to ``<out>/<name>.json``."""
    args = parse_args(argv)
    entry = os.path.join(BENCH_DIR, "speed.py")
    command = "python " + shlex.join(
        [os.path.relpath(entry) if argv is not None else sys.argv[0]]
        + list(sys.argv[1:] if argv is None else argv)
    )
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    grid = grid_for(device)
    if args.repeats is None:
        args.repeats = grid["repeats"]
    if args.warmup is None:
        args.warmup = grid["warmup"]
    if args.min_run_time is None:
        args.min_run_time = grid["min_run_time"]
    try:
        args.timer = resolve_timer(args.timer, device)
    except ValueError as exc:
        raise SystemExit(f"--timer: {exc}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.providers or default_providers(device)
    setups = build_setups(args, device)
    runner = ChildRunner() if device.type == "cpu" and args.memory != "none" else None
    counter = _counter(args)

    def log(msg: str) -> None:
        print(msg, flush=True)

    started, load_before = time.time(), loadavg()
    timing, memory = _methods(device, args)
    descriptions = {
        n: p.description
        for n, p in list(PROVIDERS.items()) + list(PAIR_PROVIDERS.items())
        if n in names or n == FLOOR
    }

    def result(rows: List[dict], complete: bool) -> dict:
        meta = {
            "device": device.type,
            "device_name": device_name(device),
            "versions": versions(),
            "command": command,
            "argv": list(sys.argv[1:] if argv is None else argv),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "timing": timing,
            "memory": memory,
            "floor_time": "bare matmuls of the same shapes, operands in the matmul dtype "
            "(autocast setups: the autocast dtype, cast before the call): forward x@W; "
            "backward also dC@W^T and x^T@dC (pair level: x@x^T, dS@x, dS^T@x)",
            "floor_mem": "bytes of dW + dx (pair level: dx), in the parameters' dtype",
            "providers": descriptions,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
            "elapsed_s": round(time.time() - started, 1),
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": loadavg(),
            "cpu_count": os.cpu_count(),
            "complete": complete,
        }
        out = {"meta": meta, "rows": rows}
        if counter is not None:
            from .specialisations import compiled_variants

            out["specialisations"] = {
                "count": counter.count,
                "per_kernel": counter.per_kernel(),
                "compiled": compiled_variants(),
                "keys": counter.keys(),
            }
        return out

    name = args.name or args.preset or device.type
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
                make_row(setup, n, m, status="skipped", reason=reason)
                for n in ordered
                for m in args.modes
            ]
            continue
        rows += run_setup(setup, names, args.modes, device, args, runner, log, counter)
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
    final["predicted"] = predicted_lines(rows, device.type == "cuda")
    print("\n" + "\n".join(final["predicted"]))
    if counter is not None:
        print(f"\nTriton kernel specialisations launched: {counter.summary()}")
    if args.check:
        outcomes = evaluate(rows, args.limits)
        if counter is not None:
            outcomes += operand_outcomes(rows)
            spec = final["specialisations"]
            limit = args.limits.get("kernel-specialisations", SPECIALISATIONS_LIMIT)
            outcomes.append(
                specialisations_outcome(counter.count, limit, counter.summary(), spec["compiled"])
            )
        final["targets"] = [o.as_dict() for o in outcomes]
        final["failed_targets"] = sum(o.status == "FAIL" for o in outcomes)
        print()
        for o in outcomes:
            print(o.line())
    paths = write_results(final, args.out, name, args.note)
    print("\nwrote " + ", ".join(paths.values()))
    return final
