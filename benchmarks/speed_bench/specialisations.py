"""Counting the Triton kernel specialisations a run launches, to keep compile time in check.

Each distinct (kernel, constexpr values, tensor-argument dtypes, launch options) is one
compiled kernel on a GPU: a few seconds of compilation each the first time. The counter
hooks every ``@triton.jit`` kernel of ``pml_extras.ops`` through Triton's own pre-run hooks,
which both the compiled kernels and the CPU interpreter (``TRITON_INTERPRET=1``) call with
the launch arguments, so the same count comes out on either. The hooks cost a few
microseconds per launch: hold the counter around warm-up and compilation, not around
timed calls.

On a GPU, :func:`compiled_variants` also reads Triton's own in-memory kernel caches, which
additionally split on integer divisibility (a cross-check: it is at least the count here).

Usage::

    with SpecialisationCounter() as counter:
        loss(x, labels).backward()
    print(counter.count, counter.summary())
"""

from __future__ import annotations

import importlib
import inspect
from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple

KERNEL_MODULES = (
    "pml_extras.ops.class_lse_triton",
    "pml_extras.ops.class_lse_hybrid_kernels",
    "pml_extras.ops.pair_circle_triton",
)
# Launch options that select a separate compilation.
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return ann is not inspect.Parameter.empty and "constexpr" in str(getattr(ann, "__name__", ann))


def kernels(modules: Iterable[str] = KERNEL_MODULES) -> Dict[str, object]:
    """``{"module.name": kernel}`` for every launchable Triton kernel in ``modules`` that
    imports (a module that does not, e.g. without triton, contributes none)."""
    found = {}
    for mod_name in modules:
        try:
            module = importlib.import_module(mod_name)
        except Exception:  # noqa: BLE001 - no triton: nothing to count
            continue
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if callable(getattr(obj, "add_pre_run_hook", None)) and inspect.isfunction(fn):
                found[f"{mod_name.rsplit('.', 1)[-1]}.{name}"] = obj
    return found


def _dtype_name(value) -> Optional[str]:
    dtype = getattr(value, "dtype", None)
    if dtype is None or not hasattr(value, "data_ptr"):
        return None
    return str(dtype).replace("torch.", "")


class SpecialisationCounter:
    """Records the distinct specialisations launched while active (a context manager)."""

    def __init__(self, modules: Iterable[str] = KERNEL_MODULES):
        self.modules = tuple(modules)
        self.launches: Counter = Counter()
        self._hooks: List[Tuple[object, object]] = []

    # -- recording
    def _hook_for(self, name: str, kernel) -> object:
        params = inspect.signature(kernel.fn).parameters
        names = list(params)
        constexprs = {n for n, p in params.items() if _is_constexpr(p)}

        def hook(*args, **kwargs):
            bound = dict(zip(names, args))
            bound.update((k, v) for k, v in kwargs.items() if k in params)
            consts = tuple((n, repr(bound[n])) for n in names if n in constexprs and n in bound)
            dtypes = tuple(
                (n, d) for n in names if n in bound and (d := _dtype_name(bound[n])) is not None
            )
            options = tuple((k, kwargs[k]) for k in _OPTIONS if k in kwargs)
            self.launches[(name, consts, dtypes, options)] += 1

        return hook

    def __enter__(self) -> SpecialisationCounter:
        for name, kernel in kernels(self.modules).items():
            hook = self._hook_for(name, kernel)
            kernel.add_pre_run_hook(hook)
            self._hooks.append((kernel, hook))
        return self

    def __exit__(self, *exc) -> None:
        for kernel, hook in self._hooks:
            try:
                kernel.pre_run_hooks.remove(hook)
            except ValueError:
                pass
        self._hooks.clear()

    # -- results
    @property
    def hooked(self) -> int:
        """Kernels hooked (0 when triton or the kernel modules do not import)."""
        return len(self._hooks)

    @property
    def count(self) -> int:
        return len(self.launches)

    def per_kernel(self) -> Dict[str, int]:
        out: Counter = Counter(key[0] for key in self.launches)
        return dict(sorted(out.items()))

    def launched_since(self, before: Dict[tuple, int]) -> List[tuple]:
        """Specialisations launched since ``before = dict(counter.launches)``."""
        return [k for k, n in self.launches.items() if n > before.get(k, 0)]

    def keys(self, which: Optional[Iterable[tuple]] = None) -> List[str]:
        """One readable line per specialisation (of ``which``, default all), for reports."""
        lines = []
        for name, consts, dtypes, options in sorted(self.launches if which is None else which):
            c = ",".join(f"{k}={v}" for k, v in consts)
            d = ",".join(f"{k}:{v}" for k, v in dtypes)
            o = ",".join(f"{k}={v}" for k, v in options)
            lines.append(f"{name}[{c}]({d}){'{' + o + '}' if o else ''}")
        return lines

    def summary(self) -> str:
        per = ", ".join(f"{k} {v}" for k, v in self.per_kernel().items())
        return f"{self.count} ({per})" if per else "0"


def compiled_variants(modules: Iterable[str] = KERNEL_MODULES) -> Optional[int]:
    """Kernels in Triton's in-memory compile caches (GPU), or None under the interpreter."""
    total, seen = 0, False
    for kernel in kernels(modules).values():
        caches = getattr(kernel, "device_caches", None)
        if caches is None:  # InterpretedFunction: nothing is compiled
            continue
        seen = True
        for entry in list(caches.values()):
            total += len(entry[0])  # (kernel_cache, key_cache, target, backend, binder)
    return total if seen else None
