"""Behaviour snapshot of every public loss: record now, compare bit for bit later.

Refactors of the loss layer must leave values, gradients and state_dicts unchanged on
the CPU path. This script pins that down. ``snapshot`` runs every public loss of
``pml_extras.losses``, ``pml_extras.functional`` and the single-process parts of
``pml_extras.distributed`` (world size 1, no process group) at fixed seeds for a few SGD
steps, with and without a miner, reducer and regularizers, and saves every loss value,
every gradient (embeddings and loss parameters), the logits, the resolved
hyper-parameters, and the final state_dict (parameters and buffers) to one file.
``compare`` checks two such files with ``torch.equal`` (NaNs must sit at the same
places) and names every key that is missing, changed in shape/dtype, or changed in value.

Usage (from the repository root)::

    python tools/behaviour_snapshot.py snapshot /tmp/before.pt          # at the old commit
    python tools/behaviour_snapshot.py snapshot /tmp/after.pt           # after the change
    python tools/behaviour_snapshot.py compare /tmp/before.pt /tmp/after.pt
    python tools/behaviour_snapshot.py list                             # the case names
    python tools/behaviour_snapshot.py snapshot out.pt --only SparseCircle --steps 2

``compare`` exits with status 1 and one line per difference when the files differ.
Only public names are used, so the same script runs on the old and the new code.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

Record = Dict[str, torch.Tensor]

# Sizes: C classes, D dimensions, B samples per step. HIGH_D is above the low-dimensional
# threshold 4*ln(C*(C-1)) = 18.0 for C = 10 (papers' values), LOW_D below it ("auto" rule).
C, HIGH_D, LOW_D, B = 10, 24, 3, 12


def _as_tensor(value) -> Optional[torch.Tensor]:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, bool):
        return torch.tensor(value)
    if isinstance(value, (int, float)):
        return torch.tensor(value, dtype=torch.float64)
    return None


def _batches(steps: int, dim: int, num_classes: int, seed: int, dtype=torch.float32):
    """A fixed embedding table and the labels of each step (one generator, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(B, dim, generator=g, dtype=torch.float64).to(dtype)
    labels = [torch.randint(0, num_classes, (B,), generator=g) for _ in range(steps)]
    # Every class present at least once in step 0 keeps miners busy.
    labels[0][:num_classes] = torch.arange(num_classes)[: min(B, num_classes)]
    return table, labels


def run_module(
    make_loss: Callable[[], torch.nn.Module],
    dim: int,
    steps: int,
    *,
    num_classes: int = C,
    miner=None,
    use_ref: bool = False,
    eval_mode: bool = False,
    dtype=torch.float32,
    attrs: Tuple[str, ...] = (),
    predict: bool = False,
) -> Record:
    """``steps`` SGD steps of a PML-style loss on a learnable embedding table."""
    torch.manual_seed(0)
    loss_fn = make_loss()
    if eval_mode:
        loss_fn.eval()
    table, labels = _batches(steps, dim, num_classes, seed=1, dtype=dtype)
    emb = torch.nn.Parameter(table)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    opt = torch.optim.SGD([emb, *params], lr=0.05, momentum=0.9)
    out: Record = {}
    for name in attrs:
        value = _as_tensor(getattr(loss_fn, name, None))
        if value is not None:
            out[f"attr.{name}"] = value
    names = [n for n, p in loss_fn.named_parameters() if p.requires_grad]
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        x = emb * 1.0
        y = labels[step]
        indices = miner(x, y) if miner is not None else None
        if use_ref:
            ref, ref_y = x[: B // 2] * 0.5, y[: B // 2]
            loss = loss_fn(x, y, indices, ref, ref_y)
        else:
            loss = loss_fn(x, y, indices)
        out[f"step{step}.loss"] = loss.detach().clone()
        if loss.requires_grad:
            loss.backward()
        out[f"step{step}.grad.emb"] = _grad(emb)
        for n, p in zip(names, params):
            out[f"step{step}.grad.{n}"] = _grad(p)
        for name in ("avg_angle", "avg_embedding_norm"):
            value = _as_tensor(getattr(loss_fn, name, None))
            if value is not None:
                out[f"step{step}.stat.{name}"] = value
        if hasattr(loss_fn, "get_logits"):
            with torch.no_grad():
                out[f"step{step}.logits"] = loss_fn.get_logits(x.detach()).clone()
        if predict:
            pred, cos = loss_fn.predict(x.detach(), k=3, return_scores=True)
            out[f"step{step}.predict.ids"], out[f"step{step}.predict.cos"] = pred, cos
        opt.step()
    for key, value in loss_fn.state_dict().items():
        out[f"state.{key}"] = value.detach().clone()
    out["final.emb"] = emb.detach().clone()
    return out


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.detach().clone() if p.grad is not None else torch.tensor(float("nan"))


def _miner():
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    return MultiSimilarityMiner(epsilon=0.5)


def _triplet_miner():
    from pytorch_metric_learning.miners import TripletMarginMiner

    return TripletMarginMiner(margin=0.5, type_of_triplets="all")


def _pair_miner():
    from pytorch_metric_learning.miners import PairMarginMiner

    return PairMarginMiner(pos_margin=0.8, neg_margin=0.2)


def _pml_kwargs(kind: str) -> dict:
    """Reducer / regularizer variants every proxy loss runs with."""
    from pytorch_metric_learning import reducers, regularizers

    if kind == "plain":
        return {}
    if kind == "reg":
        return {
            "weight_regularizer": regularizers.RegularFaceRegularizer(),
            "weight_reg_weight": 0.3,
            "embedding_regularizer": regularizers.LpRegularizer(),
            "embedding_reg_weight": 0.1,
        }
    if kind == "sum":
        return {"reducer": reducers.SumReducer()}
    if kind == "threshold":
        return {"reducer": reducers.ThresholdReducer(low=0.1)}
    raise ValueError(kind)


PROXY_ATTRS = ("m", "gamma", "margin", "scale", "momentum", "num_classes", "embedding_size")


def loss_cases() -> Dict[str, Callable[[int], Record]]:
    from pml_extras import losses as L

    cases: Dict[str, Callable[[int], Record]] = {}
    proxy = {
        "ArcFaceLoss": lambda d, **k: L.ArcFaceLoss(C, d, **k),
        "CosFaceLoss": lambda d, **k: L.CosFaceLoss(C, d, **k),
        "CurricularFaceLoss": lambda d, **k: L.CurricularFaceLoss(C, d, **k),
        "SparseCircleLoss": lambda d, **k: L.SparseCircleLoss(C, d, **k),
    }
    auto = {
        "ArcFaceLoss": {"margin": "auto", "scale": "auto"},
        "CosFaceLoss": {"scale": "auto"},
        "CurricularFaceLoss": {},
        "SparseCircleLoss": {},
    }
    for name, make in proxy.items():
        for kind in ("plain", "reg", "sum", "threshold"):
            for mined in (False, True):
                key = f"losses.{name}.{kind}{'.miner' if mined else ''}"
                cases[key] = _case(make, HIGH_D, _pml_kwargs(kind), mined)
        cases[f"losses.{name}.lowdim.auto"] = _case(make, LOW_D, auto[name], False)
        cases[f"losses.{name}.eval"] = _case(make, HIGH_D, {}, False, eval_mode=True)
        cases[f"losses.{name}.float64"] = _case(make, HIGH_D, {}, True, dtype=torch.float64)
        cases[f"losses.{name}.stats"] = _case(make, HIGH_D, {"collect_stats": True}, False)
    cases["losses.ArcFaceLoss.explicit"] = _case(
        proxy["ArcFaceLoss"], HIGH_D, {"margin": 20.0, "scale": 30.0}, False
    )
    cases["losses.SparseCircleLoss.explicit"] = _case(
        proxy["SparseCircleLoss"], LOW_D, {"m": 0.4, "gamma": 80.0}, False
    )
    cases["losses.CurricularFaceLoss.explicit"] = _case(
        proxy["CurricularFaceLoss"], LOW_D, {"margin": 0.5, "scale": 64.0, "momentum": 0.1}, False
    )
    for rule in ("gradient", "paper"):
        for mined in (False, True):
            key = f"losses.CenterLoss.{rule}{'.miner' if mined else ''}"
            cases[key] = _case(
                lambda d, r=rule, **k: L.CenterLoss(C, d, update_rule=r, alpha=0.3, **k),
                HIGH_D,
                {},
                mined,
            )
    cases["losses.CenterLoss.paper.eval"] = _case(
        lambda d, **k: L.CenterLoss(C, d, update_rule="paper", **k), HIGH_D, {}, False, True
    )
    for form in ("log", "log1p"):
        for variant in ("plain", "miner", "ref"):
            cases[f"losses.StandaloneCenterLoss.{form}.{variant}"] = _case(
                lambda d, f=form, **k: L.StandaloneCenterLoss(C, d, inter_form=f, **k),
                HIGH_D,
                {},
                variant == "miner",
                use_ref=variant == "ref",
                miner=_pair_miner,
            )
    circle = lambda d, **k: L.CircleLoss(**k)  # noqa: E731
    cases["losses.CircleLoss.default"] = _case(circle, HIGH_D, {}, False)
    cases["losses.CircleLoss.paper"] = _case(circle, HIGH_D, {"m": 0.25, "gamma": 256}, False)
    cases["losses.CircleLoss.pairs"] = _case(circle, HIGH_D, {}, True, miner=_pair_miner)
    cases["losses.CircleLoss.triplets"] = _case(circle, HIGH_D, {}, True, miner=_triplet_miner)
    cases["losses.CircleLoss.ref"] = _case(circle, HIGH_D, {}, False, use_ref=True)
    cases["losses.CircleLoss.float64"] = _case(circle, HIGH_D, {}, False, dtype=torch.float64)
    return cases


def _case(
    make, dim, kwargs, mined, eval_mode=False, dtype=torch.float32, use_ref=False, miner=None
):
    miner_factory = miner or _miner

    def run(steps: int) -> Record:
        return run_module(
            lambda: make(dim, **kwargs),
            dim,
            steps,
            miner=miner_factory() if mined else None,
            eval_mode=eval_mode,
            dtype=dtype,
            use_ref=use_ref,
            attrs=PROXY_ATTRS,
        )

    return run


def distributed_cases() -> Dict[str, Callable[[int], Record]]:
    from pml_extras import distributed as dist_
    from pml_extras import losses as L

    cases: Dict[str, Callable[[int], Record]] = {}
    sharded = {
        "ShardedSparseCircleLoss": (dist_.ShardedSparseCircleLoss, {"m": 0.25, "gamma": 256.0}),
        "ShardedCurricularFaceLoss": (
            dist_.ShardedCurricularFaceLoss,
            {"margin": 0.5, "scale": 64.0, "momentum": 0.01},
        ),
    }
    for name, (cls, paper) in sharded.items():
        for variant, extra in (
            ("default", {}),
            ("paper", paper),
            ("sampled", {"sample_rate": 0.5, "seed": 3}),
            ("init_seed", {"init_seed": 7}),
            ("reg", _pml_kwargs("reg")),
        ):
            cases[f"distributed.{name}.{variant}"] = _sharded_case(cls, HIGH_D, extra, False)
        cases[f"distributed.{name}.miner"] = _sharded_case(cls, HIGH_D, {}, True)
        # Low-dimensional with the papers' values given: the same in every version.
        cases[f"distributed.{name}.lowdim.paper"] = _sharded_case(cls, LOW_D, paper, False)
    for name, make in (
        ("SparseCircleLoss", lambda: L.SparseCircleLoss(C, HIGH_D)),
        ("CenterLoss", lambda: L.CenterLoss(C, HIGH_D)),
        ("CircleLoss", lambda: L.CircleLoss()),
    ):
        cases[f"distributed.DistributedLossWrapper.{name}"] = _wrapped_case(make)
    cases["distributed.clip_grad_norm_"] = _clip_case
    return cases


def _sharded_case(cls, dim, kwargs, mined):
    def run(steps: int) -> Record:
        out = run_module(
            lambda: cls(C, dim, **kwargs),
            dim,
            steps,
            miner=_miner() if mined else None,
            attrs=PROXY_ATTRS + ("class_start", "class_end", "sample_rate"),
            predict=True,
        )
        torch.manual_seed(0)
        loss_fn = cls(C, dim, **kwargs)
        out["gather_weight"] = loss_fn.gather_weight().clone()
        x = torch.randn(4, dim, generator=torch.Generator().manual_seed(5))
        out["shard_logits"] = loss_fn.shard_logits(x).detach().clone()
        return out

    return run


def _wrapped_case(make):
    from pml_extras.distributed import DistributedLossWrapper, DistributedMinerWrapper

    def run(steps: int) -> Record:
        miner = DistributedMinerWrapper(_miner())
        return run_module(
            lambda: DistributedLossWrapper(make()), HIGH_D, steps, miner=miner, attrs=()
        )

    return run


def _clip_case(steps: int) -> Record:
    from pml_extras.distributed import clip_grad_norm_

    g = torch.Generator().manual_seed(9)
    out: Record = {}
    for norm_type in (2.0, 1.0, math.inf):
        a = torch.nn.Parameter(torch.zeros(5, 3))
        b = torch.nn.Parameter(torch.zeros(7))
        a.grad = torch.randn(5, 3, generator=g)
        b.grad = torch.randn(7, generator=g)
        total = clip_grad_norm_([a], 0.5, norm_type, sharded=[b])
        out[f"p{norm_type}.total"] = total.detach().clone()
        out[f"p{norm_type}.a"], out[f"p{norm_type}.b"] = a.grad.clone(), b.grad.clone()
    return out


def functional_cases() -> Dict[str, Callable[[int], Record]]:
    from pml_extras import functional as F

    def inputs(dtype=torch.float32, dim=HIGH_D):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(B, dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        w = torch.randn(dim, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        y = torch.randint(0, C, (B,), generator=g)
        v = torch.rand(B, generator=g, dtype=torch.float64)
        return x, w, y, v

    def proxy(fn, **kw):
        def run(steps: int) -> Record:
            out: Record = {}
            for dtype in (torch.float32, torch.float64):
                x, w, y, v = inputs(dtype)
                losses = fn(x, w, y, **kw)
                (losses * v.to(losses.dtype)).sum().backward()
                tag = str(dtype).split(".")[-1]
                out[f"{tag}.losses"] = losses.detach().clone()
                out[f"{tag}.grad.x"], out[f"{tag}.grad.w"] = x.grad.clone(), w.grad.clone()
            return out

        return run

    cases = {
        "functional.arcface_loss": proxy(F.arcface_loss),
        "functional.arcface_loss.explicit": proxy(F.arcface_loss, margin_rad=0.3, scale=30.0),
        "functional.cosface_loss": proxy(F.cosface_loss),
        "functional.cosface_loss.explicit": proxy(F.cosface_loss, margin=0.2, scale=16.0),
        "functional.sparse_circle_loss": proxy(F.sparse_circle_loss),
        "functional.sparse_circle_loss.explicit": proxy(F.sparse_circle_loss, m=0.4, gamma=80),
        "functional.curricular_face_loss": proxy(F.curricular_face_loss, t=0.3),
        "functional.curricular_face_loss.t0": proxy(F.curricular_face_loss, t=0.0, margin=0.2),
    }

    def elementwise(steps: int) -> Record:
        c = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64)
        out: Record = {}
        for dtype in (torch.float32, torch.float64):
            tag = str(dtype).split(".")[-1]
            cos = c.to(dtype).requires_grad_()
            parts = {
                "arcface_target": F.arcface_target(cos, 0.5),
                "cosface_target": F.cosface_target(cos, 0.35),
                "circle_target_logit": F.circle_target_logit(cos, 0.25, 256.0),
                "curricular_target.0": F.curricular_target(cos, 0.5)[0],
                "curricular_target.1": F.curricular_target(cos, 0.5)[1],
            }
            for name, value in parts.items():
                (grad,) = torch.autograd.grad(value.sum(), cos)
                out[f"{tag}.{name}"], out[f"{tag}.{name}.grad"] = value.detach(), grad
        out["update_t"] = F.update_t(torch.zeros(1), c[:7].float(), 0.01)
        out["update_t.empty"] = F.update_t(torch.ones(1), torch.empty(0), 0.01)
        return out

    def class_circle(steps: int) -> Record:
        g = torch.Generator().manual_seed(4)
        out: Record = {}
        sims = (torch.rand(B, C, generator=g, dtype=torch.float64) * 2 - 1).float()
        y = torch.randint(0, C, (B,), generator=g)
        multi = (torch.rand(B, C, generator=g) < 0.3).float()
        for tag, targets in (("int", y), ("multi", multi)):
            s = sims.clone().requires_grad_()
            losses = F.class_circle_loss(s, targets, m=0.25, gamma=64.0)
            losses.sum().backward()
            out[f"{tag}.losses"], out[f"{tag}.grad"] = losses.detach(), s.grad.clone()
        return out

    def center(steps: int) -> Record:
        g = torch.Generator().manual_seed(6)
        out: Record = {}
        x = torch.randn(B, HIGH_D, generator=g).requires_grad_()
        centers = torch.randn(C, HIGH_D, generator=g).requires_grad_()
        y = torch.randint(0, C, (B,), generator=g)
        for p, power, norm in ((2.0, 2.0, False), (2.0, 1.0, False), (1.0, 1.0, True)):
            tag = f"p{p}.pow{power}.norm{norm}"
            kw = {"p": p, "power": power, "normalize_embeddings": norm}
            d = F.center_distances(x, centers, y, **kw)
            loss = F.center_loss(x, centers, y, **kw)
            gx, gc = torch.autograd.grad(d.sum() + loss.sum(), (x, centers))
            out[f"{tag}.distances"], out[f"{tag}.loss"] = d.detach(), loss.detach()
            out[f"{tag}.grad.x"], out[f"{tag}.grad.c"] = gx, gc
        out["center_update"] = F.center_update(centers.detach(), x.detach(), y, 0.5)
        pairs = (torch.tensor([0, 0, 1, 3, 3]), torch.tensor([2, 2, 5, 4, 1]))
        for form in ("log", "log1p"):
            for variant, kw in (
                ("all", {}),
                ("pairs", {"negative_pairs": pairs}),
                ("ref", {"ref_emb": x[:6] * 0.5, "ref_labels": y[:6]}),
            ):
                intra, inter = F.standalone_center_loss(x, centers, y, inter_form=form, **kw)
                gx, gc = torch.autograd.grad(intra.sum() + inter.sum(), (x, centers))
                tag = f"standalone.{form}.{variant}"
                out[f"{tag}.intra"], out[f"{tag}.inter"] = intra.detach(), inter.detach()
                out[f"{tag}.grad.x"], out[f"{tag}.grad.c"] = gx, gc
        return out

    cases["functional.targets"] = elementwise
    cases["functional.class_circle_loss"] = class_circle
    cases["functional.center"] = center
    return cases


def all_cases() -> Dict[str, Callable[[int], Record]]:
    cases = {}
    cases.update(loss_cases())
    cases.update(functional_cases())
    cases.update(distributed_cases())
    return cases


def snapshot(only: Optional[List[str]] = None, steps: int = 3) -> Dict[str, torch.Tensor]:
    """Run the cases whose name contains one of ``only`` (all by default)."""
    flat: Dict[str, torch.Tensor] = {}
    for name, run in all_cases().items():
        if only and not any(part in name for part in only):
            continue
        with torch.random.fork_rng(devices=[]):
            for key, value in run(steps).items():
                flat[f"{name}/{key}"] = value
    return flat


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        if not torch.equal(nan_a, nan_b):
            return False
        return torch.equal(a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0))
    return torch.equal(a, b)


def compare(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> List[str]:
    """One line per difference between two snapshots (empty: bit-identical)."""
    lines = []
    for key in sorted(set(before) - set(after)):
        lines.append(f"missing in the second file: {key}")
    for key in sorted(set(after) - set(before)):
        lines.append(f"new in the second file: {key}")
    for key in sorted(set(before) & set(after)):
        a, b = before[key], after[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            lines.append(f"{key}: {a.dtype}{tuple(a.shape)} became {b.dtype}{tuple(b.shape)}")
        elif not _same(a, b):
            diff = (a.double() - b.double()).abs()
            worst = float(diff[torch.isfinite(diff)].max()) if torch.isfinite(diff).any() else 0
            count = int((a != b).sum())
            lines.append(f"{key}: {count} of {a.numel()} values differ (max |diff| {worst:.3g})")
    return lines


def digest(flat: Dict[str, torch.Tensor]) -> str:
    """sha256 over the keys and the raw bytes of every tensor, in key order."""
    h = hashlib.sha256()
    for key in sorted(flat):
        t = flat[key].detach().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot", help="run every case and save the results")
    snap.add_argument("out")
    snap.add_argument("--only", nargs="*", help="case-name substrings to keep")
    snap.add_argument("--steps", type=int, default=3)
    cmp_ = sub.add_parser("compare", help="compare two snapshot files bit for bit")
    cmp_.add_argument("before")
    cmp_.add_argument("after")
    sub.add_parser("list", help="print the case names")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(all_cases()))
        return 0
    if args.command == "snapshot":
        flat = snapshot(args.only, args.steps)
        torch.save(flat, args.out)
        print(f"{len(flat)} tensors, sha256 {digest(flat)} -> {args.out}")
        return 0
    before = torch.load(args.before, weights_only=True)
    after = torch.load(args.after, weights_only=True)
    lines = compare(before, after)
    for line in lines:
        print(line)
    cases = len({k.split("/")[0] for k in before})
    if lines:
        print(f"DIFFERENT: {len(lines)} difference(s)")
        return 1
    print(f"IDENTICAL: {len(before)} tensors in {cases} cases, bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
