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
    # v2-bwd64 (a step of this branch): v2's forward, 64-row backward steps
    ("class_fwd", "v2-bwd64", "bf16", "bf16"): (255, 40, 131072),
    ("class_fwd", "v2-bwd64", "bf16", "fp32"): (255, 472, 131072),
    ("class_bwd", "v2-bwd64", "bf16", "bf16"): (255, 0, 169472),
    ("class_bwd", "v2-bwd64", "bf16", "fp32"): (255, 0, 169472),
    # v2-full (the default since this branch): both sides resident, the softmax in a
    # branch of its own (test_sm90_spills.py: class_fwd / class_bwd). The same forward
    # with the softmax inline measured (255, 232, 131200) / (255, 784, 163968) with fp32 W,
    # and an earlier version of the idea (255, 816, 131328).
    ("class_fwd", "v2-full", "bf16", "bf16"): (243, 0, 139392),
    ("class_fwd", "v2-full", "bf16", "fp32"): (255, 88, 172160),
    ("class_bwd", "v2-full", "bf16", "bf16"): (255, 0, 169472),
    ("class_bwd", "v2-full", "bf16", "fp32"): (255, 0, 169472),
    # v2-cm (the default since this branch): v2-full's forward; the bf16 backward at
    # 64 x 64, class-major, its Jacobian on the tensor cores (test_sm90_spills.py:
    # class_bwd, 40 wgmma, 0 mma.sync).
    ("class_fwd", "v2-cm", "bf16", "bf16"): (243, 0, 139392),
    ("class_fwd", "v2-cm", "bf16", "fp32"): (255, 88, 172160),
    ("class_bwd", "v2-cm", "bf16", "bf16"): (255, 0, 206336),
    ("class_bwd", "v2-cm", "bf16", "fp32"): (255, 0, 206336),
    # The no-grad forward (resident, NEED_U=False; not in the training model)
    ("class_fwd_nograd", "v2-full", "bf16", "bf16"): (117, 0, 131584),
    ("class_fwd_nograd", "v2-full", "bf16", "fp32"): (165, 0, 163840),
    # Larger tiles, as v3 would need them (bf16 W; PML_EXTRAS_COMPILE_ALL=1 pytest -s
    # tests/gpu/test_sm90_spills.py -k larger). Design names are the tiles (rows x
    # classes). The forward as built:
    ("class_fwd", "64x64", "bf16", "bf16"): (255, 120, 213248),
    ("class_fwd", "64x128 (1 stage)", "bf16", "bf16"): (255, 1072, 229376),
    # The backward before v2-cm (a D x BLOCK_C accumulator, the Jacobian in registers):
    ("class_bwd", "64x64", "bf16", "bf16"): (255, 1992, 206336),
    ("class_bwd", "64x64", "bf16", "fp32"): (255, 2968, 206336),
    ("class_bwd", "128x64 (1 stage)", "bf16", "bf16"): (255, 2312, 212992),
    ("class_bwd", "32x64", "bf16", "bf16"): (255, 1292, 103168),
    # The v2-cm backward (class-major) at other tiles:
    ("class_bwd", "v2-cm 64x64 (1 stage)", "bf16", "bf16"): (255, 228, 139264),
    ("class_bwd", "v2-cm 64x64 (1 stage)", "bf16", "fp32"): (255, 256, 139264),
    ("class_bwd", "v2-cm 128x64 (1 stage)", "bf16", "bf16"): (255, 1208, 212992),
    ("class_bwd", "v2-cm 128x64 (1 stage)", "bf16", "fp32"): (255, 1248, 212992),
    ("class_bwd", "v2-cm 64x128 (1 stage)", "bf16", "bf16"): (255, 9968, 212992),
    ("class_bwd", "v2-cm 64x128 (1 stage)", "bf16", "fp32"): (255, 6852, 212992),
    ("class_bwd", "v2-cm 32x64", "bf16", "bf16"): (255, 160, 103168),
    ("class_bwd", "v2-cm 32x64", "bf16", "fp32"): (255, 2424, 131072),
    # The steps from the 64 x 64 backward above to v2-cm (64 x 64, 2 stages; experiments,
    # only the last kept; docs/kernels/cost_model.md tells each one):
    # 1. the Jacobian on the tensor cores, acc -= W diag(r / ||w||), d split into three
    #    bf16 terms (three chained dots), the D x BLOCK_C accumulator kept:
    ("class_bwd", "64x64 tc-jacobian", "bf16", "bf16"): (255, 156, 206336),
    ("class_bwd", "64x64 tc-jacobian", "bf16", "fp32"): (255, 2128, 206336),
    # 2. 1 / ||w|| folded into G (no column scale at the end):
    ("class_bwd", "64x64 tc-jacobian, inv in G", "bf16", "bf16"): (255, 48, 206336),
    ("class_bwd", "64x64 tc-jacobian, inv in G", "bf16", "fp32"): (255, 1840, 206336),
    # 3. the store's indices from an opaque zero after the loop; fp32 W still spills: its
    #    W tile enters the Jacobian's dot as a register A operand held across the loop
    #    (Triton keeps A in registers when it is not a plain load):
    ("class_bwd", "64x64 tc-jacobian, zero", "bf16", "bf16"): (255, 0, 206336),
    ("class_bwd", "64x64 tc-jacobian, zero", "bf16", "fp32"): (255, 1144, 206336),
    # 4. class-major (G^T x), W^T the B operand of the Jacobian; three chained dots get
    #    the accumulator in two warp layouts:
    ("class_bwd", "64x64 class-major, 3 dots", "bf16", "bf16"): (255, 31272, 214528),
    ("class_bwd", "64x64 class-major, 3 dots", "bf16", "fp32"): (255, 31076, 214528),
    # 5. one dot, diag(-1) @ W^T, between two row scalings (v2-cm, G rounded after the
    #    move to G^T's layout; its rounding before the move: v2-cm above):
    ("class_bwd", "64x64 class-major", "bf16", "bf16"): (255, 0, 214528),
    ("class_bwd", "64x64 class-major", "bf16", "fp32"): (255, 0, 214528),
    # The 64 x 32 backward with its softmax inline (before the branch): 464 B.
    ("class_bwd", "64x32 (softmax inline)", "bf16", "bf16"): (255, 464, 169472),
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
