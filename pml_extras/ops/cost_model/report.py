"""The predictions table for the issue's target cases (``python -m pml_extras.ops.cost_model``)."""

from __future__ import annotations

import dataclasses
import functools

from .bounds import class_bound, describe_bound
from .class_kernels import (
    V1,
    V2,
    V2_BWD64,
    V2_CM,
    V2_FULL,
    V3,
    ClassDesign,
    class_floor,
    class_kernels,
    hybrid_class_kernels,
)
from .pair_kernels import PAIR_V1, PAIR_V2, PAIR_V2_BUILT, pair_floor, pair_kernels
from .roofline import H100_SXM, H200, describe, total

# The targets: (label, batch, classes, dim, operand dtype, W dtype).
CLASS_CASES = (
    ("B=1024 D=512 C=100k bf16", 1024, 100_000, 512, "bf16", "bf16"),
    ("B=1024 D=512 C=1M bf16", 1024, 1_000_000, 512, "bf16", "bf16"),
    ("B=1024 D=512 C=100k autocast (fp32 W)", 1024, 100_000, 512, "bf16", "fp32"),
    ("B=1024 D=512 C=1M autocast (fp32 W)", 1024, 1_000_000, 512, "bf16", "fp32"),
)
PAIR_CASES = (("B=16384 D=512 bf16", 16384, 512, "bf16"),)
CLASS_DESIGNS = (V1, V2, V2_BWD64, V2_FULL, V2_CM, V3)
PAIR_DESIGNS = (PAIR_V1, PAIR_V2_BUILT, PAIR_V2)


def table() -> str:
    """Markdown table of the predictions (fwd+bwd) for the target cases: H100 / H200 time,
    floor and ratio, and the H100 ratio if shared memory did not limit (the least certain
    term). ``python -m pml_extras.ops.cost_model`` prints it; docs/kernels/cost_model.md
    holds a copy (tests/ops/test_cost_model.py checks that they agree)."""
    no_smem = dataclasses.replace(H100_SXM, smem_bytes_per_clk=1 << 30)
    rows = [
        "| kernels | design | case | H100 ms | H200 ms | floor H100 / H200 ms "
        "| ratio H100 | ratio H200 | H100 ratio, smem not limiting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(kind, design, label, kernels_on, floor_on):
        t = [total(kernels_on(hw=hw), hw) for hw in (H100_SXM, H200)]
        f = [floor_on(hw=hw) for hw in (H100_SXM, H200)]
        free = total(kernels_on(hw=no_smem), no_smem) / f[0]
        rows.append(
            f"| {kind} | {design.name} | {label} | {t[0] * 1e3:.2f} | {t[1] * 1e3:.2f} "
            f"| {f[0] * 1e3:.2f} / {f[1] * 1e3:.2f} | {t[0] / f[0]:.2f} | {t[1] / f[1]:.2f} "
            f"| {free:.2f} |"
        )

    for design in CLASS_DESIGNS:
        for label, b, c, d, op, w in CLASS_CASES:
            row(
                "class fwd+bwd",
                design,
                label,
                functools.partial(class_kernels, b, c, d, op, w, design),
                functools.partial(class_floor, b, c, d, op, w),
            )
    for name, built in (("hybrid (lean, not built)", False), ("hybrid (as built)", True)):
        for label, b, c, d, op, w in CLASS_CASES:
            row(
                "class fwd+bwd",
                ClassDesign(name=name),
                label,
                functools.partial(hybrid_class_kernels, b, c, d, op, w, as_built=built),
                functools.partial(class_floor, b, c, d, op, w),
            )
    for design in PAIR_DESIGNS:
        for label, b, d, op in PAIR_CASES:
            row(
                "pair fwd+bwd",
                design,
                label,
                functools.partial(pair_kernels, b, d, op, design),
                functools.partial(pair_floor, b, d, op),
            )
    return "\n".join(rows)


def main() -> None:
    """Print the table, then each design's kernels at C = 1M / B = 16384."""
    print(table())
    for design in CLASS_DESIGNS:
        print(f"\nclass, design {design.name}, B=1024 D=512 C=1M bf16 on the H100 SXM:")
        print(describe(class_kernels(1024, 1_000_000, 512, "bf16", "bf16", design), H100_SXM))
    for design in PAIR_DESIGNS:
        print(f"\npair, design {design.name}, B=16384 D=512 bf16 on the H100 SXM:")
        print(describe(pair_kernels(16384, 512, "bf16", design), H100_SXM))
    print("\nany fused class design (four B*C*D matmuls, no stored logits), B=1024 D=512")
    print("C=1M bf16 on the H100 SXM (bounds.py; the same ratios at C=100k and on the H200):")
    print(describe_bound(class_bound(1024, 1_000_000, 512, "bf16", "bf16", H100_SXM)))
