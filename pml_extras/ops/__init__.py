"""Blockwise ops and fused kernels; see the module list in docs/kernels/gpu_checks.md.

Layering (imports point down only): ``precision``, ``_launch`` and ``_triton_common`` are
leaves; ``class_common`` (helpers of both class paths); the Triton modules
(``class_lse_triton``, ``pair_circle_triton``: leaves and ``_triton_common`` only); the
autograd Functions (``class_lse_autograd``, ``pair_circle_autograd``, ``pair_gather``);
the self-check (``kernel_check``, which runs the Functions); ``dispatch``
(``resolve_impl``, the check's cache); the public ops (``class_lse``, ``pair_circle``).
"""

from __future__ import annotations

import importlib
import types
import warnings

# Old module names -> (new module, extra modules whose names the old one also held).
_MOVED = {"selfcheck": ("kernel_check", ("dispatch", "precision"))}


class _MovedModule(types.ModuleType):
    """Read-only view of a renamed module (its names, then those it used to define)."""

    def __init__(self, old: str, new: str, extras):
        super().__init__(f"{__name__}.{old}")
        self._homes = [importlib.import_module(f"{__name__}.{m}") for m in (new, *extras)]

    def __getattr__(self, name):
        for home in self._homes:
            if hasattr(home, name):
                return getattr(home, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


def __getattr__(name):
    if name in _MOVED:
        new, extras = _MOVED[name]
        warnings.warn(
            f"pml_extras.ops.{name} was renamed pml_extras.ops.{new}; the old name is deprecated",
            DeprecationWarning,
            stacklevel=2,
        )
        return _MovedModule(name, new, extras)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
