"""Aggregating runs over seeds, the statistics that rank them, and the Markdown tables.

``results["losses"]`` holds one entry per (split, loss, seed), ``results["baselines"]`` one
per (split, baseline, seed). :func:`aggregate` gives one entry per (split, loss) with mean,
std (sample standard deviation, ddof=1), n and the 95 % t-interval of each metric over the
seeds that finished.

Ranking (:func:`paired_difference`): each loss against a reference (default the best
baseline, by mean MAP@R), seed by seed: the differences d_s = loss_s - reference_s of the
seeds both finished, their mean and 95 % t-interval (mean +- t_{0.975, n-1} s_d / sqrt(n)).
A difference is *resolved* when its interval excludes 0. Same-seed differences remove what
the two runs share (the class partition, the initialisation, the batches), so they resolve
smaller gaps than the two means' own intervals would.
"""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

from .evaluation import METRICS

__all__ = [
    "aggregate",
    "results_table",
    "fmt",
    "fmt_stat",
    "t_interval",
    "paired_difference",
    "best_baseline",
    "rank",
    "RANK_METRIC",
]

RANK_METRIC = "mean_average_precision_at_r"


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def t_interval(values) -> dict:
    """Mean and 95 % t-interval half-width of ``values`` (``half`` None below 2 values)."""
    a = np.asarray(list(values), dtype=np.float64)
    n = len(a)
    if n == 0:
        return {"mean": None, "half": None, "n": 0, "lo": None, "hi": None}
    mean = float(a.mean())
    if n < 2:
        return {"mean": mean, "half": None, "n": 1, "lo": None, "hi": None}
    half = _t975(n - 1) * float(a.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "half": half, "n": n, "lo": mean - half, "hi": mean + half}


def _by_seed(runs: List[dict], split: str, loss: str, metric: str) -> Dict[object, float]:
    return {
        r.get("seed"): float(r["metrics"][metric])
        for r in runs
        if r.get("split", "samples") == split and r["loss"] == loss and metric in r["metrics"]
    }


def paired_difference(
    runs: List[dict], split: str, loss: str, reference: str, metric: str = RANK_METRIC
) -> dict:
    """Same-seed differences ``loss - reference`` of ``metric``: mean, 95 % t-interval, the
    seeds used and ``resolved`` (+1 / -1 when the interval excludes 0, 0 when it does not,
    None below 2 seeds)."""
    a, b = _by_seed(runs, split, loss, metric), _by_seed(runs, split, reference, metric)
    seeds = [s for s in a if s in b]
    ci = t_interval(a[s] - b[s] for s in seeds)
    resolved = None
    if ci["half"] is not None:
        resolved = 1 if ci["lo"] > 0 else (-1 if ci["hi"] < 0 else 0)
    return {**ci, "seeds": seeds, "reference": reference, "resolved": resolved}


def best_baseline(summary: List[dict], split: str, metric: str = RANK_METRIC):
    """Name of the baseline with the highest mean ``metric`` in ``split`` (None if none)."""
    cands = [
        (s["stats"][metric]["mean"], s["loss"])
        for s in summary
        if s["split"] == split and s.get("source") == "baseline" and metric in s["stats"]
    ]
    return max(cands)[1] if cands else None


def rank(results: dict, split: str, reference=None, metric: str = RANK_METRIC) -> dict:
    """Every loss's same-seed difference against ``reference`` (default the best baseline)
    in ``split``; ``{"reference": name, "differences": {loss: paired_difference}}``."""
    base_summary = results.get("baseline_summary", [])
    ref = reference or best_baseline(base_summary, split, metric)
    runs = list(results["losses"]) + list(results.get("baselines", []))
    out = {"reference": ref, "metric": metric, "differences": {}}
    if ref is None:
        return out
    for s in results["summary"]:
        if s["split"] == split and s["loss"] != ref:
            out["differences"][s["loss"]] = paired_difference(runs, split, s["loss"], ref, metric)
    return out


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
                ci = t_interval(a)
                stats[k] = {
                    "mean": float(a.mean()),
                    "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                    "n": len(a),
                    "ci95_half": ci["half"],
                    "values": [float(v) for v in a],
                }
            for extra in ("unnormalized", "separated"):
                key = f"metrics_{extra}"
                vals = [r[key][k] for r in ok if k in r.get(key, {})]
                if vals:
                    stats[f"{k}_{extra}"] = {
                        "mean": float(np.mean(vals)),
                        "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                        "n": len(vals),
                        "ci95_half": t_interval(vals)["half"],
                        "values": [float(v) for v in vals],
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


def fmt_ci(st) -> str:
    """``0.4321 ± 0.0123`` (95 % t-interval half-width), ``—`` below 2 seeds."""
    if not st or st.get("ci95_half") is None:
        return "—"
    return f"{st['mean']:.4f} ± {st['ci95_half']:.4f}"


def fmt_diff(d) -> str:
    if not d or d["mean"] is None:
        return "—"
    if d["half"] is None:
        return f"{d['mean']:+.4f}"
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def fmt_resolved(d) -> str:
    if not d or d.get("resolved") is None:
        return "— (1 seed)" if d and d["n"] == 1 else "—"
    return {1: "yes, higher", -1: "yes, lower", 0: "no"}[d["resolved"]]


def verdict(d) -> str:
    """Against the best baseline: ``beats`` only when the same-seed difference is resolved
    above 0 (or, with one seed, is above 0, said so)."""
    if not d or d["mean"] is None:
        return "—"
    if d["half"] is None:
        return "above (1 seed)" if d["mean"] > 0 else "**not above** (1 seed)"
    if d["resolved"] == 1:
        return "beats"
    if d["resolved"] == -1:
        return "**below**"
    return "**not resolved**"


def _short(description: str, limit: int = 60) -> str:
    """Class lists longer than ``limit`` characters (many-class partitions) shortened to
    their size; the full lists are in results.json (``class_partitions``)."""
    import re

    def repl(m):
        text = m.group(0)
        if len(text) <= limit:
            return text
        n = sum((int(b) - int(a) + 1) if b else 1 for a, b in re.findall(r"(\d+)(?:-(\d+))?", text))
        return f"{n} classes (listed in results.json)"

    out = re.sub(r"\d+(?:-\d+)?(?:,\d+(?:-\d+)?)+", repl, description)
    return re.sub(r"classes (\d+ classes \(listed)", r"\1", out)


def split_table(results: dict, split: str) -> str:
    cfg = results["config"]
    proto = results["protocols"][split]
    seeds = results["seeds"]
    summary = [s for s in results["summary"] if s["split"] == split]
    bsummary = [s for s in results.get("baseline_summary", []) if s["split"] == split]
    seed_txt = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {','.join(map(str, seeds))}"
    m = (cfg.get("m_per_class_used") or {}).get(split) or cfg.get("m_per_class")
    lines = [
        f"### Protocol `--split {split}`: {_short(proto['description'])}",
        "",
        f"Dataset **{cfg['dataset']}** ({proto['n_train']} train / {proto['n_test']} test "
        f"images, {proto['num_classes']} training classes, {proto['num_test_classes']} test "
        f"classes), model `{cfg['model']}`, embedding dim {cfg['embedding_dim']}, "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}"
        + (f" (m = {m} per class)" if m else "")
        + f", lr {cfg['lr']} (loss params {cfg['loss_lr']}), {seed_txt}"
        + (", BatchNorm frozen" if cfg.get("freeze_bn") else "")
        + f", device {results['device_name']}"
        + (f", AMP {cfg['amp']}" if cfg.get("amp") else "")
        + f", k-NN `{results['knn_backend']}`.",
        "",
    ]
    ranking = rank(results, split, cfg.get("reference"))
    ref = ranking["reference"]
    best = best_baseline(bsummary, split)
    vs_best = rank(results, split, best)["differences"] if best else {}
    cols = list(METRICS)
    head = "| Loss | Source | P@1 | R-Prec | MAP@R | MAP@R 95 % CI |"
    head += f" Δ MAP@R vs {ref or '—'} [95 % CI] | Resolved | vs best baseline |"
    unnorm = any("mean_average_precision_at_r_unnormalized" in s["stats"] for s in summary)
    if unnorm:
        head += " MAP@R unnormalised |"
    sep = any("mean_average_precision_at_r_separated" in s["stats"] for s in summary)
    if sep:
        d1 = cfg["embedding_dim"]
        head += f" MAP@R {d1}-D separated |"
    extra = []
    if proto["split"] == "samples":
        extra = ["acc", "center_acc"]
        head += " Acc (logits) | Acc (nearest center) |"
    ncols = len(cols) + 4 + (1 if unnorm else 0) + (1 if sep else 0) + len(extra)
    lines += [head + " Train s | Status |", "|---|---|" + "---:|" * ncols + "---:|---|"]
    for s in bsummary + summary:
        d = ranking["differences"].get(s["loss"])
        row = f"| {s['loss']} | {s['source']} | "
        row += " | ".join(fmt_stat(s["stats"].get(k)) for k in cols)
        row += f" | {fmt_ci(s['stats'].get(RANK_METRIC))}"
        row += f" | {'(reference)' if s['loss'] == ref else fmt_diff(d)}"
        row += f" | {'' if s['loss'] == ref else fmt_resolved(d)}"
        row += f" | {'—' if s['source'] == 'baseline' else verdict(vs_best.get(s['loss']))}"
        if unnorm:
            row += f" | {fmt_stat(s['stats'].get(RANK_METRIC + '_unnormalized'))}"
        if sep:
            row += f" | {fmt_stat(s['stats'].get(RANK_METRIC + '_separated'))}"
        for k in extra:
            row += f" | {fmt_stat(s['stats'].get(k))}"
        row += f" | {s['train_s_mean']:.1f} | {_status(s)} |"
        lines.append(row)
    notes = (
        "P@1 / R-Prec / MAP@R: pytorch-metric-learning AccuracyCalculator, k=max_bin_count, "
        "test images against each other (leave-one-out), every embedding L2-normalised "
        "before k-NN (Musgrave et al., ECCV 2020); *MAP@R unnormalised*: the raw embeddings "
        "of the losses that do not normalise internally, for comparison. Baselines: raw "
        "input (flattened, L2-normalised), the untrained network (each loss's initialisation "
        "at that seed)" + (", the frozen backbone" if cfg.get("weights") else "") + ", on "
        "the same test split. *Δ*: same-seed differences of MAP@R against the reference "
        f"({ref or 'none'}), mean and 95 % t-interval; *Resolved*: the interval excludes 0. "
        "*vs best baseline*: **beats** only when the difference to the best baseline "
        f"({best or 'none'}) is resolved above 0."
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
    if sep:
        k = cfg.get("folds")
        notes += (
            f" With --folds {k}: one model per fold (trained on that fold's training "
            f"classes); P@1 / R-Prec / MAP@R of the {k} models' embeddings concatenated "
            f"({k * cfg['embedding_dim']}-D), *separated*: each model's "
            f"{cfg['embedding_dim']}-D embeddings, averaged over the models."
        )
    if cfg.get("tune"):
        notes += (
            f" --tune {cfg['tune']}: optuna TPE trials per loss on the validation folds of "
            "the training classes; the final runs use the best trial's values (in "
            "results.json, per run)."
        )
    if len(seeds) > 1:
        notes += (
            f" P@1 / R-Prec / MAP@R: mean ± std (sample std) over {len(seeds)} seeds; "
            "MAP@R 95 % CI: mean ± t-interval half-width; Train s: mean per run."
        )
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
