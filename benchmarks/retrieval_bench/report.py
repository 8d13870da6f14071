"""Aggregating runs over seeds and writing the Markdown tables.

``results["losses"]`` holds one entry per (split, loss, seed). :func:`aggregate` gives one
entry per (split, loss) with mean, std (sample standard deviation, ddof=1) and n of each
metric over the seeds that finished; :func:`results_table` prints mean +- std when there
is more than one seed.
"""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

from .evaluation import METRICS

__all__ = ["aggregate", "results_table", "fmt", "fmt_stat"]

COLUMNS = (*METRICS, "acc", "center_acc")


def fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def fmt_stat(s) -> str:
    if not s:
        return "—"
    if s["n"] == 1:
        return fmt(s["mean"])
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def aggregate(runs: List[dict]) -> List[dict]:
    """One summary per (split, loss), in first-seen order."""
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        groups.setdefault((r.get("split", "samples"), r["loss"]), []).append(r)
    out = []
    for (split, loss), rs in groups.items():
        ok = [r for r in rs if r["metrics"]]
        stats = {}
        for k in COLUMNS:
            vals = [r["metrics"][k] for r in ok if k in r["metrics"]]
            if vals:
                a = np.asarray(vals, dtype=np.float64)
                stats[k] = {
                    "mean": float(a.mean()),
                    "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                    "n": len(a),
                    "values": [float(v) for v in a],
                }
        out.append(
            {
                "split": split,
                "loss": loss,
                "source": rs[0]["source"],
                "seeds": [r.get("seed") for r in rs],
                "n_runs": len(rs),
                "n_ok": len(ok),
                "n_diverged": sum(1 for r in rs if r.get("diverged")),
                "n_errors": sum(1 for r in rs if r.get("error")),
                "errors": [r["error"] for r in rs if r.get("error")],
                "diverged": [r["diverged"] for r in rs if r.get("diverged")],
                "stats": stats,
                "train_s_mean": float(np.mean([r["timings_s"].get("train", 0.0) for r in rs])),
            }
        )
    return out


def _status(s: dict) -> str:
    if s["n_errors"]:
        return f"error: {s['errors'][0]}"
    if s["n_diverged"]:
        d = s["diverged"][0]
        where = f"epoch {d['epoch']}, non-finite {d['what']}"
        if s["n_runs"] == 1:
            return f"diverged ({where})"
        return f"diverged in {s['n_diverged']}/{s['n_runs']} seeds ({where})"
    return "ok"


def split_table(results: dict, split: str) -> str:
    cfg = results["config"]
    proto = results["protocols"][split]
    seeds = results["seeds"]
    summary = [s for s in results["summary"] if s["split"] == split]
    seed_txt = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {','.join(map(str, seeds))}"
    lines = [
        f"### Protocol `--split {split}`: {proto['description']}",
        "",
        f"Dataset **{cfg['dataset']}** ({proto['n_train']} train / {proto['n_test']} test "
        f"images, {proto['num_classes']} training classes, {proto['num_test_classes']} test "
        f"classes), model `{cfg['model']}`, embedding dim {cfg['embedding_dim']}, "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, lr {cfg['lr']} (loss params "
        f"{cfg['loss_lr']}), {seed_txt}, device {results['device_name']}"
        + (f", AMP {cfg['amp']}" if cfg.get("amp") else "")
        + f", k-NN `{results['knn_backend']}`.",
        "",
    ]
    cols = list(METRICS)
    head = "| Loss | Source | P@1 | R-Prec | MAP@R |"
    if proto["split"] == "samples":
        cols += ["acc", "center_acc"]
        head += " Acc (logits) | Acc (nearest center) |"
    lines += [
        head + " Train s | Status |",
        "|---|---|" + "---:|" * len(cols) + "---:|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['loss']} | {s['source']} | "
            + " | ".join(fmt_stat(s["stats"].get(k)) for k in cols)
            + f" | {s['train_s_mean']:.1f} | {_status(s)} |"
        )
    notes = (
        "P@1 / R-Prec / MAP@R: pytorch-metric-learning AccuracyCalculator, k=max_bin_count, "
        "test images against each other (leave-one-out); L2-normalised embeddings for losses "
        "that normalise (all but Softmax and the center losses)."
    )
    if proto["split"] == "samples":
        notes += (
            " Acc (logits): argmax of the loss's get_logits or of the linear classifier; Acc "
            "(nearest center): argmax of the center loss's get_logits (= -distance to the "
            "centers)."
        )
    else:
        notes += (
            " No classification accuracy: the test classes were never trained (proxies and "
            "centers exist for the training classes only)."
        )
    if len(seeds) > 1:
        notes += f" mean ± std (sample std) over {len(seeds)} seeds; Train s: mean per run."
    lines += ["", notes]
    return "\n".join(lines)


def results_table(results: dict) -> str:
    """The Markdown of results.md: one table per protocol that ran."""
    parts = [split_table(results, split) for split in results["splits"]]
    if results.get("loss_args"):
        parts.append(
            "Loss arguments (--loss-args): "
            + "; ".join(
                f"{name}: " + ", ".join(f"{k}={v!r}" for k, v in kw.items())
                for name, kw in results["loss_args_flat"].items()
            )
        )
    return "\n\n".join(parts)
