"""Per-rank peak memory of a sharded training step and of ``predict``: formula vs measurement.

    torchrun --nproc_per_node=2 benchmarks/distributed_memory.py            # CPU, gloo
    python benchmarks/distributed_memory.py --formula-only                  # the C=10M table

Model (fp32 W, C_r = C/N classes per rank, B_g = global batch, D, sampling rate r,
s optimizer-state tensors per parameter: SGD momentum 1, Adam 2; blk = 4*B_g*chunk = 16 MiB,
the class pass's float32 score block, chunk*B_g = 2**22), in bytes:

    train   = max(backward, step) + 8*B_g*D           (gathered embeddings and their grad)
    backward= 4*D*C_r*2 + k*blk + [r < 1] 8*D*C_r*r   W, its gradient, k score-block
                                                      temporaries, sampled copy + its grad
    step    = 4*D*C_r*(2 + s)                         W, gradient, optimizer state
    predict = 4*D*C_r + 4*B_g*D + 4*B_g*chunk + 4*D*chunk   W, gathered batch, one score
                                                      block, one W chunk

k (~8, the CPU torch path's temporaries per block) is fitted to the intercept of two runs
at different C; the check is that the slope in C matches (2 W-sized buffers at the
backward peak) and that predict matches with nothing fitted.

The previous ``predict`` built the B_g x C_r scores and a normalised copy of the shard:
4*D*C_r + 4*B_g*C_r + 4*D*C_r + 4*B_g*D. Partial FC (An et al., 2021), as the issue counts
it, materialises the sampled logits B_g x C_r*r and their gradient in fp32 beside W, its
gradient and momentum: 4*D*C_r*(2 + s) + 8*B_g*C_r*r.

Run under ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every large buffer on its own
and returns it when freed (else freed memory is reused without showing in the RSS).
The measurement (Linux) resets the process's peak resident set (``/proc/self/clear_refs``)
before the measured part and reports VmHWM minus the resident set before it; it includes
allocator slack, so it is an upper bound of the tensors' peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_train import shutdown

# Before init_process_group: importing torch._dynamo (pml_extras does) after it keeps a
# reference to the group, and gloo's threads then outlive destroy_process_group().
from pml_extras import _env
from pml_extras.distributed import ShardedSparseCircleLoss

MiB = float(1 << 20)
CHUNK_ELEMS = 1 << 22


def formula(C, D, N, B_g, r=1.0, states=1, k=8.0):
    """Bytes per rank (see the module docstring)."""
    c_r = C / N
    chunk = max(1, CHUNK_ELEMS // B_g)
    blk = 4 * B_g * chunk
    backward = 4 * D * c_r * 2 + k * blk + (8 * D * c_r * r if r < 1 else 0.0)
    step = 4 * D * c_r * (2 + states)
    train = max(backward, step) + 8 * B_g * D
    predict = 4 * D * c_r + 4 * B_g * D + 4 * B_g * chunk + 4 * D * chunk
    old_predict = 4 * D * c_r + 4 * B_g * c_r + 4 * D * c_r + 4 * B_g * D
    partial_fc = 4 * D * c_r * (2 + states) + 8 * B_g * c_r * r
    return dict(train=train, predict=predict, old_predict=old_predict, partial_fc=partial_fc)


# Peak resident memory of a block above the resident memory before it: the one home of
# peak-memory measurement, shared with the speed benchmark.
Peak = _env.PeakRSSGrowth


def measure(args, rank, world):
    torch.manual_seed(0)
    B_g = args.batch * world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.dim, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    loss_fn = ShardedSparseCircleLoss(
        args.num_classes, args.dim, sample_rate=args.sample_rate, init_seed=0
    )
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.1, momentum=0.9)
    dist.barrier()
    with Peak() as train:  # the first (cold) step: every buffer is new memory
        loss_fn(x.clone().requires_grad_(True), y).backward()
        opt.step()
    loss_fn.eval()
    with Peak() as predict:
        loss_fn.predict(x)
    with Peak() as old:  # the previous predict: all scores of the shard at once
        x_all = torch.cat([x] * world)
        w = F.normalize(loss_fn.W.detach(), dim=0)
        (F.normalize(x_all, dim=1) @ w).max(dim=1)
        del w, x_all
    # The model counts W in each; W existed before the measured blocks, so add it.
    w_bytes = loss_fn.W.numel() * 4
    model = formula(args.num_classes, args.dim, world, B_g, args.sample_rate)
    return dict(
        rank=rank,
        measured_train=train.bytes + w_bytes,
        measured_predict=predict.bytes + w_bytes,
        measured_old_predict=old.bytes + w_bytes,
        **{f"formula_{k}": v for k, v in model.items()},
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-classes", type=int, default=400_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=512, help="per rank")
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--formula-only", action="store_true")
    p.add_argument("--out", default=None, help="JSON file for the results (rank 0)")
    args = p.parse_args(argv)

    big = {}
    for opt_name, states in (("SGD momentum", 1), ("Adam", 2)):
        for r in (1.0, 0.1):
            f = formula(10_000_000, 512, 8, 8192, r, states=states)
            big[f"{opt_name}, r={r}"] = {k: v / (1 << 30) for k, v in f.items()}
    lines = ["C=10M, D=512, B_g=8192, 8 ranks, fp32 W (GiB per rank, formula):"]
    for key, f in big.items():
        lines.append(
            f"  {key}: train {f['train']:.2f}  predict {f['predict']:.2f}  "
            f"previous predict {f['old_predict']:.2f}  Partial FC train {f['partial_fc']:.2f}"
        )
    if args.formula_only:
        print("\n".join(lines))
        return
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    row = measure(args, rank, world)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print(
            f"C={args.num_classes} D={args.dim} batch/rank={args.batch} ranks={world} "
            f"sample_rate={args.sample_rate} (MiB per rank: measured / formula)"
        )
        for r in rows:
            print(
                f"  rank {r['rank']}: train {r['measured_train'] / MiB:7.1f} / "
                f"{r['formula_train'] / MiB:7.1f}   predict {r['measured_predict'] / MiB:7.1f} / "
                f"{r['formula_predict'] / MiB:7.1f}   previous predict "
                f"{r['measured_old_predict'] / MiB:7.1f} / {r['formula_old_predict'] / MiB:7.1f}"
            )
        print("\n".join(lines))
        if args.out:
            meta = dict(
                command=" ".join([os.path.basename(sys.executable), *sys.argv]),
                torch=torch.__version__,
                python=platform.python_version(),
                device="cpu",
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                args=vars(args),
            )
            with open(args.out, "w") as f:
                json.dump(dict(meta=meta, ranks=rows, c10m_gib=big), f, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
