"""Start and stop the gloo process group of a test rank so that no gloo thread outlives it.

Why this matters: a gloo worker thread that is still running when the interpreter shuts
down can free its last work object mid-finalisation; Python then ends the thread inside a
C++ destructor and the process aborts ("terminate called without an active exception",
rc = -6), about one run in six. ``destroy_process_group()`` joins gloo's threads only if
it drops the *last* reference to the group; two things kept one:

* a DistributedDataParallel model (its reducer holds the group): release it first;
* importing ``torch._dynamo`` after ``init_process_group`` (pml_extras imports it): it
  keeps a reference to the default group. Import the package first.

:func:`shutdown` then checks that the threads are gone (Linux thread names), so a
teardown that regresses fails every time instead of once in a while.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch.distributed as dist

import pml_extras.distributed  # noqa: F401  (before init_process_group, see above)
import pml_extras.losses  # noqa: F401


def gloo_threads() -> list:
    """Names of this process's threads that belong to gloo or the TCP store (Linux)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if "gloo" in name or "tcpstore" in name:
            names.append(name)
    return names


def init(world: int, rank: int, port: int, timeout_s: float) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def shutdown() -> None:
    """Barrier, destroy the group, and fail if a gloo thread is still alive.

    Call it after everything that held the group (DDP models, scalers) has gone out of
    scope; the garbage collector runs first for what sits in reference cycles.
    """
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()
    left = gloo_threads()
    if left:
        raise RuntimeError(
            f"gloo threads {left} outlive destroy_process_group(): something still holds "
            "the process group (a DDP model, or torch._dynamo imported after init)"
        )
