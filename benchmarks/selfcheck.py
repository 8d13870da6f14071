"""Run the fused kernels' self-check (pml_extras.ops.kernel_check) on this machine's device.

For each kernel family and operand dtype, the check impl="auto" runs once per process
before it trusts the Triton kernels: a small fixed problem, forward and backward, Triton
against the PyTorch path on the same device. One line each:

    SELF-CHECK family=class_lse device=cuda:0 dtype=bfloat16: PASS max_rel_err=2.1e-03 time=3.80s

then the device and versions. The exit status is 1 when any check fails (the failing
line's detail follows it), 2 on bad arguments. ``time`` is the whole one-time cost
of that check in a fresh process, Triton compilation included (on a GPU the second run
of a process finds the kernels in Triton's on-disk cache).

    python benchmarks/selfcheck.py                      # CUDA if present, else CPU
    TRITON_INTERPRET=1 python benchmarks/selfcheck.py --device cpu --family class_lse
    python benchmarks/selfcheck.py --out benchmarks/results/selfcheck/cuda.json
    python benchmarks/selfcheck.py --dtype bfloat16 --storage float32,same  # bf16 W too

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here when
unset: it must be set before the kernel modules are imported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    from pml_extras.ops.dispatch import FAMILIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if any)")
    p.add_argument("--family", default=",".join(FAMILIES), help=f"comma list of {FAMILIES}")
    p.add_argument("--dtype", default=",".join(DTYPES), help=f"comma list of {tuple(DTYPES)}")
    p.add_argument(
        "--storage",
        default="float32",
        help="comma list of W's storage for the class family: float32 (as under autocast) "
        "and/or same (W stored in the operand dtype, e.g. bf16 proxies)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.family = [f for f in args.family.split(",") if f]
    args.dtype = [d for d in args.dtype.split(",") if d]
    args.storage = [s for s in args.storage.split(",") if s]
    for s in args.storage:
        if s not in ("float32", "same"):
            p.error(f"unknown storage {s!r}; expected float32 or same")
    for f in args.family:
        if f not in FAMILIES:
            p.error(f"unknown family {f!r}; expected one of {FAMILIES}")
    for d in args.dtype:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; expected one of {tuple(DTYPES)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def line(result) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    return (
        f"SELF-CHECK family={result.family} device={result.device} dtype={result.dtype}"
        + (f" W={result.storage}" if result.storage and result.storage != "float32" else "")
        + ": "
        f"{verdict} max_rel_err={result.max_rel_err:.2e} time={result.seconds:.2f}s"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            print("on CPU the kernels need TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    elif device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here", file=sys.stderr)
        return 2
    from pml_extras.ops import kernel_check as selfcheck

    results, failed = [], 0
    for family in args.family:
        for name in args.dtype:
            dtype = DTYPES[name]
            storages = {torch.float32 if s == "float32" else dtype for s in args.storage}
            if family != "class_lse":
                storages = {None}  # the pair kernels have no W
            for storage in sorted(storages, key=str):
                result = selfcheck.run_kernel_check(family, device, dtype, storage)
                print(line(result), flush=True)
                if not result.passed:
                    failed += 1
                    print(f"  {result.describe()}", flush=True)
                results.append(result)
    print(f"device: {selfcheck.device_description(device)}; {selfcheck.versions()}")
    print(f"self-check: {len(results) - failed} PASS, {failed} FAIL")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        record = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "device": selfcheck.device_description(device),
            "versions": selfcheck.versions(),
            "platform": platform.platform(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": [_record(r) for r in results],
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return 1 if failed else 0


def _json_float(value: float):
    return value if value == value and abs(value) != float("inf") else str(value)


def _record(result) -> dict:
    errors = {k: _json_float(v) for k, v in result.errors.items()}
    return {**result.__dict__, "max_rel_err": _json_float(result.max_rel_err), "errors": errors}


if __name__ == "__main__":
    sys.exit(main())
