"""``--tune N``: an equal hyperparameter budget per loss on the class-disjoint validation
folds (the reality check's protocol), searched by optuna's TPE sampler (seeded).

Each trial trains one model per fold (``--folds``) on that fold's training classes and
scores MAP@R on its held-out classes; the objective is the mean over the folds. Only
``protocol.train`` is used: the test classes are untouched until the final runs, which use
the best trial's values. With ``--seeds`` the search runs once per seed, on that seed's
training classes (the class partition changes with the seed where it is drawn, and a value
chosen on classes that are another seed's test classes would leak).

The search space (:data:`SEARCH_SPACE`) is a table of (argument, low, high, log scale):
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from .folds import class_folds, validation_protocol

__all__ = ["SEARCH_SPACE", "search_space_table", "tune"]

# loss -> [(argument, low, high, log)]; "miner.KEY" goes to the loss's miner. Ranges cover
# each paper's value and the reality check's searched region (Musgrave et al., Table 5).
SEARCH_SPACE: Dict[str, List[Tuple[str, float, float, bool]]] = {
    "SparseCircleLoss": [("m", 0.0, 0.6, False), ("gamma", 8.0, 512.0, True)],
    "CircleLoss": [("m", 0.0, 0.6, False), ("gamma", 8.0, 512.0, True)],
    "CurricularFaceLoss": [("margin", 0.0, 0.8, False), ("scale", 4.0, 128.0, True)],
    "ArcFaceLoss": [("margin", 0.0, 60.0, False), ("scale", 4.0, 128.0, True)],
    "CosFaceLoss": [("margin", 0.0, 0.8, False), ("scale", 4.0, 128.0, True)],
    "MultiSimilarityLoss": [
        ("alpha", 0.1, 20.0, True),
        ("beta", 1.0, 100.0, True),
        ("base", 0.0, 1.0, False),
        ("miner.epsilon", 0.0, 0.5, False),
    ],
    "TripletMarginLoss": [("margin", 0.01, 1.0, True), ("miner.margin", 0.01, 1.0, True)],
    "CenterLoss+Softmax": [("weight_cent", 1e-4, 1.0, True)],
    "StandaloneCenterLoss": [("inter_weight", 1e-3, 1.0, True)],
    "Softmax": [],  # nothing to tune: its final runs use no trials
}


def search_space_table() -> str:
    """The search space as Markdown (for the docs)."""
    lines = ["| Loss | Argument | Range | Scale |", "|---|---|---|---|"]
    for loss, space in SEARCH_SPACE.items():
        if not space:
            lines.append(f"| {loss} | — | — | — |")
        for key, lo, hi, log in space:
            lines.append(f"| {loss} | `{key}` | [{lo:g}, {hi:g}] | {'log' if log else 'linear'} |")
    return "\n".join(lines)


def _overrides(base: Optional[dict], values: Dict[str, float], name: str) -> dict:
    from .losses import LOSSES

    out = {k: dict(v) for k, v in (base or {"loss": {}, "miner": {}, "extras": {}}).items()}
    for key in ("loss", "miner", "extras"):
        out.setdefault(key, {})
    extras = LOSSES[name].extras
    for key, v in values.items():
        if key.startswith("miner."):
            out["miner"][key[len("miner.") :]] = v
        elif key in extras:
            out["extras"][key] = v
        else:
            out["loss"][key] = v
    return out


def tune(
    name: str,
    protocol,
    args,
    train_one,
    seed: int,
    trials: int,
    folds: int,
    base_overrides: Optional[dict] = None,
) -> Tuple[Optional[dict], List[dict]]:
    """Search ``name``'s space with ``trials`` optuna trials on ``folds`` validation folds of
    ``protocol.train``; ``train_one(validation_protocol, overrides) -> result``. Returns
    (the best overrides or None when the loss has nothing to tune, the trials' records)."""
    space = SEARCH_SPACE.get(name, [])
    if not space or trials < 1:
        return None, []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fold_list = class_folds(protocol.num_classes, folds, seed)
    val = [validation_protocol(protocol, f, i) for i, f in enumerate(fold_list)]
    records: List[dict] = []

    def objective(trial) -> float:
        values = {}
        for key, lo, hi, log in space:
            values[key] = trial.suggest_float(key, lo, hi, log=log)
        ov = _overrides(base_overrides, values, name)
        scores = []
        for vp in val:
            res = train_one(vp, ov)
            m = res["metrics"].get("mean_average_precision_at_r")
            scores.append(0.0 if m is None or not math.isfinite(m) else float(m))
        score = sum(scores) / len(scores)
        records.append({"trial": trial.number, "values": values, "fold_scores": scores})
        return score

    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=int(seed))
    )
    study.optimize(objective, n_trials=int(trials))
    best = study.best_trial
    for r in records:
        r["best"] = r["trial"] == best.number
    return _overrides(base_overrides, dict(best.params), name), records
