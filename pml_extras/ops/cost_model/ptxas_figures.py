"""Registers, spills and shared memory per kernel variant, as ptxas reports them for sm_90a."""

from __future__ import annotations

from typing import Dict, Tuple

# program, from ptxas 13.4 -v for sm_90a (triton 3.9, compiled on CPU, no GPU:
# ``python -m pytest -s tests/gpu/test_sm90_spills.py`` prints them for today's kernels).
# Keys: (kernel, design, operand dtype, W dtype). Spills are reported, not costed.
PTXAS_SM90: Dict[Tuple[str, str, str, str], Tuple[int, int, int]] = {
    # v1: the kernels at d00838b (64 x 32 tiles, 8 warps, 2 stages, D = 512, circle)
    ("class_fwd", "v1", "bf16", "bf16"): (255, 0, 131072),
    ("class_bwd", "v1", "bf16", "bf16"): (255, 68, 69632),
    # v2 (this branch; tests/gpu/test_sm90_spills.py, curricular transform): the forward is
    # v1's; the backward 32 x 32 with its W tile resident
    ("class_fwd", "v2", "bf16", "bf16"): (255, 40, 131072),
    ("class_fwd", "v2", "bf16", "fp32"): (255, 472, 131072),
    ("class_bwd", "v2", "bf16", "bf16"): (183, 0, 68352),
    ("class_bwd", "v2", "bf16", "fp32"): (254, 0, 68352),
    # v2-full: the forward with its x block resident as well spills
    ("class_fwd", "v2-full", "bf16", "bf16"): (255, 816, 131328),
    ("class_bwd", "v2-full", "bf16", "bf16"): (183, 0, 68352),
    # pair kernels as they are (bf16, self-comparison with labels)
    ("pair_fwd", "v1", "bf16", "bf16"): (137, 0, 49152),
    ("pair_bwd_row", "v1", "bf16", "bf16"): (233, 0, 131072),
    ("pair_bwd_column", "v1", "bf16", "bf16"): (201, 0, 69632),
    # pair v2 (built; bf16, self-comparison with labels, D = 512): forward 128 x 32 with
    # the row block resident; backward 64 x 64, held block resident, tiles by TMA
    ("pair_fwd", "v2", "bf16", "bf16"): (94, 0, 196608),
    ("pair_bwd_row", "v2", "bf16", "bf16"): (247, 0, 197136),
    ("pair_bwd_column", "v2", "bf16", "bf16"): (255, 0, 206608),
}


def ptxas(kernel: str, design: str, op: str, w: str) -> Tuple[int, int, int]:
    """(registers, spill bytes, shared memory) of a kernel variant; unknown variants
    are assumed to use 255 registers and the shared memory their tiles need."""
    return PTXAS_SM90.get((kernel, design, op, w), (255, 0, 0))
