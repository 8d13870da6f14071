"""The issue's speed and memory targets, judged on the rows of one run (``--check``).

Each ratio is against a baseline measured in the same run (:mod:`.sweep`), never against a
figure from elsewhere:

* ``class-time``: class-level fwd+bwd time <= 1.5x the matmul floor (x @ W, dC @ W^T,
  x^T @ dC in the operand dtype: bf16 for the bf16 and autocast setups);
* ``class-mem``: class-level extra peak memory <= 1.5x (bytes of dW + dx);
* ``pair-time``: pair-level ``CircleLoss`` fwd+bwd <= 3x its floor (x @ x^T, dS @ x,
  dS^T @ x);
* ``class-operands``: the class-level kernels' matmul operand dtype (their ``OP_DTYPE``) is
  the one the user chose: bf16 for bf16 embeddings and under autocast(bf16), never a
  silent fp32 (needs ``--count-specialisations``, which records the kernels' arguments);
* ``kernel-specialisations``: the Triton specialisations the run launched (compile time)
  stay few.

A target applies to every row of its level, providers and mode in the run; a row that was
skipped or failed is a FAIL (nothing verified), and a target with no row at all is a FAIL
too. ``--limit NAME=VALUE`` overrides a limit (``tests/gpu/test_gpu_checks_script.py`` sets an
impossible one to see a FAIL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Tuple

from .checks import Outcome, judge

CLASS_TRITON = ("sparse_circle_triton", "curricular_triton", "arcface_triton", "cosface_triton")
PAIR_OURS = ("pair_circle_triton", "pair_circle")


@dataclass(frozen=True)
class Target:
    name: str
    level: str
    field: str  # row field holding the ratio
    limit: float
    providers: Tuple[str, ...]
    what: str
    mode: str = "fwd+bwd"


TARGETS: Tuple[Target, ...] = (
    Target("class-time", "class", "time_ratio", 1.5, CLASS_TRITON, "time / matmul floor"),
    Target("class-mem", "class", "mem_ratio", 1.5, CLASS_TRITON, "extra memory / (dW + dx)"),
    Target("pair-time", "pair", "time_ratio", 3.0, PAIR_OURS, "time / matmul floor"),
)
SPECIALISATIONS_LIMIT = 24.0


def parse_limits(text: Optional[str]) -> Dict[str, float]:
    """``"class-time=1.5,pair-time=3"`` -> dict, validated against the known targets."""
    known = {t.name for t in TARGETS} | {"kernel-specialisations"}
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(
                f"bad --limit item {item!r}: expected NAME=VALUE, NAME in {sorted(known)}"
            )
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"bad --limit value {value!r} for {name}: not a number") from None
    return out


def _subject(row: dict) -> str:
    c = "" if row["C"] is None else f" C={row['C']}"
    return (
        f"{row['provider']} {row['level']} B={row['B']} D={row['D']}{c} {row['dtype']} "
        f"{row['mode']}"
    )


def _detail(row: dict, target: Target) -> str:
    if target.field == "time_ratio":
        return f"{row['time_ms']:.3f} ms vs floor {row['floor_time_ms']:.3f} ms; {target.what}"
    return (
        f"{_bytes(row['extra_mem_bytes'])} vs floor {_bytes(row['floor_mem_bytes'])}; {target.what}"
    )


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def evaluate(
    rows: List[dict],
    limits: Optional[Dict[str, float]] = None,
    targets: Iterable[Target] = TARGETS,
) -> List[Outcome]:
    """One outcome per (target, matching row), in row order."""
    limits = limits or {}
    out: List[Outcome] = []
    for target in targets:
        target = replace(target, limit=limits.get(target.name, target.limit))
        matching = [
            r
            for r in rows
            if r["level"] == target.level
            and r["provider"] in target.providers
            and r["mode"] == target.mode
        ]
        if not matching:
            out.append(
                Outcome("FAIL", target.name, f"{target.level} {target.mode}", None, target.limit,
                        detail=f"not measured: no row of {', '.join(target.providers)}")
            )  # fmt: skip
            continue
        for row in matching:
            value = row.get(target.field)
            if row["status"] != "ok" or value is None:
                why = row["reason"] if row["status"] != "ok" else f"no {target.field}"
                if target.field == "mem_ratio" and row["status"] == "ok":
                    why = f"memory {row.get('mem_source') or 'not measured'}"
                detail = why if row["status"] == "ok" else f"{row['status']}: {why}"
                out.append(
                    Outcome("FAIL", target.name, _subject(row), None, target.limit, detail=detail)
                )
                continue
            out.append(
                judge(target.name, _subject(row), value, target.limit, "x", _detail(row, target))
            )
    return out


_OPERAND_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
_OP_DTYPE_RE = re.compile(r"OP_DTYPE=(?:triton\.language\.)?(\w+)")


def expected_operand(dtype: str) -> str:
    """Triton's name of the matmul operand dtype a setup's dtype asks for."""
    return _OPERAND_NAMES[dtype.replace("autocast_", "")]


def operand_outcomes(rows: List[dict], providers: Iterable[str] = CLASS_TRITON) -> List[Outcome]:
    """One outcome per class-level Triton row with recorded kernels: the number of its
    class kernel specialisations whose OP_DTYPE is not the setup's operand dtype."""
    providers = tuple(providers)
    out = []
    for row in rows:
        if row["level"] != "class" or row["provider"] not in providers or row["status"] != "ok":
            continue
        if row["mode"] != "fwd+bwd":
            continue
        want = expected_operand(row["dtype"])
        seen = [m.group(1) for k in row.get("kernels") or [] if (m := _OP_DTYPE_RE.search(k))]
        if not seen:
            out.append(
                Outcome("FAIL", "class-operands", _subject(row), None, 0, "kernels",
                        "no class kernel with an OP_DTYPE was recorded")
            )  # fmt: skip
            continue
        wrong = sum(d != want for d in seen)
        detail = f"want {want}; OP_DTYPE of the {len(seen)} kernels: {', '.join(sorted(set(seen)))}"
        out.append(judge("class-operands", _subject(row), wrong, 0, "kernels", detail))
    return out


def specialisations_outcome(count: int, limit: float, summary: str, compiled=None) -> Outcome:
    detail = summary if compiled is None else f"{summary}; in Triton's caches: {compiled}"
    return judge("kernel-specialisations", "speed targets", count, limit, "kernels", detail)
