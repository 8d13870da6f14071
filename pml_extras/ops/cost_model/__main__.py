"""``python -m pml_extras.ops.cost_model``: the predictions table and each design's kernels."""

from .report import main

main()
