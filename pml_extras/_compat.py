"""Version shims: the torch APIs that differ across the supported range, in one place.

The package supports torch >= 2.4 (see ``pyproject.toml``). Each shim decides once, at
import, which form the installed torch has (feature detection, not version parsing), so
that the call sites hold no ``try``/``except`` that ``torch.compile`` would have to trace:
a ``TypeError`` caught inside a compiled function is an internal Dynamo error on some
releases, not a Python exception.

This module is a leaf: it imports only torch and the standard library.
"""

from __future__ import annotations

import torch

__all__ = ["get_autocast_dtype", "is_autocast_enabled"]


def _has_device_autocast_api() -> bool:
    """``torch.is_autocast_enabled(device_type)`` and ``torch.get_autocast_dtype`` (2.4+)."""
    if not hasattr(torch, "get_autocast_dtype"):
        return False
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:  # the zero-argument (CUDA-only) form
        return False
    return True


_DEVICE_AUTOCAST_API = _has_device_autocast_api()


def is_autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` ("cpu", "cuda", ...)."""
    if _DEVICE_AUTOCAST_API:
        return torch.is_autocast_enabled(device_type)
    # Older torch: per-device functions for the two device types that had autocast.
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled()
    return device_type == "cuda" and torch.is_autocast_enabled()


def get_autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype ``torch.autocast`` casts to on ``device_type``."""
    if _DEVICE_AUTOCAST_API:
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()
