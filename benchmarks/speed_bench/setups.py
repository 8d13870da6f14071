"""What is measured: setups (level, B, D, C, dtype), their shared inputs, and the grids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

# Storage dtype of the embeddings and W.
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
    # As users train with AMP: fp32 W and fp32 model output, the loss under torch.autocast.
    "autocast_bf16": torch.float32,
    "autocast_fp16": torch.float32,
}
AUTOCAST = {"autocast_bf16": torch.bfloat16, "autocast_fp16": torch.float16}
MODES = ("fwd", "fwd+bwd")
FLOOR = "floor"
MB = 1 << 20

DEFAULT_GRIDS = {
    # Face-recognition scale (the grid).
    "cuda": {
        "B": [1024],
        "D": [512],
        "C": [100_000, 1_000_000],
        "dtype": ["bf16", "autocast_bf16", "fp32"],
        "pair_B": [16384],
        "pair_D": [512],
        "pair_dtype": None,  # None: the class-level dtypes
        "repeats": 10,
        "warmup": 5,
        "min_run_time": 0.05,
    },
    # A few minutes on 2 idle cores (add --C 10000,100000,300000 for the C sweep).
    "cpu": {
        "B": [256],
        "D": [128],
        "C": [10_000, 100_000],
        "dtype": ["fp32"],
        "pair_B": [2048],
        "pair_D": [128],
        "pair_dtype": None,
        "repeats": 5,
        "warmup": 1,
        "min_run_time": 0.05,
    },
}

# Named option sets (``--preset``); explicit flags override them.
PRESETS = {
    # benchmarks/gpu_checks.sh's ``quick`` step: the targets on one H100/H200, a
    # few kernel specialisations (three class transforms x two operand layouts, one pair
    # dtype), fwd+bwd only. CosFace shares ArcFace's kernels ("scaled"), so it adds no
    # compilation.
    "quick": {
        "B": [1024],
        "D": [512],
        "C": [100_000, 1_000_000],
        "dtype": ["bf16", "autocast_bf16"],
        "pair_B": [16384],
        "pair_D": [512],
        "pair_dtype": ["bf16"],
        "providers": [
            "sparse_circle_triton",
            "sparse_circle_hybrid",  # the second class implementation, same run, same floor
            "curricular_triton",
            "arcface_triton",
            "cosface_triton",
            "pair_circle_triton",
        ],
        "modes": ["fwd+bwd"],
        "repeats": 10,
        "warmup": 2,
        "check": True,
        "count_specialisations": True,
    },
}


@dataclass(frozen=True)
class Setup:
    level: str  # "class" or "pair"
    B: int
    D: int
    C: Optional[int]  # None for pair-level setups
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        """Storage dtype of the embeddings and W (float32 for the autocast setups)."""
        return DTYPES[self.dtype]

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The torch.autocast dtype the loss's forward runs under, or None."""
        return AUTOCAST.get(self.dtype)

    @property
    def operand_dtype(self) -> torch.dtype:
        """The matmul operand dtype a loss should use: the autocast dtype, else storage."""
        return self.autocast_dtype or self.torch_dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def dense_elems(self) -> int:
        """Elements of one B x C (class) or B x B (pair) matrix."""
        return self.B * (self.C if self.level == "class" else self.B)

    def floor_mem(self) -> int:
        """Bytes the fwd+bwd call must allocate at least: dW (class level) and dx, in the
        parameters' own dtype (autocast keeps fp32 gradients)."""
        grad_w = self.D * self.C if self.level == "class" else 0
        return (grad_w + self.B * self.D) * self.itemsize

    def key(self) -> Tuple:
        return (self.level, self.B, self.D, self.C, self.dtype)


class Inputs:
    """The tensors a setup's cases share: x (leaf), labels and, for classes, W's values."""

    def __init__(self, setup: Setup, device: torch.device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = setup.torch_dtype
        self.x = torch.randn(setup.B, setup.D, generator=gen, device=device, dtype=dtype)
        self.x.requires_grad_(True)
        if setup.level == "class":
            self.labels = torch.randint(0, setup.C, (setup.B,), generator=gen, device=device)
            self.W = torch.randn(setup.D, setup.C, generator=gen, device=device, dtype=dtype)
        else:
            # Face-recognition style batches: 4 samples per identity, shuffled.
            perm = torch.randperm(setup.B, generator=gen, device=device)
            self.labels = torch.div(perm, 4, rounding_mode="floor")
            self.W = None


def grid_for(device: torch.device) -> dict:
    return DEFAULT_GRIDS["cuda" if device.type == "cuda" else "cpu"]


def build_setups(args, device: torch.device) -> List[Setup]:
    """Class-level setups for every (dtype, B, D, C), pair-level ones for every
    (pair dtype, pair B, pair D). ``args`` fields left None take the device's grid."""
    grid = grid_for(device)

    def pick(name):
        value = getattr(args, name, None)
        return grid[name] if value is None else value

    setups = []
    pair_dtypes = pick("pair_dtype")
    for dtype in pick("dtype"):
        for B in pick("B"):
            for D in pick("D"):
                for C in pick("C"):
                    setups.append(Setup("class", B, D, C, dtype))
        if pair_dtypes is None:
            setups += [
                Setup("pair", B, D, None, dtype) for B in pick("pair_B") for D in pick("pair_D")
            ]
    for dtype in pair_dtypes or []:
        setups += [Setup("pair", B, D, None, dtype) for B in pick("pair_B") for D in pick("pair_D")]
    return setups
