"""Low-dimensional embeddings: the retrieval benchmark with our class losses at their defaults.

The retrieval benchmark builds SparseCircleLoss / CurricularFaceLoss with fixed values (its
"where each default comes from" table). This thin driver runs today's benchmark
(``benchmarks/retrieval.py``: same models, sampler, optimiser, schedule, metrics) in the
closed set (``--split samples`` unless given) and registers, next to its losses:

- ``SparseCircleLoss`` / ``CurricularFaceLoss``: ``Loss(C, D)``, default arguments (the
  low-dimensional rule: scale/gamma and m "auto", the rule's proxy init);
- ``SparseCircleLoss(paper)`` / ``CurricularFaceLoss(paper)``: the papers' values and PML's
  normal_ init, i.e. the defaults before the rule (the issue's "today's defaults");
- ``ArcFaceLoss(ours-auto)`` / ``CosFaceLoss(ours-auto)``: our ArcFace/CosFace with the
  rule as the option (``scale="auto"``, ``weight_init_func=auto_proxy_init_``).

The benchmark's own ``ArcFaceLoss`` / ``CosFaceLoss`` are PML's, with scale 64.

    python benchmarks/results/lowdim/run.py --dataset digits --embedding-dim 3 --seed 0 \\
        --losses SparseCircleLoss,CurricularFaceLoss,Softmax --out /tmp/x --threads 1

Every other option is the benchmark's (``--help``). ``aggregate.py`` makes the tables.

The runs and tables committed in this folder were made by this driver with the package and
the benchmark of commit 47171cf (each results.json records its commit). The tables before
that rerun (the benchmark as of 84402be, which an earlier version of this driver imported
through ``git show``) are ``summary_before_rerun.json``; ``compare.py`` sets the two side
by side (``rerun.md``). Today's benchmark draws its batches from per-(seed, epoch)
generators, so a seed's numbers differ from the old run's; the means agree within twice
the larger std.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
BENCH = os.path.join(REPO, "benchmarks")


class _Losses(dict):
    """``R.LOSSES[name] = (source, build, aliases)`` registers a loss built by
    ``build(num_classes, embedding_dim) -> Method`` in today's benchmark."""

    def __init__(self, specs, spec_cls):
        super().__init__()
        self._specs, self._spec_cls = specs, spec_cls

    def __setitem__(self, name, value):
        source, build, aliases = value
        self._specs[name] = self._spec_cls(source, "custom", tuple(aliases), builder=build)
        super().__setitem__(name, value)


def load_benchmark():
    """Today's benchmark (benchmarks/retrieval.py) behind the small interface the lowdim
    drivers use: ``Method``, ``_logits_of``, ``LOSSES``, ``main``, ``plot_results``."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import retrieval
    from retrieval_bench import losses as bl
    from retrieval_bench.plots import plot_results

    return SimpleNamespace(
        Method=bl.Method,
        _logits_of=lambda loss: loss.get_logits,
        LOSSES=_Losses(bl.LOSSES, bl.LossSpec),
        main=retrieval.main,
        plot_results=plot_results,
    )


def closed_set(argv):
    """The lowdim studies are closed-set (accuracy from the logits): ``--split samples``
    unless the command line says otherwise."""
    argv = list(argv)
    return argv if "--split" in argv else argv + ["--split", "samples"]


def method_of(R, loss, **hp):
    """The benchmark's Method for a class loss scored by its own logits; its hparams are
    the loss's margin/scale attributes that exist, plus ``hp``."""
    shown = {k: getattr(loss, k) for k in ("m", "gamma", "margin", "scale") if hasattr(loss, k)}
    return R.Method(loss, classifiers={"acc": R._logits_of(loss)}, hparams={**shown, **hp})


def register(R) -> None:
    import torch
    from pytorch_metric_learning.utils import common_functions as c_f

    from pml_extras import losses as ours

    normal = c_f.TorchInitWrapper(torch.nn.init.normal_)

    def method(loss, **hp):
        return method_of(R, loss, **hp)

    builders = {
        "SparseCircleLoss": lambda c, d: method(ours.SparseCircleLoss(c, d), init="auto"),
        "CurricularFaceLoss": lambda c, d: method(ours.CurricularFaceLoss(c, d), init="auto"),
        "SparseCircleLoss(paper)": lambda c, d: method(
            ours.SparseCircleLoss(c, d, m=0.25, gamma=256.0, weight_init_func=normal),
            init="normal_",
        ),
        "CurricularFaceLoss(paper)": lambda c, d: method(
            ours.CurricularFaceLoss(c, d, margin=0.5, scale=64.0, weight_init_func=normal),
            init="normal_",
        ),
        "ArcFaceLoss(ours-auto)": lambda c, d: method(
            ours.ArcFaceLoss(c, d, scale="auto", weight_init_func=ours.auto_proxy_init_),
            init="auto",
        ),
        "CosFaceLoss(ours-auto)": lambda c, d: method(
            ours.CosFaceLoss(c, d, scale="auto", weight_init_func=ours.auto_proxy_init_),
            init="auto",
        ),
    }
    for name, build in builders.items():
        R.LOSSES[name] = ("ours", build, ())


def plot(R, out: str) -> None:
    """The benchmark's PNGs from ``out``'s results.json (+ embeddings_test.npz)."""
    R.plot_results(out)


def git_head() -> str:
    out = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip()


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    R = load_benchmark()
    register(R)
    if "--plot-only" in argv:
        plot(R, argv[argv.index("--plot-only") + 1])
        return {}
    argv = closed_set(argv)
    plots = "--no-plots" not in argv
    results = R.main(argv + ([] if not plots else ["--no-plots"]))
    if results:
        import pml_extras

        results["lowdim"] = {
            "driver": "benchmarks/results/lowdim/run.py",
            "command": "python benchmarks/results/lowdim/run.py " + " ".join(argv),
            "repo_head": git_head(),
            "pml_extras_path": os.path.dirname(pml_extras.__file__),
        }
        out = argv[argv.index("--out") + 1]
        with open(os.path.join(out, "results.json")) as f:
            saved = json.load(f)
        saved["lowdim"] = results["lowdim"]
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(saved, f, indent=1, default=str)
        if plots:
            plot(R, out)
    return results


if __name__ == "__main__":
    main()
