"""Offline re-sharding of per-rank checkpoints of the class-sharded losses.

Training writes one file per rank (the recipe in docs/distributed.md): the loss's ``state_dict()``
(``W`` shard (D, C_r), ``class_range``, ``sample_step``, CurricularFace's ``t``) under one key,
the state of an optimizer that holds only the loss's parameters under another, and any
replicated entries (backbone, its optimizer, the scaler, the step) beside them.
:func:`reshard_checkpoints` turns N such files into M files for another world size, on
CPU, one destination rank at a time: the sources are memory-mapped (``torch.load(...,
mmap=True)``), so only the columns being copied are read, and the process holds one
destination shard (plus its optimizer state) at a time, never all of W, and no GPU at all.

What is carried: every W column and, sliced the same way, every optimizer-state tensor of
W's shape (SGD's momentum, Adam's/AdamW's ``exp_avg`` and ``exp_avg_sq``, RMSprop,
Adagrad...), the optimizer's scalar state (``step``) and param groups, ``t``, ``sample_step``
and the replicated entries (copied from rank 0's file). What is not: the sequence of
sampled negative classes (``sample_rate`` < 1) is drawn per rank from (seed, step, rank)
over the rank's own shard, so after re-sharding the draws differ from those an
uninterrupted run would make (the distribution is the same); optimizer state of another
shape (Adafactor's factored moments, L-BFGS history) is refused with an error.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .sharded import shard_ranges


def _load(path) -> dict:
    # os.fspath: torch 2.1 rejects a pathlib.Path with mmap=True (a str works everywhere).
    return torch.load(os.fspath(path), map_location="cpu", mmap=True, weights_only=True)


def _slice_columns(parts: Sequence[Tensor], ranges, lo: int, hi: int) -> Tensor:
    """Columns [lo, hi) of the concatenation of ``parts`` (part s holds ranges[s])."""
    pieces = []
    for part, (s_lo, s_hi) in zip(parts, ranges):
        a, b = max(lo, s_lo), min(hi, s_hi)
        if a < b:
            pieces.append(part[:, a - s_lo : b - s_lo])
    return torch.cat(pieces, dim=1).contiguous()


def _same(values, what: str):
    first = values[0]
    for r, v in enumerate(values[1:], 1):
        equal = torch.equal(v, first) if torch.is_tensor(first) else v == first
        if not equal:
            raise ValueError(f"{what} differs between rank 0 ({first}) and rank {r} ({v})")
    return first.clone() if torch.is_tensor(first) else first


def _reshard_optimizer(states: List[dict], ranges, lo, hi, key: str) -> dict:
    for r, st in enumerate(states):
        params = [p for g in st["param_groups"] for p in g["params"]]
        if len(params) != 1:
            raise ValueError(
                f"checkpoint {r}: '{key}' holds {len(params)} parameters; re-sharding needs an "
                "optimizer over the loss's W only (a separate optimizer from the backbone's)"
            )
    pid = states[0]["param_groups"][0]["params"][0]
    per_rank = [st["state"].get(st["param_groups"][0]["params"][0], {}) for st in states]
    names = set(per_rank[0])
    if any(set(s) != names for s in per_rank):
        raise ValueError(f"'{key}': the ranks' optimizer states hold different entries")
    out: Dict[str, object] = {}
    for name in sorted(names):
        values = [s[name] for s in per_rank]
        width = [hi_ - lo_ for lo_, hi_ in ranges]
        if torch.is_tensor(values[0]) and values[0].ndim == 2:
            if any(tuple(v.shape[1:]) != (w,) for v, w in zip(values, width)):
                raise ValueError(f"'{key}' state '{name}' does not have W's shape")
            out[name] = _slice_columns(values, ranges, lo, hi)
        elif not torch.is_tensor(values[0]) or values[0].ndim == 0:
            out[name] = _same(values, f"'{key}' state '{name}'")
        else:
            raise ValueError(
                f"'{key}' state '{name}' has shape {tuple(values[0].shape)}, neither W's nor "
                "a scalar: this optimizer's state cannot be re-sharded by columns"
            )
    return {"state": {pid: out} if out else {}, "param_groups": states[0]["param_groups"]}


def reshard_checkpoints(
    src_paths: Sequence[str],
    dst_dir: str,
    world_size: int,
    *,
    shard_sizes: Optional[Sequence[int]] = None,
    loss_key: str = "loss",
    optimizer_key: Optional[str] = "loss_opt",
    filename: str = "rank{rank}.pt",
) -> List[str]:
    """Write ``world_size`` per-rank checkpoints from the per-rank ``src_paths`` (in rank order).

    Args:
        src_paths: the N files saved by ranks 0..N-1 (``torch.save`` of a dict).
        dst_dir: where to write ``filename.format(rank=q)`` for q < ``world_size``.
        world_size: the new number of ranks M; ``shard_sizes`` optionally the new
            classes per rank (default: :func:`shard_ranges`'s even split, the sharded
            losses' default).
        loss_key: the entry holding the loss's ``state_dict()``.
        optimizer_key: the entry holding the state of an optimizer over the loss's W only
            (None: no optimizer state is carried, the entry is dropped).

    Returns the written paths. The other entries are copied from rank 0's file.
    """
    srcs = [_load(p) for p in src_paths]
    if not srcs:
        raise ValueError("reshard_checkpoints needs at least one source checkpoint")
    losses = [s[loss_key] for s in srcs]
    ranges = [tuple(int(v) for v in ls["class_range"].tolist()) for ls in losses]
    num_classes = ranges[-1][1]
    if ranges[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise ValueError(f"the checkpoints' class ranges {ranges} do not tile [0, C) in order")
    new_ranges = shard_ranges(num_classes, world_size, shard_sizes)
    os.makedirs(dst_dir, exist_ok=True)
    written = []
    for q, (lo, hi) in enumerate(new_ranges):
        loss_state = {}
        for name in losses[0]:
            if name == "W":
                loss_state[name] = _slice_columns([ls["W"] for ls in losses], ranges, lo, hi)
            elif name == "class_range":
                loss_state[name] = torch.tensor([lo, hi], dtype=torch.int64)
            else:  # sample_step, t: the same on every rank
                loss_state[name] = _same([ls[name] for ls in losses], f"'{loss_key}.{name}'")
        out = {k: v for k, v in srcs[0].items() if k not in (loss_key, optimizer_key)}
        out[loss_key] = loss_state
        if optimizer_key is not None and optimizer_key in srcs[0]:
            opts = [s[optimizer_key] for s in srcs]
            out[optimizer_key] = _reshard_optimizer(opts, ranges, lo, hi, optimizer_key)
        path = os.path.join(dst_dir, filename.format(rank=q))
        torch.save(out, path)
        written.append(path)
        del out, loss_state
    return written
