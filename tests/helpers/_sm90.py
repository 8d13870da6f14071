"""Offline compilation of Triton kernels for an H100 (sm_90), no GPU needed.

Triton -> PTX -> cubin (ptxas) catches what the CPU interpreter accepts but the GPU
compiler rejects: dot shapes, dtypes, layouts, shared memory beyond the 227 KB an SM has.
"""

from __future__ import annotations

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
