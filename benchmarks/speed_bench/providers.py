"""Who is measured: one provider per implementation, each building a :class:`Case` per setup.

Every provider of a setup shares the setup's tensors (:class:`~.setups.Inputs`): the same x,
labels and W storage. The ``floor`` is the bare matmuls a loss of these shapes cannot avoid,
in the matmul operand dtype (the autocast dtype for the autocast setups, cast outside the
timed region). Autocast setups run the loss's forward under ``torch.autocast`` and the
backward outside it, as a training loop does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import naive
import torch

from .setups import FLOOR, Inputs, Setup


class Case:
    """One provider on one setup: ``step(mode)`` runs one call, ``reset()`` drops grads."""

    def __init__(self, step: Callable[[str], None], leaves: Sequence[torch.Tensor], keep=()):
        self._step, self.leaves, self.keep = step, list(leaves), keep

    def reset(self) -> None:
        for t in self.leaves:
            t.grad = None

    def step(self, mode: str) -> None:
        self.reset()
        self._step(mode)


def _param(values: torch.Tensor) -> torch.nn.Parameter:
    # Shares the storage of ``values``: every provider of a setup sees the same W.
    return torch.nn.Parameter(values)


def forward_context(setup: Setup, device: torch.device):
    """``torch.autocast`` for the autocast setups (forward only), else a no-op context."""
    if setup.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=setup.autocast_dtype)


def _loss_case(loss_fn: torch.nn.Module, inputs: Inputs, setup: Setup) -> Case:
    if inputs.W is not None:
        loss_fn.W = _param(inputs.W)
    device = inputs.x.device
    loss_fn.to(device).train()
    x, labels = inputs.x, inputs.labels
    leaves = [x, *loss_fn.parameters()]

    def step(mode: str) -> None:
        with forward_context(setup, device):
            loss = loss_fn(x, labels)
        if mode == "fwd+bwd":
            loss.backward()

    return Case(step, leaves, keep=(loss_fn,))


def _floor_case(setup: Setup, inputs: Inputs, device: torch.device) -> Case:
    # Operands in the dtype the matmuls should run in (autocast: cast here, not timed).
    op = setup.operand_dtype
    x = inputs.x.detach().to(op)
    w = inputs.W.to(op) if setup.level == "class" else x.t()
    n = setup.C if setup.level == "class" else setup.B
    gen = torch.Generator(device=device).manual_seed(1)
    grad_out = torch.randn(setup.B, n, generator=gen, device=device, dtype=op)

    @torch.no_grad()
    def step(mode: str) -> None:
        out = x @ w
        if mode == "fwd+bwd":
            grad_x = grad_out @ w.t()
            grad_w = x.t() @ grad_out
            del grad_x, grad_w
        del out

    return Case(step, [], keep=(x, w, grad_out))


def _ours(name, impl, **hyper_parameters):
    """One of our class-level losses (``pml_extras.losses.<name>``) with the given
    hyper-parameters (none: the loss's defaults)."""

    def build(setup, inputs, device, opts):
        from pml_extras import losses

        cls = getattr(losses, name)
        fn = cls(setup.C, setup.D, impl=impl, chunk_size=opts.get("chunk_size"), **hyper_parameters)
        return _loss_case(fn, inputs, setup)

    return build


def _sparse_circle(impl):
    """The paper's face-recognition settings, stated (not "auto")."""
    return _ours("SparseCircleLoss", impl, m=0.25, gamma=256.0)


def _curricular(impl):
    return _ours("CurricularFaceLoss", impl, margin=0.5, scale=64.0)


def _margin(name, impl):
    """Ours: ArcFaceLoss / CosFaceLoss with PML's default margin and scale."""
    return _ours(name, impl)


def _pml(name, **kwargs):
    def build(setup, inputs, device, opts):
        from pytorch_metric_learning import losses

        cls = getattr(losses, name)
        if setup.level == "class":
            fn = cls(num_classes=setup.C, embedding_size=setup.D, **kwargs)
        else:
            fn = cls(**kwargs)
        return _loss_case(fn, inputs, setup)

    return build


def _naive(cls):
    def build(setup, inputs, device, opts):
        return _loss_case(cls(1, setup.D), inputs, setup)

    return build


def _pair_circle(impl: str):
    def build(setup, inputs, device, opts):
        from pml_extras.losses.circle_loss import CircleLoss

        return _loss_case(CircleLoss(m=0.25, gamma=256.0, impl=impl), inputs, setup)

    return build


def _cuda_only_torch_path(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "on CPU impl='auto' is the PyTorch path: see pair_circle"
    return _has_pair_circle()


def mined_indices(miner: str, inputs: Inputs):
    """The pairs a pair-level mined provider hands to the loss, computed once per case, outside
    the timed and measured region: ``"ms"`` is MultiSimilarityMiner(epsilon=0.1) on the
    setup's embeddings, ``"all"`` every pair (the densest mining, 2 * B^2 int64 per side)."""
    from pytorch_metric_learning import miners
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    with torch.no_grad():
        if miner == "ms":
            return miners.MultiSimilarityMiner(epsilon=0.1)(inputs.x.detach(), inputs.labels)
        return lmu.get_all_pairs_indices(inputs.labels)


def _mined_pair(ours: bool, miner: str):
    def build(setup, inputs, device, opts):
        if ours:
            from pml_extras.losses.circle_loss import CircleLoss
        else:
            from pytorch_metric_learning.losses import CircleLoss
        loss_fn = CircleLoss(m=0.25, gamma=256.0).to(device).train()
        indices = mined_indices(miner, inputs)
        x, labels = inputs.x, inputs.labels

        def step(mode: str) -> None:
            with forward_context(setup, device):
                loss = loss_fn(x, labels, indices)
            if mode == "fwd+bwd":
                loss.backward()

        return Case(step, [x], keep=(loss_fn, indices))

    return build


def _floor(setup, inputs, device, opts):
    return _floor_case(setup, inputs, device)


def _has_pair_circle() -> Optional[str]:
    try:
        from pml_extras.losses.circle_loss import CircleLoss  # noqa: F401
    except Exception as exc:  # the module is still being written
        return f"pml_extras.losses.circle_loss unavailable ({type(exc).__name__}: {exc})"
    return None


def _has_triton(device: torch.device) -> Optional[str]:
    # On CPU the kernels run under Triton's interpreter (gpu_checks.sh's CPU rehearsal).
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    from pml_extras.ops.class_lse import triton_available

    if not triton_available(device):
        return "pml_extras.ops.class_lse_triton (or triton) is not importable"
    return None


def _has_hybrid(device: torch.device) -> Optional[str]:
    """impl='hybrid' (class only): the fused epilogues need Triton; on CUDA its matmuls
    need torch.mm(..., out_dtype=)."""
    reason = _has_triton(device)
    if reason is None:
        from pml_extras.ops.dispatch import mm_has_out_dtype

        if device.type == "cuda" and not mm_has_out_dtype():
            return (
                f"impl='hybrid' needs torch.mm(out_dtype=), which torch {torch.__version__} lacks"
            )
    return reason


def _has_pair_triton(device: torch.device) -> Optional[str]:
    reason = _has_pair_circle() or _has_triton(device)
    if reason is None:
        try:
            from pml_extras.ops import pair_circle_triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"pml_extras.ops.pair_circle_triton unavailable ({type(exc).__name__}: {exc})"
    return reason


@dataclass(frozen=True)
class Provider:
    name: str
    level: str
    build: Callable
    # Number of B x C (class) or B x B (pair) float32-sized temporaries alive at the peak,
    # for the fits-in-memory estimate. 0 for blockwise implementations.
    dense: float
    description: str
    check: Optional[Callable[[torch.device], Optional[str]]] = None
    blockwise: bool = False


PROVIDERS: Dict[str, Provider] = {
    p.name: p
    for p in [
        Provider(FLOOR, "class", _floor, 2, "bare matmuls x@W, dC@W^T, x^T@dC"),
        Provider(
            "sparse_circle_torch",
            "class",
            _sparse_circle("torch"),
            0,
            "ours: SparseCircleLoss(impl='torch'), blockwise",
            blockwise=True,
        ),
        Provider(
            "sparse_circle_triton",
            "class",
            _sparse_circle("triton"),
            0,
            "ours: SparseCircleLoss(impl='triton')",
            _has_triton,
            blockwise=True,
        ),
        Provider(
            "sparse_circle_hybrid",
            "class",
            _sparse_circle("hybrid"),
            0,
            "ours: SparseCircleLoss(impl='hybrid'): library matmuls + fused epilogues",
            _has_hybrid,
            blockwise=True,
        ),
        Provider(
            "curricular_torch",
            "class",
            _curricular("torch"),
            0,
            "ours: CurricularFaceLoss(impl='torch'), blockwise",
            blockwise=True,
        ),
        Provider(
            "curricular_triton",
            "class",
            _curricular("triton"),
            0,
            "ours: CurricularFaceLoss(impl='triton')",
            _has_triton,
            blockwise=True,
        ),
        Provider(
            "arcface_torch",
            "class",
            _margin("ArcFaceLoss", "torch"),
            0,
            "ours: ArcFaceLoss(impl='torch'), blockwise",
            blockwise=True,
        ),
        Provider(
            "arcface_triton",
            "class",
            _margin("ArcFaceLoss", "triton"),
            0,
            "ours: ArcFaceLoss(impl='triton')",
            _has_triton,
            blockwise=True,
        ),
        Provider(
            "cosface_torch",
            "class",
            _margin("CosFaceLoss", "torch"),
            0,
            "ours: CosFaceLoss(impl='torch'), blockwise",
            blockwise=True,
        ),
        Provider(
            "cosface_triton",
            "class",
            _margin("CosFaceLoss", "triton"),
            0,
            "ours: CosFaceLoss(impl='triton')",
            _has_triton,
            blockwise=True,
        ),
        Provider("pml_arcface", "class", _pml("ArcFaceLoss"), 8, "PML ArcFaceLoss (dense)"),
        Provider("pml_cosface", "class", _pml("CosFaceLoss"), 8, "PML CosFaceLoss (dense)"),
        Provider(
            "naive_circle",
            "class",
            _naive(naive.NaiveClassCircleLoss),
            8,
            "straightforward dense class-level Circle loss (benchmarks/naive.py)",
        ),
        Provider(
            "naive_curricular",
            "class",
            _naive(naive.NaiveCurricularFace),
            8,
            "straightforward dense CurricularFace, authors' code (benchmarks/naive.py)",
        ),
    ]
}
PAIR_PROVIDERS: Dict[str, Provider] = {
    p.name: p
    for p in [
        Provider(FLOOR, "pair", _floor, 2, "bare matmuls x@x^T, dS@x, dS^T@x"),
        Provider(
            "pair_circle",
            "pair",
            _pair_circle("auto"),
            0,
            "ours: pml_extras.losses.circle_loss.CircleLoss (impl='auto': the fused Triton "
            "kernels on CUDA, the blockwise PyTorch path on CPU)",
            lambda device: _has_pair_circle(),
            blockwise=True,
        ),
        Provider(
            "pair_circle_triton",
            "pair",
            _pair_circle("triton"),
            0,
            "ours: CircleLoss(impl='triton'), the fused Triton kernels (interpreter on CPU)",
            _has_pair_triton,
            blockwise=True,
        ),
        Provider(
            "pair_circle_torch",
            "pair",
            _pair_circle("torch"),
            0,
            "ours: CircleLoss(impl='torch'), the blockwise PyTorch path (CUDA runs only)",
            _cuda_only_torch_path,
            blockwise=True,
        ),
        Provider(
            "pml_circle",
            "pair",
            _pml("CircleLoss", m=0.25, gamma=256.0),
            12,
            "PML CircleLoss (dense B x B)",
        ),
        # Mined pairs (indices computed outside the timed region, see mined_indices).
        Provider(
            "pair_circle_ms",
            "pair",
            _mined_pair(True, "ms"),
            0,
            "ours: CircleLoss with MultiSimilarityMiner(epsilon=0.1) pairs",
            lambda device: _has_pair_circle(),
            blockwise=True,
        ),
        Provider(
            "pml_circle_ms",
            "pair",
            _mined_pair(False, "ms"),
            12,
            "PML CircleLoss with MultiSimilarityMiner(epsilon=0.1) pairs (dense B x B)",
        ),
        Provider(
            "pair_circle_all",
            "pair",
            _mined_pair(True, "all"),
            0,
            "ours: CircleLoss with every pair passed as mined pairs",
            lambda device: _has_pair_circle(),
            blockwise=True,
        ),
        Provider(
            "pml_circle_all",
            "pair",
            _mined_pair(False, "all"),
            12,
            "PML CircleLoss with every pair passed as mined pairs (dense B x B)",
        ),
    ]
}


def providers_for(level: str) -> Dict[str, Provider]:
    return PROVIDERS if level == "class" else PAIR_PROVIDERS


def all_provider_names() -> List[str]:
    return list(dict.fromkeys(list(PROVIDERS) + list(PAIR_PROVIDERS)))


def default_providers(device: torch.device) -> List[str]:
    names = [n for n in all_provider_names() if n != FLOOR]
    if device.type != "cuda":
        names = [n for n in names if not n.endswith("_triton")]
    return names


def estimate_bytes(provider: Provider, setup: Setup, opts: dict) -> int:
    """Rough peak footprint of one case, for skipping cases that cannot fit."""
    item = max(setup.itemsize, 4)
    inputs = (setup.D * (setup.C or 0) + setup.B * setup.D) * setup.itemsize
    dense = provider.dense * setup.dense_elems() * item
    if provider.blockwise:  # a handful of B x chunk float32 blocks
        dense = 12 * setup.B * min(setup.C or setup.B, 65536) * 4
    return 2 * inputs + setup.floor_mem() + int(dense)
