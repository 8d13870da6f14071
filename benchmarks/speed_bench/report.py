"""Reports: the console table, and JSON, CSV and Markdown files with device, versions and
the command that produced them (plots are apart: ``benchmarks/plot_speed.py``)."""

from __future__ import annotations

import csv
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from pml_extras import _env

from .setups import FLOOR, MB


def case_key(r: dict) -> Tuple:
    """The (setup, mode) a row belongs to: rows with equal keys share one floor."""
    return (r["level"], r["B"], r["D"], r["C"], r["dtype"], r["mode"])


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def short_line(row: dict) -> str:
    return (
        f"{row['provider']:<22} {row['mode']:<8} "
        f"{_fmt(row['time_ms'], '.2f')} ms  extra {_fmt(row['extra_mem_bytes'], '.1f', MB)} MiB"
        + (f"  [{row['status']}: {row['reason']}]" if row["status"] != "ok" else "")
    )


def _columns(rows: List[dict]) -> List[Tuple[str, Callable[[dict], str]]]:
    cols = [
        ("level", lambda r: r["level"]),
        ("B", lambda r: str(r["B"])),
        ("D", lambda r: str(r["D"])),
        ("C", lambda r: "-" if r["C"] is None else str(r["C"])),
        ("dtype", lambda r: r["dtype"]),
        ("mode", lambda r: r["mode"]),
        ("provider", lambda r: r["provider"]),
        ("time ms", lambda r: _fmt(r["time_ms"], ".1f")),
        ("x floor", lambda r: _fmt(r["time_ratio"], ".2f")),
    ]
    if any(r.get("cpu_time_ms") is not None for r in rows):
        cols += [
            ("cpu ms", lambda r: _fmt(r["cpu_time_ms"], ".1f")),
            ("x floor", lambda r: _fmt(r["cpu_time_ratio"], ".2f")),
        ]
    cols += [
        ("extra MiB", lambda r: _fmt(r["extra_mem_bytes"], ".1f", MB)),
        ("x floor", lambda r: _fmt(r["mem_ratio"], ".2f")),
        ("extra-floor MiB", lambda r: _fmt(r["over_floor_mem_bytes"], ".1f", MB)),
        ("note", _note),
    ]
    return cols


def _note(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    if row["provider"] == FLOOR:
        return "floor (memory: analytical dW + dx)"
    if row["extra_mem_bytes"] is None and row["mem_source"]:
        return f"memory {row['mem_source']}"
    return ""


def format_table(rows: List[dict], markdown: bool = False) -> str:
    columns = _columns(rows)
    header = [h for h, _ in columns]
    body = [[cell(r) for _, cell in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(c[i]) for c in body]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in body])


def comparison_lines(rows: List[dict]) -> List[str]:
    """Blockwise vs straightforward, per class-level setup and mode."""
    pairs = [
        ("sparse_circle_torch", "naive_circle"),
        ("curricular_torch", "naive_curricular"),
        ("sparse_circle_triton", "naive_circle"),
        ("curricular_triton", "naive_curricular"),
        ("pair_circle", "pml_circle"),
        ("pair_circle_ms", "pml_circle_ms"),
        ("pair_circle_all", "pml_circle_all"),
    ]
    index = {case_key(r) + (r["provider"],): r for r in rows if r["status"] == "ok"}
    out = []
    for key in dict.fromkeys(k[:6] for k in index):
        for ours, ref in pairs:
            a, b = index.get(key + (ours,)), index.get(key + (ref,))
            if not a or not b or a["time_ms"] is None or b["time_ms"] is None:
                continue
            level, B, D, C, dtype, mode = key
            mem = ""
            if a["extra_mem_bytes"] is not None and b["extra_mem_bytes"] is not None:
                mem = (
                    f"; extra memory {a['extra_mem_bytes'] / MB:.1f} vs "
                    f"{b['extra_mem_bytes'] / MB:.1f} MiB"
                )
            cpu = ""
            if a.get("cpu_time_ms") and b.get("cpu_time_ms"):
                cpu = (
                    f"; cpu {a['cpu_time_ms']:.1f} vs {b['cpu_time_ms']:.1f} ms "
                    f"(x{a['cpu_time_ms'] / b['cpu_time_ms']:.2f})"
                )
            out.append(
                f"- {level} B={B} D={D} C={C} {dtype} {mode}: {ours} vs {ref}: "
                f"{a['time_ms']:.1f} vs {b['time_ms']:.1f} ms "
                f"(x{a['time_ms'] / b['time_ms']:.2f}){cpu}{mem}"
            )
    return out


def versions() -> dict:
    """Versions for results files (from :mod:`pml_extras._env`, the one home)."""
    v = _env.versions()
    keys = ("torch", "pytorch_metric_learning", "pml_extras", "triton", "python")
    return {k: v[k] for k in keys}


def loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def device_name(device: torch.device) -> str:
    return _env.device_name(device)


CSV_FIELDS = [
    "level",
    "B",
    "D",
    "C",
    "dtype",
    "mode",
    "provider",
    "status",
    "reason",
    "time_ms",
    "floor_time_ms",
    "time_ratio",
    "time_min_ms",
    "time_iqr_ms",
    "time_runs",
    "time_blocks",
    "cpu_time_ms",
    "floor_cpu_time_ms",
    "cpu_time_ratio",
    "extra_mem_bytes",
    "floor_mem_bytes",
    "mem_ratio",
    "over_floor_mem_bytes",
    "mem_source",
    "chunk_size",
    "time_samples_ms",
    "cpu_time_samples_ms",
    "warmup_s",
    "kernels",
]


def write_results(result: dict, out_dir: str, name: str, note: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "csv", "md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            samples = {
                k: " ".join(f"{t:.3f}" for t in row[k])
                for k in ("time_samples_ms", "cpu_time_samples_ms")
            }
            kernels = {"kernels": "; ".join(row.get("kernels") or [])}
            writer.writerow({**row, **samples, **kernels})
    meta = result["meta"]
    lines = [
        f"# Speed and memory: {meta['device_name']} ({meta['device']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"torch {meta['versions']['torch']}, pytorch-metric-learning "
        f"{meta['versions']['pytorch_metric_learning']}, pml_extras "
        f"{meta['versions']['pml_extras']}, triton {meta['versions']['triton']}, "
        f"{meta['threads']} threads; {meta['timing']}; memory: {meta['memory']}. "
        f"Load average (1/5/15 min) before {meta['loadavg_1_5_15_before']}, after "
        f"{meta['loadavg_1_5_15_after']} on {meta['cpu_count']} CPUs; {meta['elapsed_s']} s.",
        "",
        "time ms: median wall-clock per call over the pooled measurements "
        "(torch.utils.benchmark or triton.testing.do_bench; the JSON and CSV add the IQR "
        "and the number of timed calls); cpu ms (CPU runs): median process CPU time of "
        "the same calls, less sensitive to other processes on a shared machine; "
        "`x floor`: divided by the same figure for the bare matmuls of the same shapes "
        "and mode, operands in the matmul dtype (`autocast_*`: the autocast dtype); "
        "extra MiB: peak memory above what is held before the call; its "
        "`x floor`: extra / (bytes of dW + dx); extra-floor: extra minus that floor, i.e. "
        "the memory beyond the gradients the call must produce. `fwd` is the training "
        "forward (autograd recording), `fwd+bwd` includes the backward.",
        "",
        format_table(result["rows"], markdown=True),
        "",
    ]
    comparison = comparison_lines(result["rows"])
    if comparison:
        lines += ["## Blockwise vs straightforward", "", *comparison, ""]
    lines += target_section(result)
    if note:
        lines += ["## Notes", "", note, ""]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines))
    return paths


def target_section(result: dict) -> List[str]:
    """Markdown for the targets (``--check``) and kernel specialisations, when recorded."""
    lines = []
    if result.get("targets"):
        lines += ["## Targets", "", "```", *[t["line"] for t in result["targets"]], "```", ""]
    spec = result.get("specialisations")
    if spec:
        lines += [
            "## Triton kernel specialisations",
            "",
            f"{spec['count']} launched (compiled in this process: {spec['compiled']}):",
            "",
            *[f"- `{k}`" for k in spec["keys"]],
            "",
        ]
    return lines
