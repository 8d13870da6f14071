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
    # v2-bwd64 (the default since this branch): v2's forward, 64-row backward steps
    ("class_fwd", "v2-bwd64", "bf16", "bf16"): (255, 40, 131072),
    ("class_fwd", "v2-bwd64", "bf16", "fp32"): (255, 472, 131072),
    ("class_bwd", "v2-bwd64", "bf16", "bf16"): (255, 0, 169472),
    ("class_bwd", "v2-bwd64", "bf16", "fp32"): (255, 0, 169472),
    # v2-full: the forward with its x block resident as well spills; built as
    # BlockConfig(fwd_resident=True) (test_sm90_spills.py: class_fwd_resident). Before it
    # was built, an earlier version of the same idea measured (255, 816, 131328).
    ("class_fwd", "v2-full", "bf16", "bf16"): (255, 232, 131200),
    ("class_fwd", "v2-full", "bf16", "fp32"): (255, 784, 163968),
    ("class_bwd", "v2-full", "bf16", "bf16"): (255, 0, 169472),
    ("class_bwd", "v2-full", "bf16", "fp32"): (255, 0, 169472),
    # The no-grad forward (resident, NEED_U=False; not in the training model)
    ("class_fwd_nograd", "v2", "bf16", "bf16"): (103, 0, 131584),
    ("class_fwd_nograd", "v2", "bf16", "fp32"): (175, 0, 163840),
    # Larger tiles, as v3 would need them (none built: all spill; bf16 W; PML_EXTRAS_
    # COMPILE_ALL=1 pytest -s tests/gpu/test_sm90_spills.py -k larger). Design names are
    # the tiles (rows x classes), forward resident, backward resident.
    ("class_fwd", "64x64", "bf16", "bf16"): (255, 636, 196864),
    ("class_fwd", "64x128 (1 stage)", "bf16", "bf16"): (255, 3876, 196608),
    ("class_bwd", "64x64", "bf16", "bf16"): (255, 2664, 206336),
    ("class_bwd", "128x64 (1 stage)", "bf16", "bf16"): (255, 2228, 212992),
    ("class_bwd", "64x32 (softmax not in its own branch)", "bf16", "bf16"): (255, 464, 169472),
    ("class_bwd", "32x64", "bf16", "bf16"): (255, 1244, 103168),
    # pair kernels as they are (bf16, self-comparison with labels)
    ("pair_fwd", "v1", "bf16", "bf16"): (137, 0, 49152),
    ("pair_bwd_row", "v1", "bf16", "bf16"): (233, 0, 131072),
    ("pair_bwd_column", "v1", "bf16", "bf16"): (201, 0, 69632),
}


def ptxas(kernel: str, design: str, op: str, w: str) -> Tuple[int, int, int]:
    """(registers, spill bytes, shared memory) of a kernel variant; unknown variants
    are assumed to use 255 registers and the shared memory their tiles need."""
    return PTXAS_SM90.get((kernel, design, op, w), (255, 0, 0))
