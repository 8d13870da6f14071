"""Figures made from a finished run's files (``results.json`` + ``embeddings_test.npz``), so
they can be remade with ``--plot-only DIR`` without training.

* ``loss_curves.png``: training loss per step and per epoch, one panel per loss (and
  protocol), one line per seed.
* ``metrics.png``: P@1, R-Precision and MAP@R per loss and baseline: every seed as a dot,
  mean +- std as a bar, one colour per protocol (the spread over seeds), the best baseline
  as a dashed line; a loss that does not beat it (same-seed difference resolved above 0) is
  labelled "(not above baseline)" in red.
* ``embeddings.png`` (``embeddings_<split>.png`` with both protocols): for 2-D / 3-D
  embeddings, the first seed's L2-normalised test embeddings coloured by class.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import List

import numpy as np

from .evaluation import METRIC_SHORT, METRICS
from .report import fmt

__all__ = ["plot_results", "safe_name", "embedding_key", "labels_key"]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name)


def embedding_key(split: str, loss: str, n_splits: int) -> str:
    """npz key of the first seed's test embeddings (one protocol: ``emb_<loss>``)."""
    return "emb_" + (f"{split}_" if n_splits > 1 else "") + safe_name(loss)


def labels_key(split: str, n_splits: int) -> str:
    return "labels" + (f"_{split}" if n_splits > 1 else "")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(results: dict) -> str:
    cfg = results["config"]
    seeds = results.get("seeds") or [results.get("seed")]
    s = f", {len(seeds)} seeds" if len(seeds) > 1 else ""
    return f"{cfg['dataset']}, {cfg['embedding_dim']}-D, {cfg['epochs']} epochs{s}"


def _loss_curves(plt, results: dict, out_dir: str) -> List[str]:
    splits = results.get("splits") or ["samples"]
    groups: dict = {}
    for r in results["losses"]:
        if r.get("step_losses"):
            groups.setdefault((r.get("split", "samples"), r["loss"]), []).append(r)
    if not groups:
        return []
    n = len(groups)
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, ((split, loss), rs) in zip(axes.flat, groups.items()):
        for i, r in enumerate(rs):
            y = np.asarray(r["step_losses"], dtype=float)
            x = np.linspace(0, max(r["epochs_completed"], 1e-9), num=len(y), endpoint=True)
            lab = "step" if i == 0 else None
            ax.plot(x, y, lw=0.6, alpha=0.4, color=f"C{i % 10}", label=lab)
            if r["epoch_losses"]:
                ex = np.arange(1, len(r["epoch_losses"]) + 1)
                lab = f"epoch mean, seed {r.get('seed')}" if len(rs) > 1 else "epoch mean"
                ax.plot(ex, r["epoch_losses"], "o-", ms=3, color=f"C{i % 10}", label=lab)
            if r["diverged"]:
                ax.axvline(r["diverged"]["epoch"], color="k", ls="--", lw=0.8)
        bad = any(r["diverged"] for r in rs)
        title = loss + (f" [{split}]" if len(splits) > 1 else "") + (" (diverged)" if bad else "")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"Training loss — {_title(results)}", fontsize=10)
    fig.tight_layout()
    p = os.path.join(out_dir, "loss_curves.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def _labels(results: dict, summary: List[dict]) -> dict:
    """Tick label per loss: marked where it does not beat the best baseline (per split)."""
    from .report import best_baseline, rank, verdict

    out = {}
    bsummary = results.get("baseline_summary") or []
    for split in results.get("splits") or ["samples"]:
        best = best_baseline(bsummary, split)
        if best is None:
            continue
        diffs = rank(results, split, best)["differences"]
        for s in summary:
            if s["split"] != split or s.get("source") == "baseline":
                continue
            v = verdict(diffs.get(s["loss"]))
            if v != "beats" and not v.startswith("above"):
                out[s["loss"]] = f"{s['loss']} (not above baseline)"
    return out


def _metrics_spread(plt, results: dict, out_dir: str) -> List[str]:
    summary = [s for s in results.get("baseline_summary", []) if s["stats"]]
    summary += [s for s in results.get("summary", []) if s["stats"]]
    if not summary:
        return []
    splits = [s for s in results.get("splits") or ["samples"]]
    losses = list(dict.fromkeys(s["loss"] for s in summary))
    marked = _labels(results, summary)
    fig, axes = plt.subplots(
        1, len(METRICS), figsize=(4.2 * len(METRICS), 0.42 * len(losses) + 1.6), sharey=True
    )
    offsets = np.linspace(-0.18, 0.18, len(splits)) if len(splits) > 1 else [0.0]
    for ax, metric in zip(np.atleast_1d(axes), METRICS):
        for si, split in enumerate(splits):
            color = f"C{si}"
            for s in summary:
                if s["split"] != split or metric not in s["stats"]:
                    continue
                st = s["stats"][metric]
                y = losses.index(s["loss"]) + offsets[si]
                ax.errorbar(
                    st["mean"], y, xerr=st["std"], fmt="|", color=color, ms=10, capsize=3, lw=1
                )
                ax.scatter(st["values"], [y] * len(st["values"]), s=12, color=color, alpha=0.7)
                if s.get("source") == "baseline" and s["loss"] == _best(summary, split, metric):
                    ax.axvline(st["mean"], color=color, ls="--", lw=0.8, alpha=0.7)
            ax.scatter([], [], s=12, color=color, label=f"--split {split}")
        ax.set_title(METRIC_SHORT[metric], fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    ax0 = np.atleast_1d(axes)[0]
    ax0.set_yticks(range(len(losses)))
    ax0.set_yticklabels([marked.get(n, n) for n in losses], fontsize=8)
    for lab in ax0.get_yticklabels():
        if lab.get_text() in marked.values():
            lab.set_color("firebrick")
    ax0.invert_yaxis()
    ax0.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"Retrieval per seed (dots), mean ± std (bars), best baseline dashed — {_title(results)}",
        fontsize=10,
    )
    fig.tight_layout()
    p = os.path.join(out_dir, "metrics.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def _best(summary: List[dict], split: str, metric: str):
    cands = [
        (s["stats"][metric]["mean"], s["loss"])
        for s in summary
        if s["split"] == split and s.get("source") == "baseline" and metric in s["stats"]
    ]
    return max(cands)[1] if cands else None


def _embeddings(plt, results: dict, out_dir: str) -> List[str]:
    npz_path = os.path.join(out_dir, "embeddings_test.npz")
    dim = results["config"]["embedding_dim"]
    if dim not in (2, 3) or not os.path.exists(npz_path):
        return []
    data = np.load(npz_path)
    splits = results.get("splits") or ["samples"]
    first_seed = (results.get("seeds") or [results.get("seed")])[0]
    written = []
    for split in splits:
        lkey = labels_key(split, len(splits))
        if lkey not in data:
            continue
        labels = data[lkey]
        runs = [
            r
            for r in results["losses"]
            if r.get("split", "samples") == split
            and r.get("seed", first_seed) == first_seed
            and (r.get("metrics") or r.get("diverged"))
        ]
        if not runs:
            continue
        n = len(runs)
        cols = min(5, n)
        rows = math.ceil(n / cols)
        kw = {"projection": "3d"} if dim == 3 else {}
        fig = plt.figure(figsize=(3.2 * cols, 3.5 * rows + 0.4))
        cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
        for i, r in enumerate(runs):
            ax = fig.add_subplot(rows, cols, i + 1, **kw)
            key = embedding_key(split, r["loss"], len(splits))
            if key not in data:  # diverged: nothing to draw
                d = r.get("diverged") or {}
                ax.set_title(r["loss"], fontsize=8)
                # 3-D axes read text(x, y, s) as text(x, y, z=s): axes-relative is text2D.
                (ax.text2D if dim == 3 else ax.text)(
                    0.5,
                    0.5,
                    f"diverged\n(epoch {d.get('epoch')})",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=10,
                    color="C3",
                )
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            e = data[key].astype(np.float64)
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            rng = np.random.default_rng(0)
            sel = rng.permutation(len(e))[: min(len(e), 5000)]
            c = cmap(labels[sel] % cmap.N)
            if dim == 2:
                # small radial offset per class so the classes do not hide each other
                rad = 1.0 + 0.015 * (labels[sel] - labels.max() / 2.0)
                ax.scatter(e[sel, 0] * rad, e[sel, 1] * rad, c=c, s=2, alpha=0.6, linewidths=0)
                ax.set_aspect("equal")
                ax.set_xlim(-1.2, 1.2)
                ax.set_ylim(-1.2, 1.2)
            else:
                ax.scatter(e[sel, 0], e[sel, 1], e[sel, 2], c=c, s=2, alpha=0.6)
            p1 = r["metrics"].get("precision_at_1")
            ax.set_title(f"{r['loss']}\nP@1 {fmt(p1)}", fontsize=8)
            ax.tick_params(labelsize=6)
        proto = (results.get("protocols") or {}).get(split, {})
        names = proto.get("class_names") or results.get("dataset", {}).get("class_names") or []
        handles = [
            plt.Line2D([], [], ls="", marker="o", ms=4, color=cmap(k % cmap.N), label=nm)
            for k, nm in enumerate(names[: int(labels.max()) + 1])
        ]
        seed_txt = f", seed {first_seed}" if len(results.get("seeds") or []) > 1 else ""
        fig.suptitle(
            f"Normalised test embeddings by class ({split} protocol{seed_txt}) — {_title(results)}",
            fontsize=10,
        )
        if handles:
            fig.legend(
                handles=handles,
                loc="lower center",
                ncol=min(10, len(handles)),
                fontsize=7,
                frameon=False,
            )
        fig.tight_layout(rect=(0, 0.04 if handles else 0, 1, 0.97), h_pad=1.5)
        name = "embeddings.png" if len(splits) == 1 else f"embeddings_{split}.png"
        p = os.path.join(out_dir, name)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def plot_results(out_dir: str) -> List[str]:
    """Make the PNGs from ``results.json`` (+ ``embeddings_test.npz``) in ``out_dir``."""
    plt = _plt()
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    if "summary" not in results:  # written before seeds existed: one seed, one protocol
        from .report import aggregate

        results["summary"] = aggregate(results["losses"])
    written = _loss_curves(plt, results, out_dir)
    written += _metrics_spread(plt, results, out_dir)
    written += _embeddings(plt, results, out_dir)
    return written
