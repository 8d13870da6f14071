"""A small multi-process training run with a class-sharded loss, and its memory per rank.

    torchrun --nproc_per_node=2 benchmarks/distributed_train.py --num-classes 2000 --steps 300
    torchrun --nproc_per_node=2 benchmarks/distributed_train.py --num-classes 1000000 \\
        --dim 128 --steps 3 --memory
    torchrun --nproc_per_node=1 benchmarks/distributed_train.py ...   # one-process baseline
    torchrun --nproc_per_node=2 benchmarks/distributed_train.py --clip-grad-norm 5.0 ...

The backbone (an MLP on synthetic inputs) is wrapped in DistributedDataParallel; the loss
(``ShardedSparseCircleLoss`` or ``ShardedCurricularFaceLoss``) is not, and each rank
holds only its shard of W. ``--backend auto`` picks NCCL when CUDA is available, else gloo.

Data: class c's inputs are ``sin(c * f + phase) + noise`` for fixed random frequencies f and
phases (a distinct, learnable pattern per class, without a C-sized table in memory); each
rank draws its own labels from a rank-specific generator.

``--amp`` runs the forward under ``torch.autocast`` in float16 (CUDA or CPU) with a
:class:`pml_extras.distributed.GlobalGradScaler` (every rank skips the same overflowing
steps); the gradients are unscaled before clipping.

``--clip-grad-norm MAX`` clips the gradient of (backbone + the whole sharded W) with
:func:`pml_extras.distributed.clip_grad_norm_` before each optimizer step; the log then
shows that total norm, and at step 1 each rank's local-only norm (what
``torch.nn.utils.clip_grad_norm_`` on one rank would have used).

Memory is reported two ways, per rank: *counted* = the bytes of the loss's parameters, their
gradients and the optimizer state (exact, from the tensors), and *measured* = the process's
peak resident set size (VmHWM, Linux; includes the Python runtime, torch and transients) or,
on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from pml_extras import _env
from pml_extras.distributed import (
    GlobalGradScaler,
    ShardedCurricularFaceLoss,
    ShardedSparseCircleLoss,
    clip_grad_norm_,
)

MB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--loss", default="circle", choices=["circle", "curricular"])
    p.add_argument("--num-classes", type=int, default=2000)
    p.add_argument("--dim", type=int, default=128, help="embedding size D")
    p.add_argument("--input-dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: keep)")
    p.add_argument(
        "--clip-grad-norm",
        type=float,
        default=None,
        metavar="MAX",
        help="clip the (backbone + full W) gradient norm to MAX before each step",
    )
    p.add_argument("--amp", action="store_true", help="float16 autocast + GlobalGradScaler")
    p.add_argument("--eval-batches", type=int, default=4, help="evaluation batches per rank")
    p.add_argument("--eval-batch-size", type=int, default=256, help="per rank")
    p.add_argument(
        "--memory", action="store_true", help="report memory after every step (large-C runs)"
    )
    return p.parse_args(argv)


def setup(backend: str):
    if "RANK" not in os.environ:  # plain `python benchmarks/distributed_train.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
    use_cuda = torch.cuda.is_available() and backend in ("auto", "nccl")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device, backend


def make_batch(labels, freq, phase, noise, generator):
    x = torch.sin(labels[:, None].to(freq.dtype) * freq[None, :] + phase[None, :])
    return x + noise * torch.randn(x.shape, generator=generator, device=x.device)


def counted_bytes(params, optimizer) -> dict:
    """Exact bytes of parameters, gradients and optimizer state of ``params``."""
    ids = {id(p) for p in params}
    param = sum(p.numel() * p.element_size() for p in params)
    grad = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = 0
    for p, st in optimizer.state.items():
        if id(p) in ids:
            state += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return {"param": param, "grad": grad, "optim": state, "total": param + grad + state}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device, backend = setup(args.backend)
    train(args, rank, world, device, backend)
    # The DDP model went with train()'s frame: the group can be destroyed for good.
    shutdown()


def shutdown():
    """Destroy the process group and check that no gloo thread outlives it.

    A gloo worker thread still running at interpreter exit can abort the process (rc -6,
    "terminate called without an active exception"). ``destroy_process_group()`` joins
    gloo's threads only when it drops the last reference to the group, so whatever held
    it (a DDP model; ``torch._dynamo`` imported after ``init_process_group``) must be gone
    first. The check reads the thread names (Linux only).
    """
    import gc

    dist.barrier()
    gc.collect()  # DDP sits in reference cycles
    dist.destroy_process_group()
    gc.collect()
    names = []
    if os.path.isdir("/proc/self/task"):
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    names.append(f.read().strip())
            except OSError:
                pass
    left = [name for name in names if "gloo" in name]
    if left:
        raise RuntimeError(
            f"gloo threads {left} outlive destroy_process_group(): something still holds "
            "the process group"
        )


def train(args, rank, world, device, backend):
    torch.manual_seed(args.seed)  # same backbone init and data pattern on every rank
    freq = torch.rand(args.input_dim, device=device) * 2.0 + 0.05
    phase = torch.rand(args.input_dim, device=device) * 6.2832
    backbone = torch.nn.Sequential(
        torch.nn.Linear(args.input_dim, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, args.dim),
    ).to(device)
    ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
    model = torch.nn.parallel.DistributedDataParallel(backbone, **ddp_kw)
    common = dict(sample_rate=args.sample_rate, seed=args.seed, init_seed=args.seed)
    if args.loss == "circle":
        loss_fn = ShardedSparseCircleLoss(args.num_classes, args.dim, m=0.25, gamma=64.0, **common)
    else:
        loss_fn = ShardedCurricularFaceLoss(args.num_classes, args.dim, **common)
    loss_fn = loss_fn.to(device)
    loss_params = list(loss_fn.parameters())
    groups = [{"params": model.parameters()}, {"params": loss_params}]
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=args.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank + 1)
    # Logits scaled by 64: the default initial scale 2**16 overflows the fp16 gradients
    # for the first ~6 steps (skipped); start at 2**10, the scaler grows it when it can.
    scaler = GlobalGradScaler(device.type, init_scale=2.0**10, enabled=args.amp)

    if rank == 0:
        print(
            f"backend={backend} world={world} device={device} loss={args.loss} "
            f"C={args.num_classes} D={args.dim} batch/rank={args.batch_size} "
            f"sample_rate={args.sample_rate} optimizer={args.optimizer} "
            f"threads/rank={torch.get_num_threads()}",
            flush=True,
        )
    for r in range(world):  # one rank at a time, so that the lines do not interleave
        dist.barrier()
        if r == rank:
            shard_mb = loss_fn.W.numel() * loss_fn.W.element_size() / MB
            print(
                f"[rank {rank}] owns classes [{loss_fn.class_start}, {loss_fn.class_end}) "
                f"W shard {tuple(loss_fn.W.shape)} {shard_mb:.1f} MB",
                flush=True,
            )
    dist.barrier()

    start = time.perf_counter()
    window, norm_window = [], []
    for step in range(1, args.steps + 1):
        labels = torch.randint(
            0, args.num_classes, (args.batch_size,), generator=generator, device=device
        )
        x = make_batch(labels, freq, phase, args.noise, generator)
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
            loss = loss_fn(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # before clipping: the norm of the true gradients
        if args.clip_grad_norm is not None:
            if step == 1:
                report_local_norms(rank, world, device, model, loss_params)
            # DDP has averaged the backbone's gradients (replicated); W differs per rank.
            grad_norm = clip_grad_norm_(
                model.parameters(), args.clip_grad_norm, sharded=loss_params
            )
            norm_window.append(float(grad_norm))
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():  # global mean of the per-rank losses, for the log
            value = loss.detach().clone()
            dist.all_reduce(value)
            window.append(float(value) / world)
        if step % args.log_every == 0 or step == args.steps or step == 1:
            if rank == 0:
                norm = ""
                if norm_window:  # the same value on every rank
                    norm = f"  grad norm {sum(norm_window) / len(norm_window):9.4f}"
                amp = f"  scale {scaler.get_scale():g}" if args.amp else ""
                print(
                    f"step {step:5d}  loss {sum(window) / len(window):9.4f}{norm}{amp}  "
                    f"({time.perf_counter() - start:7.1f} s)",
                    flush=True,
                )
            window, norm_window = [], []
        if args.memory:
            report_memory(rank, world, device, loss_params, optimizer, step)
    if not args.memory:
        report_memory(rank, world, device, loss_params, optimizer, args.steps)
        evaluate(args, rank, world, device, model, loss_fn, freq, phase)


@torch.no_grad()
def report_local_norms(rank, world, device, model, loss_params):
    """Each rank's 2-norm of (backbone + its own shard): what a per-rank clip would see."""
    grads = [p.grad for p in [*model.parameters(), *loss_params] if p.grad is not None]
    local = torch.stack([g.detach().double().norm() for g in grads]).norm().reshape(1)
    rows = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(rows, local.to(device))
    if rank == 0:
        values = ", ".join(f"rank {r}: {float(v):.4f}" for r, v in enumerate(rows))
        print(f"step 1 local-only grad norms (model + own shard): {values}", flush=True)


@torch.no_grad()
def evaluate(args, rank, world, device, model, loss_fn, freq, phase):
    """Nearest-proxy accuracy on fresh samples, over all C classes (``loss_fn.predict``)."""
    model.eval()
    loss_fn.eval()
    generator = torch.Generator(device=device).manual_seed(10**6 + rank)
    # Counts on the device: the all-reduce needs them there (NCCL), and no host sync per batch.
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    n = args.eval_batch_size
    for _ in range(args.eval_batches):
        labels = torch.randint(0, args.num_classes, (n,), generator=generator, device=device)
        pred = loss_fn.predict(model(make_batch(labels, freq, phase, args.noise, generator)))
        correct[0] += (pred == labels).sum()
        correct[1] += n
    dist.all_reduce(correct)
    if rank == 0:
        print(
            f"eval: nearest-proxy accuracy over all {args.num_classes} classes "
            f"{correct[0] / correct[1]:.3f} ({int(correct[1])} fresh samples)",
            flush=True,
        )


def report_memory(rank, world, device, loss_params, optimizer, step):
    counted = counted_bytes(loss_params, optimizer)
    cuda_peak = _env.cuda_peak_bytes(device) if device.type == "cuda" else 0
    local = torch.tensor(
        [counted["total"], _env.peak_rss_bytes(), cuda_peak], dtype=torch.float64, device=device
    )
    rows = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(rows, local)
    if rank == 0:
        for r, row in enumerate(rows):
            total, rss, cuda = row.tolist()
            measured = f"cuda peak {cuda / MB:8.1f} MB" if cuda else f"peak RSS {rss / MB:8.1f} MB"
            print(
                f"[step {step}] rank {r}: loss W+grad+optimizer state {total / MB:8.1f} MB "
                f"(counted), {measured} (measured)",
                flush=True,
            )


if __name__ == "__main__":
    main()
