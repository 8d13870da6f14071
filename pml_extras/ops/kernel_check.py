"""The kernel self-check: a fused Triton kernel family against the PyTorch path, on the
user's own device, before ``impl="auto"`` trusts it.

A kernel that compiles but computes a wrong number on some GPU (TF32 where IEEE was
meant, an approximate ``sqrt`` at the clamp edge, a tile mask the interpreter did not
mirror, an architecture nobody here ran) would silently train a wrong model. So the
first time a family is about to run on a (device, operand dtype) in a process,
:mod:`pml_extras.ops.dispatch` calls :func:`run_kernel_check`: small fixed problems,
forward and backward, through the family's autograd Function with the implementation
fixed (Triton, then PyTorch, on the same device), compared output by output. The check
never goes through ``resolve_impl`` (nothing to re-enter) and imports no op's public
module, only the Functions' (:mod:`~pml_extras.ops.class_lse_autograd`,
:mod:`~pml_extras.ops.pair_circle_autograd`).

(This module was ``pml_extras.ops.selfcheck``; that name still works, with a
DeprecationWarning. The command-line check is ``python benchmarks/selfcheck.py``.)

Families (:data:`~pml_extras.ops.dispatch.FAMILIES`):

* ``"class_lse"``: :func:`~pml_extras.ops.class_lse.class_logsumexp`, each of its three
  transforms (circle, curricular, scaled). B = 67, D = 261, C = 133: two 64-row blocks,
  five 32-class tiles (last one partial), D over four 64-wide steps and, for float32
  operands, two 256-wide groups. Targets on the tile edges 0, 15, 16, 31, 32, 63, 64,
  127, 128, 132; one row equal to a non-target proxy (cos = +1), one equal to minus a
  proxy (cos = -1), one equal to its own target proxy (cos_y = 1), a target of -1 (the
  sharded losses' "not on this rank"), and a zero proxy column. Outputs: lse, cos_y,
  grad_x, grad_W of a weighted sum of lse and cos_y. W is stored in the dtype the
  check is keyed by (float32 by default; bf16-stored proxies get their own check).
* ``"pair_circle"``: :func:`~pml_extras.ops.pair_circle.all_pairs_circle_loss` at
  gamma = 256, the self-comparison (B = 133: crosses the 128-row forward and 64-row
  backward tiles) and a reference set of N = 71 rows, with the dense-mined mask form
  of the kernels too (:func:`~pml_extras.ops.pair_circle.mined_pairs_circle_loss`,
  ``path="dense"``). Same-label rows straddle the tile edges 31/32, 63/64, 127/128;
  a positive pair at s = +1, a negative at s = +1 and one at s = -1, a zero row.
  D = 261 (rows of 522 bf16 bytes, not a multiple of 16): the backward's pointer-load
  path; the training problem's D = 512 (64 under the interpreter) takes its TMA path.
  Outputs: the losses and the embeddings' gradients.

Each family also runs a problem shaped like training's launches
(:func:`production_shapes`), so that the binaries compared are the ones training runs:
Triton compiles a kernel per specialisation (a size divisible by 16 gives aligned,
vectorised loads; an integer argument equal to 1 becomes a constant, which would skip
the in-kernel online logsumexp across tiles), and a check at odd sizes only would
compare other binaries. There: D = 512 on a GPU (64 under the interpreter), B and C
multiples of 16, several class splits of more than one tile each, the same for the
pair forward's column tiles, each transform's forward and backward (``NEED_U``) and
its no-grad forward (``NEED_U=False``, evaluation), and W in the keyed storage dtype.

Errors are ``max |triton - torch| / max |torch|`` per output (infinities must match,
NaN fails). Tolerances (``TOLERANCES``) are ``pml_extras.ops.tolerances.KERNEL``, the
table the interpreter tests read too (see that module for where each entry comes from);
float32 under TF32 gets the bfloat16 entry. Measured errors of correct kernels
under the interpreter are 2.4e-6 / 1.2e-2 / 7.2e-4 (class, fp32 / bf16 / fp16) and
2.3e-6 / 8.2e-3 / 9.6e-4 (pair), from 2.4x (pair bf16) to 40x under the tolerances.

The inputs come from a fixed CPU generator (the user's RNG streams are untouched); the
check runs with autocast off and autograd on whatever the caller's context, and it
issues no collective, so each rank of a distributed run checks its own device alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _env
from .precision import TRITON_DTYPES as CHECK_DTYPES
from .precision import dtype_label, tf32_enabled
from .tolerances import KERNEL, kernel_tolerance

# Largest error relative to the largest entry, per family and operand dtype: the tests'
# own bounds, from the one table (pml_extras.ops.tolerances).
TOLERANCES = KERNEL


def tolerance(family: str, dtype: torch.dtype, tf32: bool = False) -> float:
    """The check's tolerance for ``family`` with ``dtype`` operands (TF32: bf16's)."""
    return kernel_tolerance(family, dtype, tf32)


def device_description(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90)', or the CPU for the interpreter."""
    return _env.device_description(device)


def versions() -> str:
    """'triton 3.9.0, torch 2.13.0, CUDA 12.8' (from :mod:`pml_extras._env`)."""
    return _env.versions_line()


@dataclasses.dataclass
class KernelCheck:
    """Outcome of one self-check of a kernel ``family`` on ``device`` for ``dtype``."""

    family: str
    device: str
    dtype: str
    passed: bool
    max_rel_err: float  # the largest error over all outputs (nan when it did not run)
    output: str  # which output had it ("" when the kernels failed to run)
    tolerance: float
    seconds: float  # wall time of the whole check, compilation included
    error: str = ""  # the exception, when the kernels failed to compile or launch
    device_name: str = ""
    versions: str = ""
    errors: Dict[str, float] = dataclasses.field(default_factory=dict)  # per output
    storage: str = ""  # the dtype W was stored in (class family)

    def describe(self) -> str:
        """What happened, with everything a bug report needs."""
        where = (
            f"the fused Triton kernels of family {self.family!r} on {self.device} "
            f"[{self.device_name}] with {self.dtype} operands"
            + (f" (W stored as {self.storage})" if self.storage else "")
        )
        if self.error:
            what = f"{where} failed to compile or run: {self.error}"
        elif self.passed:
            what = (
                f"{where} agree with the PyTorch path (max relative error "
                f"{self.max_rel_err:.2e} in {self.output}, tolerance {self.tolerance:.0e})"
            )
        else:
            what = (
                f"{where} disagree with the PyTorch path: max relative error "
                f"{self.max_rel_err:.2e} in {self.output} (tolerance {self.tolerance:.0e}; "
                + ", ".join(f"{k} {v:.2e}" for k, v in self.errors.items())
                + ")"
            )
        return f"{what}. {self.versions}."


def rel_err(ours: Tensor, ref: Tensor) -> float:
    """max |ours - ref| / max |ref| in float64; inf if the infinities differ, nan if any
    value is nan (both fail the check)."""
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("nan")
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    if not torch.equal(inf_a, inf_b) or not torch.equal(a[inf_a], b[inf_b]):
        return float("inf")
    a, b = a[~inf_a], b[~inf_b]
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------ the problems

_SEED = 1234
_ZERO_COLUMN = 7


def _class_inputs(device: torch.device, dtype: torch.dtype, storage: torch.dtype):
    B, D, C = 67, 261, 133
    g = torch.Generator().manual_seed(_SEED)
    W = torch.randn(D, C, generator=g) * (0.2 + 2.0 * torch.rand(C, generator=g))
    x = torch.randn(B, D, generator=g) * (0.5 + torch.rand(B, 1, generator=g))
    target = torch.randint(0, C, (B,), generator=g)
    edges = [0, 15, 16, 31, 32, 63, 64, 127, 128, 132]
    target[3 : 3 + len(edges)] = torch.tensor(edges)
    zero = _ZERO_COLUMN  # the zero proxy column: no row targets it, every row sees it as a negative
    target[target == zero] = zero + 1
    W[:, zero] = 0.0
    # Rows at the clamp edges (scaled, so that only the op's normalisation makes them 1).
    x[0] = 1.3 * W[:, 50]  # cos = +1 to a non-target proxy
    target[0] = 51
    x[1] = -0.7 * W[:, 90]  # cos = -1
    target[1] = 89
    x[2] = 2.0 * W[:, 128]  # cos_y = +1 (its own target proxy, on a tile edge)
    target[2] = 128
    target[20] = -1  # no target column among these classes
    row_param = torch.rand(B, generator=g) - 0.5
    weights = (torch.randn(B, generator=g), torch.randn(B, generator=g))
    # bf16/fp16 operands: the embeddings in that dtype and W stored in ``storage``
    # (float32 proxies as under autocast, or proxies kept in bf16 / fp16).
    x = x.to(device=device, dtype=dtype)
    W = W.to(device=device, dtype=storage)
    return x, W, target.to(device), row_param.to(device), [w.to(device) for w in weights]


def production_shapes(device: torch.device) -> Dict[str, Tuple[int, ...]]:
    """The problems shaped like training's launches on ``device``: {"class": (B, D, C),
    "pair": (B, D)}.

    What Triton specialises on is matched, not the sizes: D = 512 (a multiple of 16, one
    bf16 D group, two float32 ones) on a GPU, 64 under the interpreter (small shapes on
    CPU; the same code); B a multiple of 16 with a partial second row block; C a
    multiple of 16 with 4 x (SMs x blocks per SM) + 3 class tiles, more tiles than the
    forward ever splits into (it takes at most 4 waves of splits for 2 row blocks), so
    that there are several splits of more than one tile each (``tiles_per_split > 1``),
    with or without u (``NEED_U``); the pair batch has ``R`` 128-row blocks with R^2 > the
    SM count, so that the forward's column tiles outnumber its splits there too."""
    from ._triton_common import sm_count

    slots = sm_count(device)
    d = 512 if device.type == "cuda" else 64
    class_rows = 96  # two 64-row blocks, the second one partial
    num_classes = 32 * (4 * slots + 3)
    row_blocks = math.isqrt(slots) + 1
    return {"class": (class_rows, d, num_classes), "pair": (128 * row_blocks, d)}


def _class_production(device, dtype, storage):
    B, D, C = production_shapes(device)["class"]
    g = torch.Generator().manual_seed(_SEED + 2)
    W = torch.randn(D, C, generator=g) * (0.5 + torch.rand(C, generator=g))
    x = torch.randn(B, D, generator=g)
    target = torch.randint(0, C, (B,), generator=g)
    target[:4] = torch.tensor([0, C - 1, 32, 33])  # first / last class, a tile edge
    x[5] = 1.5 * W[:, target[5]]  # cos_y = +1
    # CurricularFace's threshold cos(theta_y + m) as in training from random proxies
    # (theta_y ~ pi/2, m ~ 0.5): clear of the bulk of the cosines, so that the two
    # paths' roundings do not flip hard-example masks (the edge problem covers those).
    row_param = -0.45 - 0.1 * torch.rand(B, generator=g)
    weights = (torch.randn(B, generator=g), torch.randn(B, generator=g))
    x = x.to(device=device, dtype=dtype)
    W = W.to(device=device, dtype=storage)
    return x, W, target.to(device), row_param.to(device), [w.to(device) for w in weights]


_CLASS_KINDS = {
    "circle": (256.0, 0.25, False),
    "curricular": (64.0, 0.3, True),  # p1 = t as a 0-d tensor, row_param used
    "scaled": (64.0, 0.0, False),
}


def _class_run(
    impl: str, device: torch.device, dtype: torch.dtype, storage: torch.dtype
) -> Dict[str, Tensor]:
    out = _class_edges(impl, device, dtype, storage)
    out.update(_class_training(impl, device, dtype, storage))
    return out


def _class_training(impl, device, dtype, storage) -> Dict[str, Tensor]:
    """The production-shaped problem, each transform: forward and backward (``NEED_U``),
    and the no-grad forward (``NEED_U=False``, what evaluation launches)."""
    from .class_lse_autograd import apply_class_lse, default_chunk_size

    x0, W0, target, row_param, (g_lse, g_cos) = _class_production(device, dtype, storage)
    chunk = default_chunk_size(x0.shape[0], W0.shape[1])
    out = {}
    for kind, (p0, p1, tensor_p1) in _CLASS_KINDS.items():
        p1_arg = torch.tensor(p1, device=device) if tensor_p1 else p1
        args = (target, kind, p0, p1_arg, row_param, chunk, impl, dtype)
        x = x0.clone().requires_grad_()
        W = W0.clone().requires_grad_()
        lse, cos_y = apply_class_lse(x, W, *args)
        ((lse * g_lse).sum() + (cos_y * g_cos).sum()).backward()
        plain_lse, plain_cos = apply_class_lse(x0, W0, *args)  # no input needs a gradient
        out.update(
            {
                f"training.{kind}.lse": lse.detach(),
                f"training.{kind}.cos_y": cos_y.detach(),
                f"training.{kind}.grad_x": x.grad,
                f"training.{kind}.grad_W": W.grad,
                f"training.{kind}.no_grad.lse": plain_lse,
                f"training.{kind}.no_grad.cos_y": plain_cos,
            }
        )
    return out


def _class_edges(impl, device, dtype, storage) -> Dict[str, Tensor]:
    from .class_lse_autograd import apply_class_lse, default_chunk_size

    x0, W0, target, row_param, (g_lse, g_cos) = _class_inputs(device, dtype, storage)
    out = {}
    for kind, (p0, p1, tensor_p1) in _CLASS_KINDS.items():
        x = x0.clone().requires_grad_()
        W = W0.clone().requires_grad_()
        p1_arg = torch.tensor(p1, device=device) if tensor_p1 else p1
        chunk = default_chunk_size(x.shape[0], W.shape[1])
        lse, cos_y = apply_class_lse(x, W, target, kind, p0, p1_arg, row_param, chunk, impl, dtype)
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        ((finite * g_lse).sum() + (cos_y * g_cos).sum()).backward()
        # The zero column's gradient is scaled by its inverse norm (1e6, the norm floor):
        # compared on its own, so that it does not hide the error of every other column.
        others = torch.ones(W.shape[1], dtype=torch.bool, device=device)
        others[_ZERO_COLUMN] = False
        out.update(
            {
                f"{kind}.lse": lse.detach(),
                f"{kind}.cos_y": cos_y.detach(),
                f"{kind}.grad_x": x.grad,
                f"{kind}.grad_W": W.grad[:, others],
                f"{kind}.grad_W[zero column]": W.grad[:, _ZERO_COLUMN],
            }
        )
    return out


def _pair_inputs(device: torch.device):
    B, N, D = 133, 71, 261
    g = torch.Generator().manual_seed(_SEED + 1)
    x = torch.randn(B, D, generator=g)
    labels = torch.randint(0, 23, (B,), generator=g)
    for a, b in ((31, 32), (63, 64), (127, 128)):  # positives across tile edges
        labels[b] = labels[a]
    labels[5] = labels[6]
    x[6] = x[5]  # positive pair at s = +1
    labels[9] = labels[8] + 1
    x[9] = x[8]  # negative pair at s = +1 (the largest negative logit)
    labels[11] = labels[10] + 1
    x[11] = -x[10]  # s = -1
    x = F.normalize(x, dim=1)
    x[12] = 0.0  # a zero row (s = 0 with everything)
    y = F.normalize(torch.randn(N, D, generator=g), dim=1)
    y[3] = x[40]
    ref_labels = torch.randint(0, 23, (N,), generator=g)
    ref_labels[3] = labels[40]
    # A dense mined set: about a third of the pairs, each positive or negative.
    same = labels[:, None] == labels[None, :]
    keep = torch.rand(B, B, generator=g) < 0.35
    a1, p = torch.nonzero(same & keep, as_tuple=True)
    a2, n = torch.nonzero(~same & keep, as_tuple=True)
    weights = torch.randn(3, B, generator=g)
    move = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return (*move(x, y, labels, ref_labels, weights), move(a1, p, a2, n))


def _pair_training(impl, device, dtype) -> Dict[str, Tensor]:
    """The production-shaped self-comparison (see :func:`production_shapes`), forward and
    backward, and its no-grad forward."""
    from .pair_circle_autograd import LabelMasks, blockwise_circle

    B, D = production_shapes(device)["pair"]
    g = torch.Generator().manual_seed(_SEED + 3)
    x0 = F.normalize(torch.randn(B, D, generator=g), dim=1)
    # Rounded to the operand dtype first, so that both paths see the same values and
    # only the kernels' arithmetic is compared (the PyTorch path multiplies in float32).
    x0 = x0.to(dtype).to(torch.float32).to(device)
    labels = torch.randint(0, max(2, B // 8), (B,), generator=g).to(device)
    weights = torch.randn(B, generator=g).to(device)
    operand = dtype if impl == "triton" else None
    masks = LabelMasks(labels, labels, True)
    x = x0.clone().requires_grad_()
    loss = blockwise_circle(x, x, masks, 0.25, 256.0, None, True, operand)
    (loss * weights).sum().backward()
    plain = blockwise_circle(x0, x0, masks, 0.25, 256.0, None, True, operand)
    return {"training.loss": loss.detach(), "training.grad_x": x.grad, "training.no_grad": plain}


def _pair_run(
    impl: str, device: torch.device, dtype: torch.dtype, storage: torch.dtype
) -> Dict[str, Tensor]:
    out = _pair_edges(impl, device, dtype)
    out.update(_pair_training(impl, device, dtype))
    return out


def _pair_edges(impl: str, device: torch.device, dtype: torch.dtype) -> Dict[str, Tensor]:
    from .pair_circle_autograd import LabelMasks, PairMasks, blockwise_circle

    x0, y0, labels, ref_labels, weights, mined = _pair_inputs(device)
    operand = dtype if impl == "triton" else None

    def run(a, b, masks):
        return blockwise_circle(a, b, masks, 0.25, 64.0, None, True, operand)

    x = x0.clone().requires_grad_()
    y = y0.clone().requires_grad_()
    self_loss = run(x, x, LabelMasks(labels, labels, True))
    ref_loss = run(x, y, LabelMasks(labels, ref_labels, False))
    mined_loss = run(x, x, PairMasks(*_dense_masks(mined, x.shape[0])))
    total = (self_loss * weights[0]).sum() + (ref_loss * weights[1]).sum()
    (total + (mined_loss * weights[2]).sum()).backward()
    return {
        "self.loss": self_loss.detach(),
        "ref.loss": ref_loss.detach(),
        "mined.loss": mined_loss.detach(),
        "grad_x": x.grad,
        "grad_ref": y.grad,
    }


def _dense_masks(mined, rows: int):
    """(B, B) boolean positive / negative masks of the mined index pairs."""
    a1, p, a2, n = mined
    pos = torch.zeros(rows, rows, dtype=torch.bool, device=a1.device)
    neg = torch.zeros_like(pos)
    pos[a1, p] = True
    neg[a2, n] = True
    return pos, neg


_RUNNERS: Dict[str, Callable[..., Dict[str, Tensor]]] = {
    "class_lse": _class_run,
    "pair_circle": _pair_run,
    # The class hybrid (class_lse_hybrid: library matmuls + fused Triton epilogues): the
    # class problems through impl="hybrid", before impl="auto" picks it.
    "class_lse_hybrid": _class_run,
}
# The implementation each family's check runs against impl="torch".
IMPL_UNDER_CHECK = {"class_lse_hybrid": "hybrid"}
CLASS_FAMILIES = ("class_lse", "class_lse_hybrid")  # the ones with proxies W


def _compare(got: Dict[str, Tensor], want: Dict[str, Tensor]) -> Tuple[float, str, Dict]:
    errors = {name: rel_err(got[name], want[name]) for name in want}
    # nan sorts nowhere: report it first, then the largest error.
    worst = max(errors, key=lambda k: (errors[k] != errors[k], errors[k]))
    return errors[worst], worst, errors


def run_kernel_check(
    family: str, device, dtype: torch.dtype, storage: Optional[torch.dtype] = None
) -> KernelCheck:
    """Run ``family``'s self-check on ``device`` for ``dtype`` operands now, uncached.

    ``storage``: the dtype W is stored in (class family; default float32). The pair
    kernels take float32 unit rows whatever the embeddings' dtype, so it is ignored there.

    Never raises for a kernel that fails: the :class:`KernelCheck` says what happened
    (``passed``, ``max_rel_err``, ``output``, ``error``). :mod:`~pml_extras.ops.dispatch`
    caches its outcome per (family, device, dtype, TF32, storage); call this one
    directly to re-check (``benchmarks/selfcheck.py`` does).

    Example::

        >>> result = run_kernel_check("class_lse", "cuda", torch.bfloat16)  # doctest: +SKIP
        >>> result.passed, result.max_rel_err, result.seconds  # doctest: +SKIP
        (True, 0.0021, 3.8)
    """
    if family not in _RUNNERS:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {tuple(_RUNNERS)}")
    if dtype not in CHECK_DTYPES:
        raise TypeError(f"the Triton kernels take {CHECK_DTYPES} operands, got {dtype}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tf32 = dtype == torch.float32 and tf32_enabled()
    tol = tolerance(family, dtype, tf32)
    storage = torch.float32 if storage is None or family not in CLASS_FAMILIES else storage
    if storage not in CHECK_DTYPES:
        raise TypeError(f"W stored as {storage} has no Triton path; expected one of {CHECK_DTYPES}")
    info = dict(
        family=family,
        device=str(device),
        dtype=dtype_label(dtype, tf32),
        storage=dtype_label(storage) if family in CLASS_FAMILIES else "",
        tolerance=tol,
        device_name=device_description(device),
        versions=versions(),
    )
    run = _RUNNERS[family]
    start = time.perf_counter()
    # Whatever the caller's context: gradients on, autocast off (the dtype is explicit),
    # the launches on this device, and warnings (the interpreter's numpy overflow notes)
    # neither shown nor, under a caller's "error" filter, turned into a failed check.
    with torch.inference_mode(False), torch.enable_grad(), _no_autocast(device):
        with _on_device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                got = run(IMPL_UNDER_CHECK.get(family, "triton"), device, dtype, storage)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # launch errors surface here
            except Exception as exc:
                seconds = time.perf_counter() - start
                err = f"{type(exc).__name__}: {_first_lines(str(exc))}"
                nan = float("nan")
                return KernelCheck(
                    passed=False, max_rel_err=nan, output="", seconds=seconds, error=err, **info
                )
            want = run("torch", device, dtype, storage)
    worst, output, errors = _compare(got, want)
    seconds = time.perf_counter() - start
    passed = worst <= tol  # nan compares False
    return KernelCheck(
        passed=passed,
        max_rel_err=worst,
        output=output,
        seconds=seconds,
        errors=errors,
        **info,
    )


def _first_lines(text: str, n: int = 6) -> str:
    lines: List[str] = text.strip().splitlines()
    return " | ".join(lines[:n]) + (" | ..." if len(lines) > n else "")


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


__all__ = [
    "CHECK_DTYPES",
    "TOLERANCES",
    "KernelCheck",
    "rel_err",
    "run_kernel_check",
    "tolerance",
]
