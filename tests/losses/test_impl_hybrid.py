"""impl="hybrid" through the losses (issue 19: documented where ``impl=`` is documented).

The class-level losses (CurricularFace, ArcFace, CosFace, their functional forms and the
sharded twins) hand "hybrid" to the hybrid class logsumexp; the pair-level ``CircleLoss``
has no hybrid path and rejects it with an error naming the value (it used to run the
PyTorch path silently). The hybrid op's own numerics, and ``SparseCircleLoss`` through it,
are tests/ops/test_class_lse_hybrid.py; here the other modules give impl="torch"'s loss,
gradients and buffers, under the interpreter: class ``TestInterpreted`` runs in the one
TRITON_INTERPRET=1 child of tests/ops/test_class_lse_triton.py::test_interpreter_suite, or
directly:

    TRITON_INTERPRET=1 python -m pytest tests/losses/test_impl_hybrid.py -k Interpreted
"""

from __future__ import annotations

import os

_CHILD = "PML_EXTRAS_TRITON_INTERPRET_CHILD"  # set by test_class_lse_triton.py
if os.environ.get(_CHILD) == "1":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from pml_extras import functional  # noqa: E402
from pml_extras.distributed import (  # noqa: E402
    ShardedCurricularFaceLoss,
    ShardedSparseCircleLoss,
)
from pml_extras.losses import (  # noqa: E402
    ArcFaceLoss,
    CircleLoss,
    CosFaceLoss,
    CurricularFaceLoss,
    SparseCircleLoss,
)
from pml_extras.ops.pair_circle import (  # noqa: E402
    all_pairs_circle_loss,
    mined_pairs_circle_loss,
)
from pml_extras.ops.tolerances import CLASS_KERNEL  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child")
B, D, C = 7, 32, 40  # D > 4 ln(C (C - 1)): not low-dimensional (no proxy spreading)
CHUNK = 32  # two chunks: the chunks' logaddexp is exercised too
RTOL = CLASS_KERNEL[torch.float32]["torch"]  # the hybrid path against the PyTorch path
MODULES = {
    "curricular": lambda impl: CurricularFaceLoss(C, D, impl=impl, chunk_size=CHUNK),
    "arcface": lambda impl: ArcFaceLoss(C, D, impl=impl, chunk_size=CHUNK),
    "cosface": lambda impl: CosFaceLoss(C, D, impl=impl, chunk_size=CHUNK),
    "sharded_circle": lambda impl: ShardedSparseCircleLoss(C, D, impl=impl, chunk_size=CHUNK),
    "sharded_curricular": lambda impl: ShardedCurricularFaceLoss(C, D, impl=impl, chunk_size=CHUNK),
}
FUNCTIONALS = {
    "sparse_circle": lambda x, w, y, impl: functional.sparse_circle_loss(
        x, w, y, 0.25, 64.0, chunk_size=CHUNK, impl=impl
    ),
    "arcface": lambda x, w, y, impl: functional.arcface_loss(
        x, w, y, 0.5, 64.0, chunk_size=CHUNK, impl=impl
    ),
    "cosface": lambda x, w, y, impl: functional.cosface_loss(
        x, w, y, 0.35, 64.0, chunk_size=CHUNK, impl=impl
    ),
    "curricular": lambda x, w, y, impl: functional.curricular_face_loss(
        x, w, y, torch.tensor(0.3), 0.5, 64.0, chunk_size=CHUNK, impl=impl
    ),
}


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    return x, torch.randn(D, C, generator=g, dtype=dtype), torch.randint(0, C, (B,), generator=g)


def _close(name, a, b):
    scale = a.abs().max().clamp_min(1e-30)
    err = float((a.double() - b.double()).abs().max() / scale)
    assert err <= RTOL, f"{name}: relative error {err:.3g} > {RTOL}"


def test_pair_circle_loss_rejects_hybrid_naming_the_value():
    with pytest.raises(ValueError, match=r"CircleLoss: impl='hybrid' exists for the class-level"):
        CircleLoss(impl="hybrid")
    with pytest.raises(ValueError, match=r"got 'hybrid'"):
        CircleLoss(m=0.25, gamma=256, impl="hybrid")


def test_pair_functional_forms_reject_hybrid_naming_the_value():
    """The stateless pair ops have no hybrid path either: an error, not the PyTorch path."""
    x = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"impl='hybrid' exists for .* not 'pair_circle'"):
        all_pairs_circle_loss(x, x, labels, labels, self_compare=True, impl="hybrid")
    a1, p = torch.tensor([0, 2]), torch.tensor([1, 3])
    a2, n = torch.tensor([0, 4]), torch.tensor([2, 1])
    with pytest.raises(ValueError, match=r"impl='hybrid' exists for .* not 'pair_circle'"):
        mined_pairs_circle_loss(x, x, a1, p, a2, n, impl="hybrid")
    for impl in ("auto", "torch", "triton"):  # the pair loss's choices still construct
        assert CircleLoss(impl=impl).impl == impl


@pytest.mark.parametrize("name", sorted(MODULES))
def test_class_modules_hand_hybrid_to_the_op(name):
    """Without a Triton device the hybrid op says why it cannot run: the module passed
    "hybrid" on instead of running another path."""
    if INTERPRET:
        pytest.skip("the interpreter makes CPU a Triton device")
    x, _, y = _data()
    loss_fn = MODULES[name]("hybrid")
    assert loss_fn.impl == "hybrid"
    with pytest.raises(RuntimeError, match=r"impl='hybrid' needs the triton package.*got cpu"):
        loss_fn(x, y)


@interpreted
class TestInterpreted:
    @pytest.mark.parametrize("name", sorted(MODULES))
    def test_module_matches_torch_path(self, name):
        x, _, y = _data()
        out = {}
        for impl in ("torch", "hybrid"):
            torch.manual_seed(1)  # the same W init for both
            loss_fn = MODULES[name](impl)
            emb = x.clone().requires_grad_(True)
            for _ in range(2 if "curricular" in name else 1):  # t moves between the calls
                emb.grad = None
                loss_fn.zero_grad()
                loss = loss_fn(emb, y)
                loss.backward()
            buffers = [b.clone() for b in loss_fn.buffers()]
            out[impl] = [loss.detach(), emb.grad, loss_fn.W.grad, *buffers]
        assert len(out["torch"]) == len(out["hybrid"])
        for i, (a, b) in enumerate(zip(out["torch"], out["hybrid"])):
            _close(f"{name}[{i}]", a, b)

    @pytest.mark.parametrize("name", sorted(FUNCTIONALS))
    def test_functional_matches_torch_path(self, name):
        x, w, y = _data()
        out = {}
        for impl in ("torch", "hybrid"):
            xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            losses = FUNCTIONALS[name](xi, wi, y, impl)
            losses.sum().backward()
            out[impl] = (losses.detach(), xi.grad, wi.grad)
        for what, a, b in zip(("losses", "grad_x", "grad_w"), out["torch"], out["hybrid"]):
            _close(f"{name} {what}", a, b)

    def test_float64_raises(self):
        x, _, y = _data(torch.float64)
        with pytest.raises(TypeError, match="impl='hybrid' computes in float32"):
            SparseCircleLoss(C, D, impl="hybrid").double()(x, y)
