"""The digits sweep that chose the rule (sweeps.md): scale x init x margin variants.

    python benchmarks/results/lowdim/sweep.py --embedding-dim 3 --seed 0 --out /tmp/sw \\
        --threads 1 --losses Softmax,sc_normal_ada_0.46,cf_spread_ada

Variant names: ``sc_<init>_<gamma>_<m>`` (SparseCircleLoss), ``cf_<init>_<scale>``
(CurricularFaceLoss); init ``normal`` (PML's normal_) or ``spread`` (spread_init_),
``ada`` = AdaCos's sqrt(2)*ln(C-1). ``scA``/``cfA``: default arguments (the rule);
``scA_<m>``: the rule with that m; ``scF``/``scF_<m>``: the rule with the proxies frozen;
``cfA_m<margin>[_s<scale>]``: CurricularFace, the rule with that margin (and scale).
"""

from __future__ import annotations

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
    for name, build in v.items():
        R.LOSSES[name] = ("ours", build, ())


if __name__ == "__main__":
    R = run.load_benchmark()
    register(R)
    R.main(sys.argv[1:])
