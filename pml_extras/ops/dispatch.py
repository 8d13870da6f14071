"""Which implementation runs an op (``impl="auto" | "torch" | "triton"``), and the
once-per-process self-check that decides whether ``"auto"`` may trust the fused kernels.

``resolve_impl`` is the one place every op asks; this module alone owns the names of the
implementations (:data:`IMPLS`) and of the kernel families (:data:`FAMILIES`, with the
Triton module of each in :data:`KERNEL_MODULES`). With a kernel ``family``
(:data:`FAMILIES`), the first time a family would run its Triton kernels on a (device,
operand dtype) in this process, :func:`~pml_extras.ops.kernel_check.run_kernel_check`
compares it with the PyTorch path on that device (small fixed problems, forward and
backward; see :mod:`~pml_extras.ops.kernel_check`). The outcome is cached:

* ``impl="auto"``: agreement -> Triton from then on at no further cost; disagreement, or a
  compile / launch failure -> the PyTorch path for that (family, device, dtype), with one
  :class:`KernelCheckWarning` that says what differed, on which device, with which
  versions, and asks for a report.
* ``impl="triton"``: the same check; a failure raises :class:`KernelCheckError` with the
  same details (every call, never a silent fallback).
* ``impl="torch"``: no check.

float32 operands are keyed with torch's TF32 setting (a different kernel specialisation).

Opting out (once your setup is verified): set the environment variable
``PML_EXTRAS_SKIP_KERNEL_CHECK=1`` (read at each first use) or
``pml_extras.ops.dispatch.check_kernels = False``. The kernels then run unchecked.

Also: ``impl="auto"`` on a CUDA tensor whose Triton kernels cannot be imported (no
triton, a broken install) uses PyTorch with one :class:`TritonUnavailableWarning` naming
the module that failed and why.

torch.compile: the check runs outside the graph (``torch.compiler.disable``); the
PyTorch-only decisions ("torch", CPU, float64) stay traceable. Distributed runs: each rank
checks its own device (the key holds the device index) and the check issues no
collectives, so ranks never wait on each other for it.

``impl="auto"`` for the class family on CUDA, once Triton is trusted there: with the
call's ``shape`` (B, C, D), the hybrid (library matmuls + fused epilogues) where the
cost model (:mod:`~pml_extras.ops.cost_model`, the H100 figures unless the device name
says H200) predicts it faster than the fused kernels as built, and where it can run
(its module imports, ``torch.mm`` takes ``out_dtype``) and once its own kernels have
passed their self-check on the device (family ``class_lse_hybrid``; if they fail, the
fused kernels); cached per (B, C, D, operand dtype, W dtype, GPU). These are
predictions, never measurements. Without a shape (direct callers), Triton.

Test hook (private): ``_interpreter_as_device = True`` makes ``"auto"`` treat a CPU tensor
under ``TRITON_INTERPRET=1`` as a Triton device, so that CI runs this whole path (check,
warning, fallback) on the interpreter. Off by default: on CPU, ``"auto"`` is PyTorch.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
import warnings
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .. import _validation
from .precision import TRITON_DTYPES, tf32_enabled

IMPLS = ("auto", "torch", "triton", "hybrid")
# "hybrid" (class family only): library matmuls per class chunk + fused Triton epilogues
# (class_lse_hybrid). "auto" picks it on CUDA where the cost model predicts it faster
# than the fused kernels as built for the call's shapes and dtypes (:func:`model_choice`;
# it has never run on a GPU: the choice is the model's until measurements exist).
HYBRID_FAMILIES = ("class_lse",)
HYBRID_MODULE = "pml_extras.ops.class_lse_hybrid"
# The self-check of the hybrid's own kernels (kernel_check runs the class problems
# through impl="hybrid"); keyed apart from the fused kernels' "class_lse".
HYBRID_CHECK = "class_lse_hybrid"
FAMILIES = ("class_lse", "pair_circle")
# The Triton module each family launches (what a failed import names).
KERNEL_MODULES = {
    "class_lse": "pml_extras.ops.class_lse_triton",
    "pair_circle": "pml_extras.ops.pair_circle_triton",
}
# The operand dtypes a self-check exists for (those the kernels take).
CHECK_DTYPES = TRITON_DTYPES
SKIP_ENV = "PML_EXTRAS_SKIP_KERNEL_CHECK"
# Module-level switch of the self-check (the environment variable also turns it off).
check_kernels = True
# Private test hook; see the module docstring.
_interpreter_as_device = False

_LEGACY_MODULE = "pml_extras.ops.class_lse_triton"  # what triton_available(device) imports


class CheckKey(NamedTuple):
    """What one self-check vouches for: a kernel specialisation family on a device."""

    family: str
    device: str  # "cuda:0"
    operand: torch.dtype  # the matmul operand dtype
    tf32: bool  # float32 operands with TF32 dots
    storage: Optional[torch.dtype] = None  # W's dtype (class family), None for pair


_Key = CheckKey
_results: Dict[_Key, object] = {}  # key -> kernel_check.KernelCheck
_warned: set = set()  # keys (and import failures) already warned about
_lock = threading.RLock()


class KernelCheckError(RuntimeError):
    """``impl="triton"`` was asked for, and the kernels failed their self-check here."""


class KernelCheckWarning(UserWarning):
    """``impl="auto"`` falls back to PyTorch: the kernels failed their self-check here."""


class TritonUnavailableWarning(UserWarning):
    """``impl="auto"`` on CUDA falls back to PyTorch: the Triton kernels do not import."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_module(family: Optional[str]) -> str:
    if family is None:
        return _LEGACY_MODULE
    if family == "hybrid":
        return HYBRID_MODULE
    return KERNEL_MODULES[family]


def _import_error(device: torch.device, family: Optional[str] = None) -> Optional[str]:
    """None when ``family``'s Triton kernels can run on ``device``, else why not."""
    if device.type != "cuda" and not _interpreting():
        return (
            f"Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1); got {device}"
        )
    module = _kernel_module(family)
    try:
        importlib.import_module(module)
    except Exception as exc:
        missing = getattr(exc, "name", None)
        which = f"module {missing!r}" if missing and missing != module else f"{module}"
        return f"importing {module} failed ({which}): {type(exc).__name__}: {exc}"
    return None


def triton_available(device: torch.device, family: Optional[str] = None) -> bool:
    """Whether the fused Triton kernels (of ``family``; default the class-level ones)
    import and have somewhere to run: a CUDA tensor, or CPU under ``TRITON_INTERPRET=1``."""
    return _import_error(device, family) is None


def _checks_enabled() -> bool:
    return check_kernels and os.environ.get(SKIP_ENV, "").strip().lower() in ("", "0", "false")


def _triton_device(device: torch.device) -> bool:
    """Where ``"auto"`` considers Triton at all."""
    return device.type == "cuda" or (_interpreter_as_device and _interpreting())


def resolve_impl(
    impl: str,
    device: torch.device,
    dtype: Optional[torch.dtype] = None,
    *,
    family: Optional[str] = None,
    operand: Optional[torch.dtype] = None,
    storage: Optional[torch.dtype] = None,
    shape: Optional[Tuple[int, int, int]] = None,
) -> str:
    """ "torch", "triton" or "hybrid" for ``impl`` on ``device``.

    Args:
        impl: "auto", "torch", "triton" or "hybrid" (class family only; "auto" picks it
            on CUDA where the cost model predicts it faster: :func:`model_choice`).
        device: the inputs' device.
        dtype: the inputs' promoted dtype; "auto" keeps float64 on the PyTorch path.
        family: the kernel family about to launch ("class_lse", "pair_circle"). With it,
            Triton is self-checked once per (family, device, operand dtype) before use
            (see the module docstring); without it, no check.
        operand: the kernels' matmul operand dtype (default ``dtype``), the check's key.
        storage: the dtype the class proxies W are stored in (bf16-stored W is another
            specialisation, checked on its own); None for families without W.
        shape: (B, C, D) of a class-family call: what "auto" gives the cost model to
            choose between "triton" and "hybrid" on CUDA; None: "triton".

    Raises:
        ValueError: unknown ``impl``.
        RuntimeError: ``impl="triton"`` where Triton cannot run.
        KernelCheckError: ``impl="triton"`` and the kernels failed their self-check.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    operand = dtype if operand is None else operand
    if impl == "hybrid":
        return _resolve_hybrid(device, dtype, family, operand, storage)
    if impl == "auto":
        if not _triton_device(device) or dtype == torch.float64:
            return "torch"
        if not _auto_can_import(device, family):
            return "torch"
        if family is not None and not _kernels_trusted(
            family, device, operand, storage, raise_=False
        ):
            return "torch"
        if (
            family in HYBRID_FAMILIES
            and shape is not None
            and device.type == "cuda"  # never the interpreter: CPU "auto" is torch
            and _hybrid_runs(device)
            and model_choice(shape, operand, storage, _gpu_name(device)) == "hybrid"
            # Its own kernels (the epilogues) self-checked on this device first; if they
            # fail, the fused kernels (checked above) run instead.
            and _kernels_trusted(HYBRID_CHECK, device, operand, storage, raise_=False)
        ):
            return "hybrid"
        return "triton"
    if not triton_available(device, family):
        raise RuntimeError(
            "impl='triton' needs the triton package and a CUDA tensor "
            "(or TRITON_INTERPRET=1 on CPU); use impl='torch' or 'auto'"
        )
    # On CPU the interpreter is a developer's tool: checked only through the test hook.
    if family is not None and _triton_device(device):
        _kernels_trusted(family, device, operand, storage, raise_=True)
    return "triton"


def _resolve_hybrid(device: torch.device, dtype, family, operand, storage) -> str:
    if family not in HYBRID_FAMILIES:
        raise ValueError(f"impl='hybrid' exists for {HYBRID_FAMILIES} only, not {family!r}")
    if not triton_available(device, family):
        raise RuntimeError(
            "impl='hybrid' needs the triton package and a CUDA tensor (or "
            f"TRITON_INTERPRET=1 on CPU) for its epilogue kernel, got {device}; use "
            "impl='torch' or 'auto'"
        )
    if device.type == "cuda" and not mm_has_out_dtype():
        raise RuntimeError(
            f"impl='hybrid' needs torch.mm(..., out_dtype=torch.float32) for its tensor-core "
            f"matmuls with float32 output, which torch {torch.__version__} lacks (torch >= "
            "2.8 has it); use impl='triton', 'torch' or 'auto'"
        )
    if dtype == torch.float64:
        raise TypeError("impl='hybrid' computes in float32; float64 needs impl='torch'")
    # As impl="triton": self-checked on a CUDA device (the interpreter: the test hook).
    if _triton_device(device):
        _kernels_trusted(HYBRID_CHECK, device, operand, storage, raise_=True)
    return "hybrid"


@functools.cache
def mm_has_out_dtype() -> bool:
    """Whether this torch's ``torch.mm`` takes ``out_dtype`` (tried on the meta device)."""
    a = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _hybrid_runs(device: torch.device) -> bool:
    """Whether "auto" may consider the hybrid on ``device``: its module imports and
    torch.mm has out_dtype (its own self-check, ``HYBRID_CHECK``, runs only where the
    model then prefers it)."""
    return mm_has_out_dtype() and _import_error(device, "hybrid") is None


def _gpu_name(device: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError, AttributeError):  # no CUDA runtime here
        return ""


_MODEL_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_model_choices: Dict[tuple, str] = {}


@_validation._compile_opt_out("pml_extras evaluates its cost model outside the graph")
def model_choice(shape, operand: torch.dtype, storage, gpu_name: str = "") -> str:
    """ "hybrid" where the cost model predicts ``class_lse_hybrid`` (as built) faster than
    the fused kernels as built (``CURRENT_CLASS``) for one fwd+bwd at ``shape`` (B, C,
    D), else "triton"; on the H200's figures when ``gpu_name`` says H200, else the
    H100's. Cached per (B, C, D, operand dtype, W dtype, GPU). A prediction: no GPU has
    timed either."""
    from . import cost_model

    hw = cost_model.H200 if "H200" in gpu_name.upper() else cost_model.H100_SXM
    op = _MODEL_DTYPES.get(operand)
    w = _MODEL_DTYPES.get(storage if storage is not None else operand)
    if op is None or w is None:
        return "triton"
    if op == "fp32" and tf32_enabled():
        op = "tf32"
    key = (tuple(shape), op, w, hw.name)
    with _lock:
        choice = _model_choices.get(key)
    if choice is None:
        b, c, d = shape
        fused = cost_model.total(
            cost_model.class_kernels(b, c, d, op, w, cost_model.CURRENT_CLASS, hw), hw
        )
        hybrid = cost_model.total(
            cost_model.hybrid_class_kernels(b, c, d, op, w, hw=hw, as_built=True), hw
        )
        choice = "hybrid" if hybrid < fused else "triton"
        with _lock:
            _model_choices[key] = choice
    return choice


@_validation._compile_opt_out("pml_extras imports its Triton kernels outside the graph")
def _auto_can_import(device: torch.device, family: Optional[str]) -> bool:
    why = _import_error(device, family)
    if why is None:
        return True
    if device.type == "cuda":
        with _lock:
            first = why not in _warned
            _warned.add(why)
        if first:
            _warn(
                f"pml_extras: impl='auto' cannot use the fused Triton kernels on {device} "
                f"and falls back to the PyTorch path (slower, same results): {why}. Install "
                "a triton that matches your torch, or pass impl='torch' to silence this.",
                TritonUnavailableWarning,
            )
    return False


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def _warn(message: str, category) -> None:
    """``warnings.warn`` attributed to the first frame outside pml_extras and torch (the
    user's line that called the loss), however deep the call came from."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE, _TORCH)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _capturing() -> bool:
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except RuntimeError:  # a CPU-only torch build
        return False


def _key(family, device: torch.device, operand: torch.dtype, storage=None) -> CheckKey:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tf32 = operand == torch.float32 and tf32_enabled()
    return CheckKey(family, str(device), operand, tf32, storage)


# The check launches kernels and synchronises the device: never part of a graph.
@_validation._compile_opt_out("pml_extras self-checks its Triton kernels once, eagerly")
def _kernels_trusted(family, device: torch.device, operand, storage, raise_: bool) -> bool:
    # The check runs the ops' autograd Functions with impl="triton" fixed, never
    # resolve_impl: no re-entry here, and kernel_check imports no op's public module.
    from . import kernel_check

    if operand not in CHECK_DTYPES or not _checks_enabled():
        return True  # unsupported dtypes raise in the kernels themselves
    if storage not in CHECK_DTYPES:
        storage = None  # (float64 W has no Triton path: it raises in the kernels)
    key = _key(family, device, operand, storage)
    with _lock:
        result = _results.get(key)
        if result is None and device.type == "cuda" and _capturing():
            # The check synchronises and reads results on the host: impossible inside a
            # CUDA graph capture, and a kernel captured unchecked would replay unchecked.
            raise RuntimeError(
                f"pml_extras: the {family} Triton kernels have not been self-checked on "
                f"{key[1]} for {key[2]} operands yet, and a CUDA graph is being captured. "
                f"Run one step before capturing, or set {SKIP_ENV}=1 once verified."
            )
        if result is None:
            extra = () if storage is None else (storage,)
            result = kernel_check.run_kernel_check(family, device, operand, *extra)
            _results[key] = result
        first_warning = not result.passed and key not in _warned and not raise_
        if first_warning:
            _warned.add(key)
    if result.passed:
        return True
    report = (
        f"pml_extras kernel self-check: {result.describe()} Please report this to the "
        "pml-extras issue tracker with this message."
    )
    hybrid = family == HYBRID_CHECK
    if raise_:
        raise KernelCheckError(
            f"{report} impl='{'hybrid' if hybrid else 'triton'}' was requested, so this is "
            f"an error; impl='auto' would use the "
            f"{'fused Triton kernels' if hybrid else 'PyTorch path'} here."
        )
    if first_warning:
        instead = "the fused Triton kernels" if hybrid else "the PyTorch path"
        _warn(
            f"{report} impl='auto' uses {instead} for {family} on {result.device} "
            f"with {result.dtype} operands in this process (slower, correct).",
            KernelCheckWarning,
        )
    return False


def kernel_check_results() -> Dict[_Key, object]:
    """The self-checks run so far in this process: (family, device, dtype, tf32) ->
    :class:`~pml_extras.ops.kernel_check.KernelCheck`."""
    with _lock:
        return dict(_results)


def _reset() -> None:
    """Forget every check and warning (tests)."""
    with _lock:
        _results.clear()
        _warned.clear()
        _model_choices.clear()


__all__ = [
    "CHECK_DTYPES",
    "FAMILIES",
    "IMPLS",
    "KERNEL_MODULES",
    "SKIP_ENV",
    "KernelCheckError",
    "KernelCheckWarning",
    "TritonUnavailableWarning",
    "check_kernels",
    "kernel_check_results",
    "mm_has_out_dtype",
    "model_choice",
    "resolve_impl",
    "triton_available",
]
