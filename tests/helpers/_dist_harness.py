"""The harness of the multi-process tests (tests/distributed): spawn gloo workers
(``_dist_worker.py``), and the single-process float64 references their results are checked
against.

Each rank runs every scenario of ``_dist_worker.py`` and saves its tensors; the contract
the references check is stated in tests/distributed/test_sharded_losses.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import _dist_worker as worker  # noqa: E402
import torch
import torch.nn.functional as F

from pml_extras.distributed import (
    shard_ranges,
)
from pml_extras.functional.circle import sparse_circle_loss
from pml_extras.functional.curricular import curricular_face_loss, update_t
from pml_extras.losses import (
    CurricularFaceLoss,
    SparseCircleLoss,
)
from pml_extras.ops.class_lse import target_cosine

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parents[1] / "helpers" / "_dist_worker.py"
F64 = torch.float64
DIM = 6
SUITES = "sharded,sampling,errors,wrappers"
CONFIGS = {
    2: dict(sizes=[5, 5], num_classes=8),
    3: dict(sizes=[4, 3, 5], num_classes=10),
}
TOL = dict(rtol=1e-9, atol=1e-11)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, sizes, num_classes, outdir, suites=SUITES, timeout=300.0, worker=WORKER, **env_kw):
    """Run ``world`` worker processes; return each rank's results dict.

    ``env_kw`` adds environment variables (e.g. ``PMLX_TIMEOUT``, the process group's
    timeout in seconds, so that a collective mismatch fails fast instead of hanging).
    """
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PMLX_SIZES=",".join(map(str, sizes)),
        PMLX_CLASSES=str(num_classes),
        PMLX_DIM=str(DIM),
        **{k: str(v) for k, v in env_kw.items()},
    )
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        log = open(outdir / f"rank{rank}.log", "w+")
        cmd = [sys.executable, str(worker), suites, str(world), str(rank), str(port), str(outdir)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = ""
    for rank, log in enumerate(logs):
        log.seek(0)
        text += f"--- rank {rank} (rc={procs[rank].returncode}) ---\n{log.read()[-4000:]}\n"
        log.close()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError(f"distributed workers failed or hung:\n{text}")
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected, **(tol or TOL))


def objective_reference(kind, case, sizes, steps, kw, train=True, weights=None, reg=None):
    """Single-process, full-W, float64: per step the objective L = (1/N) sum_r L_r.

    L_r = mean over rank r's rows of the per-sample losses (times miner weights) plus
    reg(W_r). Returns per-step lists of (L_r for each rank, dL/dX, dL/dW, t) after the same
    SGD steps on W as the workers take.
    """
    xs, ys, w = case
    world, num_classes = len(sizes), w.shape[1]
    ranges = shard_ranges(num_classes, world)
    # The sharded losses' defaults are their single-device twins' for the global (C, D).
    twin = SparseCircleLoss if kind == "circle" else CurricularFaceLoss
    kw = twin.resolve_hyper_parameters(num_classes, w.shape[0], **kw)
    weight = w.clone().requires_grad_(True)
    t = torch.zeros(1, dtype=F64)
    out = {"losses": [], "x_grad": [], "w_grad": [], "t": []}
    for step in range(steps):
        x = xs[step].clone().requires_grad_(True)
        y = ys[step]
        if kind == "circle":
            per = sparse_circle_loss(x, weight, y, kw["m"], kw["gamma"])
        else:
            cos = target_cosine(F.normalize(x, dim=1), weight, y)
            if train:
                t = update_t(t, cos, kw["momentum"])
            per = curricular_face_loss(x, weight, y, t, kw["margin"], kw["scale"])
        if weights is not None:
            per = per * weights
        rank_losses = []
        for r in range(world):
            part = per[worker.rows(sizes, r)]
            value = part.mean() if len(part) else per.sum() * 0
            if reg is not None:
                lo, hi = ranges[r]
                value = value + reg(weight[:, lo:hi].t())
            rank_losses.append(value)
        objective_step(out, rank_losses, x, weight, t)
    return out


def objective_step(out, rank_losses, x, weight, t):
    """Backward of L = mean over ranks of ``rank_losses``; record (L_r, dL/dx, dL/dW, t)
    in ``out`` and take the workers' SGD step on ``weight``."""
    (sum(rank_losses) / len(rank_losses)).backward()
    out["losses"].append(torch.stack(rank_losses).detach())
    out["x_grad"].append(x.grad.clone())
    out["w_grad"].append(weight.grad.clone())
    out["t"].append(t.clone())
    with torch.no_grad():
        weight -= worker.LR * weight.grad
    weight.grad = None


def module_reference(kind, case, steps, kw):
    """The single-process loss module on the concatenated batch with the full W."""
    xs, ys, w = case
    cls = SparseCircleLoss if kind == "circle" else CurricularFaceLoss
    loss_fn = cls(w.shape[1], w.shape[0], **kw).double()
    with torch.no_grad():
        loss_fn.W.copy_(w)
    out = {"loss": [], "x_grad": [], "w_grad": [], "t": []}
    for step in range(steps):
        x = xs[step].clone().requires_grad_(True)
        loss = loss_fn(x, ys[step])
        loss.backward()
        out["loss"].append(loss.detach())
        out["x_grad"].append(x.grad.clone())
        out["w_grad"].append(loss_fn.W.grad.clone())
        out["t"].append(loss_fn.t.clone() if kind != "circle" else None)
        with torch.no_grad():
            loss_fn.W -= worker.LR * loss_fn.W.grad
        loss_fn.W.grad = None
    return out


def check_against(ref, results, name, sizes, steps, check_t=False):
    world = len(sizes)
    for step in range(steps):
        for r, res in enumerate(results):
            got = res[name]
            lo, hi = got["range"]
            close(got["loss"][step], ref["losses"][step][r])
            close(got["x_grad"][step], world * ref["x_grad"][step][worker.rows(sizes, r)])
            close(got["w_grad"][step], ref["w_grad"][step][:, lo:hi])
            if check_t:
                close(got["t"][step], ref["t"][step])


# ----------------------------------------------------------------------------- sharded
CIRCLE_KW = dict(m=0.25, gamma=64.0)


CURRICULAR_KW = dict(margin=0.5, scale=16.0, momentum=0.3)
