"""Peak CPU memory and time of one pair-level CircleLoss fwd+bwd call with mined pairs.

Compares ``pml_extras.losses.circle_loss.CircleLoss`` (``ours``: automatic path choice;
``ours-dense`` / ``ours-sparse``: one evaluation of the mined pairs forced) with PML's
``CircleLoss`` (``pml``), fed the same pairs: every pair (``--density 1``, the default) or a
random subset of each pair's list kept with probability ``--density``.

Method, as in ``benchmarks/speed_bench/timing.py``: every configuration runs in a fresh
process; glibc's mmap threshold is pinned so freed large blocks go back to the OS; the pairs
are computed before the measured call (they are an input, held by every implementation); one
warm-up call, then ``/proc/self/clear_refs`` resets VmHWM and the reported figure is VmHWM
minus the VmRSS held before the measured call. Time is ``time.perf_counter`` around that
one call: single-shot, and inflated by the pinned mmap threshold (every large temporary is a fresh
mmap with its page faults), so use ``benchmarks/speed.py`` for timings.

Example::

    python benchmarks/mined_pair_memory.py --impl ours,ours-sparse,pml --B 2048 --D 128
    python benchmarks/mined_pair_memory.py --impl ours-dense,ours-sparse --B 1024 \\
        --density 0.01,0.1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import shlex
import subprocess
import sys
import time

IMPLS = ("ours", "ours-dense", "ours-sparse", "pml")


def _pairs(labels, density: float, seed: int):
    import torch
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    pairs = lmu.get_all_pairs_indices(labels)
    if density >= 1.0:
        return pairs
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows, cols in (pairs[:2], pairs[2:]):
        keep = torch.rand(len(rows), generator=gen) < density
        out += [rows[keep], cols[keep]]
    return tuple(out)


def measure(impl: str, batch: int, dim: int, density: float, threads: int) -> str:
    """One configuration in this process; returns the report line."""
    import torch
    from pytorch_metric_learning import losses as pml_losses

    from pml_extras import _env
    from pml_extras.losses.circle_loss import CircleLoss

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: large blocks are mmapped ...
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: ... and freed memory is returned
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=gen).requires_grad_()
    labels = torch.div(torch.randperm(batch, generator=gen), 4, rounding_mode="floor")
    indices = _pairs(labels, density, seed=1)
    num_pairs = sum(len(t) for t in indices[::2])
    if impl == "pml":
        fn = pml_losses.CircleLoss(m=0.25, gamma=256.0)
    else:
        fn = CircleLoss(m=0.25, gamma=256.0)
        fn._mined_path = {"ours": "auto", "ours-dense": "dense", "ours-sparse": "sparse"}[impl]

    def step():
        x.grad = None
        fn(x, labels, indices).backward()

    step()  # warm-up: lazy initialisation is not the loss's memory
    x.grad = None
    gc.collect()
    libc.malloc_trim(0)
    with _env.PeakRSSGrowth() as peak:  # the one home of peak-memory measurement
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    extra_mib = peak.bytes / 2**20
    path = ""
    if impl == "ours":
        from pml_extras.ops.pair_circle import choose_mined_path

        path = f" ({choose_mined_path(num_pairs, batch, batch)})"
    return (
        f"{impl + path:18s} B={batch} D={dim} density={density:g} pairs={num_pairs} "
        f"extra_peak={extra_mib:.1f} MiB (one P x D fp32 = {num_pairs * dim * 4 / 2**20:.0f} "
        f"MiB, B x B fp32 = {batch * batch * 4 / 2**20:.0f} MiB) fwd+bwd {seconds * 1e3:.0f} ms"
    )


def _list(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", type=_list(str), default=["ours", "pml"], help=", ".join(IMPLS))
    p.add_argument("--B", type=_list(int), default=[2048], help="batch sizes (N = B)")
    p.add_argument("--D", type=_list(int), default=[128], help="embedding sizes")
    p.add_argument("--density", type=_list(float), default=[1.0], help="fraction of pairs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument(
        "--as-limit-gib", type=float, default=18.0, help="address-space cap per run (0: none)"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for impl in args.impl:
        if impl not in IMPLS:
            p.error(f"unknown --impl {impl!r}; expected one of {IMPLS}")
    for d in args.density:
        if not 0.0 < d <= 1.0:
            p.error(f"--density must be in (0, 1], got {d}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        if args.as_limit_gib > 0:
            cap = int(args.as_limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # protect a shared machine
        print(measure(args.impl[0], args.B[0], args.D[0], args.density[0], args.threads))
        return
    print("python " + shlex.join([os.path.relpath(__file__)] + sys.argv[1:]), flush=True)
    for batch in args.B:
        for dim in args.D:
            for density in args.density:
                for impl in args.impl:
                    child = [sys.executable, os.path.abspath(__file__), "--child"]
                    child += ["--impl", impl, "--B", str(batch), "--D", str(dim)]
                    child += ["--density", repr(density), "--threads", str(args.threads)]
                    child += ["--as-limit-gib", str(args.as_limit_gib)]
                    run = subprocess.run(child, capture_output=True, text=True)
                    if run.returncode:
                        tail = (run.stderr or run.stdout).strip().splitlines()[-1:]
                        print(f"{impl:18s} B={batch} D={dim} density={density:g} failed: {tail}")
                    else:
                        print(run.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
