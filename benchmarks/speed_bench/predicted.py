"""The cost model's predictions beside the measured times (``pml_extras.ops.cost_model``).

For every class- and pair-level setup of a run, one line: the fused kernels' predicted
time on an H100 SXM and an H200 (labelled as predictions), the predicted matmul floor,
their ratio, and, where the run measured them, the Triton providers' times and the
measured floor of the same setup with their ratio. On CPU the measured figures are not
comparable to the predictions (no kernels run on a GPU there) and are left out.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from pml_extras.ops import cost_model as cm

from .setups import FLOOR

# Storage dtype of a setup -> (matmul operand dtype, W dtype) the kernels run with.
_OPERANDS: Dict[str, Tuple[str, str]] = {
    "bf16": ("bf16", "bf16"),
    "fp16": ("fp16", "fp16"),
    "fp32": ("fp32", "fp32"),
    "autocast_bf16": ("bf16", "fp32"),
    "autocast_fp16": ("fp16", "fp32"),
}
TRITON_PROVIDERS = {
    "class": (
        "sparse_circle_triton",
        "curricular_triton",
        "arcface_triton",
        "cosface_triton",
        "sparse_circle_hybrid",
    ),
    "pair": ("pair_circle_all",),
}


def prediction(
    level: str,
    batch: int,
    dim: int,
    classes: Optional[int],
    dtype: str,
    mode: str,
    hw,
    hybrid: bool = False,
) -> Optional[Tuple[float, float]]:
    """(predicted kernel seconds, predicted floor seconds) of one setup, or None where the
    model has no answer (float64, or a level it does not model). ``hybrid``: the class
    hybrid as built (``impl="hybrid"``) instead of the fused kernels."""
    if dtype not in _OPERANDS:
        return None
    op, w = _OPERANDS[dtype]
    if hybrid and not (level == "class" and classes and mode == "fwd+bwd"):
        return None  # the model's hybrid: class level, fwd+bwd (launches not split by pass)
    if level == "class" and classes:
        if hybrid:
            kernels = cm.hybrid_class_kernels(batch, classes, dim, op, w, hw=hw, as_built=True)
        else:
            kernels = cm.class_kernels(batch, classes, dim, op, w, cm.CURRENT_CLASS, hw)
        floor = cm.class_floor(batch, classes, dim, op, w, hw)
    elif level == "pair":
        kernels = cm.pair_kernels(batch, dim, op, cm.CURRENT_PAIR, hw)
        floor = cm.pair_floor(batch, dim, op, hw)
    else:
        return None
    if mode == "fwd":  # the forward kernels only; the floor's forward is one matmul of 3
        kernels = [k for k in kernels if "backward" not in k.name]
        floor /= 3
    return cm.total(kernels, hw), floor


def predicted_lines(rows: List[dict], measured_on_gpu: bool) -> List[str]:
    """One line per (setup, mode) with the predictions, and measurements when on a GPU."""
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        key = (r["level"], r["B"], r["D"], r["C"], r["dtype"], r["mode"])
        by_case.setdefault(key, {})[r["provider"]] = r
    out = []
    for (level, batch, dim, classes, dtype, mode), provs in by_case.items():
        pred = {
            name: prediction(level, batch, dim, classes, dtype, mode, hw)
            for name, hw in (("H100", cm.H100_SXM), ("H200", cm.H200))
        }
        if pred["H100"] is None:
            continue
        text = ", ".join(
            f"{name} {t * 1e3:.3f} ms vs floor {f * 1e3:.3f} ms (x{t / f:.2f})"
            for name, (t, f) in pred.items()
        )
        line = (
            f"- {level} B={batch} D={dim} C={classes or '-'} {dtype} {mode}: PREDICTED "
            f"(cost model, design {_design(level)}): {text}"
        )
        hybrid = prediction(level, batch, dim, classes, dtype, mode, cm.H100_SXM, hybrid=True)
        # fwd+bwd only: the model's hybrid launches are not split by pass.
        if mode == "fwd+bwd" and hybrid is not None and "sparse_circle_hybrid" in provs:
            t, f = hybrid
            line += f"; hybrid as built: H100 {t * 1e3:.3f} ms (x{t / f:.2f})"
        floor = provs.get(FLOOR)
        if measured_on_gpu and floor is not None and floor.get("time_ms"):
            measured = [
                f"{p} {provs[p]['time_ms']:.2f} ms (x{provs[p]['time_ms'] / floor['time_ms']:.2f})"
                for p in TRITON_PROVIDERS.get(level, ())
                if p in provs and provs[p].get("time_ms")
            ]
            if measured:
                line += f"; MEASURED: floor {floor['time_ms']:.2f} ms, " + ", ".join(measured)
        out.append(line)
    return out


def _design(level: str) -> str:
    return cm.CURRENT_CLASS.name if level == "class" else cm.CURRENT_PAIR.name
