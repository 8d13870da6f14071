"""Launcher plumbing shared by the Triton kernel modules (``class_lse_triton``,
``pair_circle_triton``): tile-config overrides, operand dtypes and torch's TF32 setting,
the D layout of the second-stage accumulators, how many programs fill the GPU in whole
waves, and the device a launch runs on."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Iterable, Tuple

import torch
import triton
import triton.language as tl

# torch's TF32 setting lives with the operand policy; re-exported for the launchers.
from .precision import fp32_matmul_precision, tf32_enabled  # noqa: F401

try:  # triton >= 3.0
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover
    _InterpretedFunction = ()

# Under the CPU interpreter, float32 -> bfloat16 casts round as the GPU's do (Triton 3.9's
# interpreter truncates them): see _interpreter_rounding.
if os.environ.get("TRITON_INTERPRET") == "1":
    from ._interpreter_rounding import install as _install_rtne

    _install_rtne()

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def is_interpreted(kernel) -> bool:
    """Whether ``@triton.jit`` gave ``kernel`` to the CPU interpreter (TRITON_INTERPRET=1)."""
    return isinstance(kernel, _InterpretedFunction) if _InterpretedFunction else False


class ConfigSlot:
    """A module-wide tile configuration (a frozen dataclass) with temporary overrides."""

    def __init__(self, default):
        self.current = default

    @contextlib.contextmanager
    def override(self, **changes):
        """Replace fields of the current configuration inside a ``with`` block."""
        old = self.current
        self.current = dataclasses.replace(old, **changes)
        try:
            yield self.current
        finally:
            self.current = old


def check_tile_sizes(cfg, names: Iterable[str], dot_operand: bool, interpreted: bool) -> None:
    """Tile sizes must be powers of two; those of ``tl.dot`` operands >= 16 on a GPU."""
    for name in names:
        value = getattr(cfg, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"BlockConfig.{name} must be a power of two, got {value}")
        if dot_operand and not interpreted and value < 16:
            raise ValueError(f"BlockConfig.{name} must be >= 16 for tl.dot on a GPU, got {value}")
    splits = getattr(cfg, "n_splits", None)
    if splits is not None and splits < 1:
        raise ValueError(f"BlockConfig.n_splits must be >= 1 or None, got {splits}")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so that the cross-split combines are exercised


@functools.lru_cache(maxsize=256)
def wave_splits(
    programs_per_split: int, n_tiles: int, slots: int, max_splits: int
) -> Tuple[int, int]:
    """(splits, tiles per split) so that ``programs_per_split * splits`` programs fill
    whole waves of ``slots`` concurrent programs (SMs x blocks per SM).

    A grid of P programs runs in ceil(P / slots) waves; a last wave that is only partly
    full leaves the rest of the GPU idle (P = 272 on 132 slots: 3 waves, the last with 8
    programs, 31 % of the time idle). Splits are tried from 1 up to ``max_splits``, each
    as its effective count after rounding tiles per split up; the first whose waves are
    at least 95 % full wins (fewest splits: fewest partial sums), else the fullest.
    """
    programs_per_split, slots = max(1, programs_per_split), max(1, slots)
    limit = max(1, min(max_splits, n_tiles))
    best = (-1.0, 1, max(1, n_tiles))
    for want in range(1, limit + 1):
        per_split = triton.cdiv(n_tiles, want)
        splits = triton.cdiv(n_tiles, per_split)
        programs = programs_per_split * splits
        fill = programs / (triton.cdiv(programs, slots) * slots)
        if fill >= 0.95:
            return splits, per_split
        if fill > best[0]:
            best = (fill, splits, per_split)
    return best[1], best[2]


def launch_device(t: torch.Tensor):
    """``with launch_device(x):`` makes x's GPU current for a Triton launch.

    Triton launches on ``torch.cuda.current_device()``, not on the tensors' device, so
    tensors on cuda:1 without a matching ``set_device`` would fault. For CPU tensors (the
    interpreter) the index is -1, which ``torch.cuda.device`` treats as "no change"
    without initialising CUDA: the same line runs in CI."""
    return torch.cuda.device(t.device.index if t.device.type == "cuda" else -1)


def operand_types(dtype: torch.dtype, interpreted: bool, what: str):
    """(operand, dot-input, precision) Triton types for matmul operands of ``dtype``.

    Float32 operands use IEEE dots unless torch's float32 matmul precision is TF32
    (:func:`tf32_enabled`), as PyTorch's own matmuls would. Triton 3.9's interpreter
    multiplies bf16 tensors as their raw uint16 storage in ``tl.dot``, so there bf16
    operands go in as float32 (same values)."""
    if dtype not in TL_DTYPES:
        raise TypeError(
            f"the Triton {what} kernels support float32/bfloat16/float16 operands, got "
            f"{dtype}; use impl='torch' (impl='auto' does so by itself)"
        )
    op = TL_DTYPES[dtype]
    dot = tl.float32 if (interpreted and op == tl.bfloat16) else op
    if op == tl.float32:
        precision = "tf32" if tf32_enabled() else "ieee"
    else:
        precision = None
    return op, dot, precision


def d_layout(d: int, block_d: int, group: int, interpreted: bool) -> Tuple[int, int, int]:
    """(block_d, d_group, n_groups): all of D in one group when its padded size fits
    ``group``, else ``group``-wide slices over a grid axis."""
    d_pad = next_pow2(d) if interpreted else max(16, next_pow2(d))
    if d_pad <= group:
        return min(block_d, d_pad), d_pad, 1
    return block_d, group, triton.cdiv(d, group)
