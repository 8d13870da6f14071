"""The digits sweep that chose the rule (sweeps.md): scale x init x margin variants.

    python benchmarks/results/lowdim/sweep.py --embedding-dim 3 --seed 0 --out /tmp/sw \\
        --threads 1 --losses Softmax,sc_normal_ada_0.46,cf_spread_ada

Variant names: ``sc_<init>_<gamma>_<m>`` (SparseCircleLoss), ``cf_<init>_<scale>``
(CurricularFaceLoss); init ``normal`` (PML's normal_) or ``spread`` (spread_init_),
``ada`` = AdaCos's sqrt(2)*ln(C-1). ``scA``/``cfA``: default arguments (the rule);
``scA_<m>``: the rule with that m; ``scF``/``scF_<m>``: the rule with the proxies frozen;
``cfA_m<margin>[_s<scale>]``: CurricularFace, the rule with that margin (and scale).
The names above mean the defaults of the code they run with (sweeps.md says which).

Sweep E (Fashion-MNIST 2-D, the proxies' length and order) names every argument, so it
means the same with any version: ``cfE_<init>[_m<margin>][_frozen]`` CurricularFace and
``scE_<init>`` SparseCircle at the AdaCos scale, Circle m=0.5, CurricularFace margin 0.5
unless ``_mhalf`` (theta*/2 = pi/10 in 2-D). Inits: ``spreadG`` spread directions with
``normal_`` lengths (the rule before the short proxies), ``spreadL<len>`` spread
directions of length len (``spreadL0.05`` is the rule's), ``gaussL0.05`` Gaussian
directions of length 0.05, ``order`` the regular decagon in the angular order of the
classes of a trained softmax (Fashion-MNIST 2-D, seed 0: 9 8 4 2 6 0 1 3 7 5; an
oracle, for diagnosis only) with length sqrt(2). ``afE_auto``: our ArcFace with
``margin="auto", scale="auto"`` and the rule's init.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def register(R) -> None:
    import torch
    from pytorch_metric_learning.utils import common_functions as c_f

    from pml_extras import losses as ours
    from pml_extras.losses._low_dim import adacos_scale

    normal = c_f.TorchInitWrapper(torch.nn.init.normal_)
    classes = {"sc": ours.SparseCircleLoss, "cf": ours.CurricularFaceLoss}

    def variant(kind, init=None, freeze=False, **hp):
        def build(c, d):
            h = {k: adacos_scale(c) if v == "ada" else v for k, v in hp.items()}
            if init is not None:
                h["weight_init_func"] = ours.spread_init_ if init == "spread" else normal
            loss = classes[kind](c, d, **h)
            if freeze:
                loss.W.requires_grad_(False)
            shown = {k: getattr(loss, k) for k in ("m", "gamma", "scale") if hasattr(loss, k)}
            return R.Method(
                loss,
                classifiers={"acc": R._logits_of(loss)},
                hparams={**shown, "init": init or "auto", "frozen": freeze},
            )

        return build

    v = {}
    for init in ("normal", "spread"):
        for g in (256, "ada"):
            for m in (0.25, 0.35, 0.46, 0.6):
                v[f"sc_{init}_{g}_{m}"] = variant("sc", init, gamma=g, m=m)
        for s in (64, "ada"):
            v[f"cf_{init}_{s}"] = variant("cf", init, scale=s)
    v["scA"], v["cfA"] = variant("sc"), variant("cf")
    for m in (0.46, 0.6, 0.81):
        v[f"scA_{m}"] = variant("sc", m=m)
    v["scF"], v["scF_0.35"] = variant("sc", freeze=True), variant("sc", freeze=True, m=0.35)
    for margin in (0.2, 0.314):
        v[f"cfA_m{margin}"] = variant("cf", margin=margin)
    v["cfA_m0.314_s6.2"] = variant("cf", margin=0.314, scale=6.2)
    register_sweep_e(R, v)
    for name, build in v.items():
        R.LOSSES[name] = ("ours", build, ())


def register_sweep_e(R, v: dict) -> None:
    import torch

    from pml_extras import losses as ours
    from pml_extras.losses._low_dim import adacos_scale

    order = (9, 8, 4, 2, 6, 0, 1, 3, 7, 5)

    def init_of(name):
        @torch.no_grad()
        def init(w):
            d, c = w.shape
            if name == "spreadG":
                return ours.spread_init_(w)
            if name.startswith("spreadL"):
                return ours.spread_init_(w, length=float(name[len("spreadL") :]))
            if name.startswith("gaussL"):
                torch.nn.init.normal_(w)
                return w.mul_(float(name[len("gaussL") :]) / w.norm(dim=0, keepdim=True))
            assert name == "order" and d == 2 and c == len(order), "the oracle is 10 classes, 2-D"
            angle = torch.empty(c, dtype=torch.float64)
            for position, k in enumerate(order):
                angle[k] = 2 * math.pi * position / c
            return w.copy_(math.sqrt(2) * torch.stack([angle.cos(), angle.sin()]).to(w.dtype))

        return init

    def build(kind, init, half=False, frozen=False):
        def make(c, d):
            if kind == "cf":
                margin = 0.5 if not half else min(0.5, math.pi / c)
                loss = ours.CurricularFaceLoss(
                    c, d, margin=margin, scale=adacos_scale(c), weight_init_func=init_of(init)
                )
            else:
                loss = ours.SparseCircleLoss(
                    c, d, m=0.5, gamma=adacos_scale(c), weight_init_func=init_of(init)
                )
            loss.W.requires_grad_(not frozen)
            return run.method_of(R, loss, init=init, frozen=frozen)

        return make

    inits = ("spreadG", "spreadL0.02", "spreadL0.05", "spreadL0.2", "gaussL0.05", "order")
    for init in inits:
        v[f"cfE_{init}"] = build("cf", init)
    v["cfE_spreadG_frozen"] = build("cf", "spreadG", frozen=True)
    v["cfE_order_frozen"] = build("cf", "order", frozen=True)
    v["cfE_spreadG_mhalf"] = build("cf", "spreadG", half=True)
    v["cfE_spreadL0.05_mhalf"] = build("cf", "spreadL0.05", half=True)
    v["scE_spreadG"] = build("sc", "spreadG")
    v["scE_spreadL0.05"] = build("sc", "spreadL0.05")

    def arcface(c, d):
        loss = ours.ArcFaceLoss(
            c, d, margin="auto", scale="auto", weight_init_func=ours.auto_proxy_init_
        )
        return run.method_of(R, loss, init="auto")

    v["afE_auto"] = arcface


if __name__ == "__main__":
    R = run.load_benchmark()
    register(R)
    R.main(run.closed_set(sys.argv[1:]))
