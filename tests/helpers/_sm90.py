"""Offline compilation of Triton kernels for an H100 (sm_90), no GPU needed.

Triton -> PTX -> cubin (ptxas) catches what the CPU interpreter accepts but the GPU
compiler rejects: dot shapes, dtypes, layouts, shared memory beyond the 227 KB an SM has.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable

import pytest


def nvidia_backend_or_skip() -> None:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not available")


def compile_for_sm90(
    kernel,
    pointer_types: Dict[str, str],
    constexprs: Dict[str, object],
    float_args: Iterable[str],
    *,
    num_warps: int,
    num_stages: int,
    unit_strides: Iterable[str] = (),
    no_divisibility: Iterable[str] = ("tiles_per_split",),
):
    """Compile ``kernel`` as a launch on large contiguous tensors would specialise it:
    ``unit_strides`` become the constant 1, pointers and other ints get 16-divisibility
    hints (except ``no_divisibility``), ``float_args`` are fp32 scalars. A pointer type
    such as ``"tensordesc<bf16[64, 512]>"`` is a host-made TMA descriptor of those tiles."""
    import triton
    from triton.backends.compiler import GPUTarget

    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    constexprs.update({name: 1 for name in unit_strides if name in kernel.arg_names})
    float_args, no_divisibility = set(float_args), set(no_divisibility)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            if not pointer_types[name].startswith("tensordesc"):  # TMA descriptors: no hint
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in no_divisibility:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"]
    assert compiled.metadata.shared <= 227 * 1024, compiled.metadata.shared
    return compiled


_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)")
_F32_ALU = re.compile(r"(fma|mul|add|sub|max|min|neg|abs|setp\.\w+|selp)\.(rn\.|ftz\.)*f32\b")


def wgmma_overlap(ptx: str) -> Dict[str, int]:
    """How much softmax work the PTX issues while a wgmma group is still in flight.

    A linear walk over the instructions (a static reading, branches not followed): each
    ``wgmma.commit_group`` opens a group, ``wgmma.wait_group N`` leaves at most N open.
    Counts the ``ex2`` (the softmax's exponentials) and float32 ALU instructions met
    while at least one group is open: 0 means every matmul is waited for before the
    elementwise work that follows it (no overlap; the cost model's ``overlap = 0``)."""
    open_groups = 0
    out = {"ex2": 0, "ex2_in_flight": 0, "f32": 0, "f32_in_flight": 0, "max_wait": 0}
    for line in ptx.splitlines():
        op = line.strip()
        if op.startswith("wgmma.commit_group"):
            open_groups += 1
        wait = _WAIT.match(op)
        if wait:
            open_groups = min(open_groups, int(wait.group(1)))
            out["max_wait"] = max(out["max_wait"], int(wait.group(1)))
        if op.startswith("ex2."):
            out["ex2"] += 1
            out["ex2_in_flight"] += open_groups > 0
        elif _F32_ALU.match(op):
            out["f32"] += 1
            out["f32_in_flight"] += open_groups > 0
    return out


def local_memory_sites(compiled) -> Dict[str, int]:
    """Local-memory (spill) instructions in the SASS of ``compiled``: how many, and how
    many sit inside a loop (between a backward branch and its target), where they cost
    on every iteration. Read with the nvdisasm that ships with Triton's ptxas."""
    import os
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True)
    labels, ops = {}, []
    for line in sass.stdout.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        op = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if op:
            ops.append(op.group(1))
    loops = []
    for i, op in enumerate(ops):
        target = re.search(r"\bBRA\b.*?(\.L_x_\d+)", op)
        if target and labels.get(target.group(1), len(ops)) <= i:
            loops.append((labels[target.group(1)], i))
    sites = [i for i, op in enumerate(ops) if re.search(r"\b(STL|LDL)(\.\w+)*\b", op)]
    in_loops = sum(any(a <= i <= b for a, b in loops) for i in sites)
    return {"local": len(sites), "in_loops": in_loops}
