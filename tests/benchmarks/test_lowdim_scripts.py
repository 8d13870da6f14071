"""The scripts behind benchmarks/results/lowdim: aggregation, the old-against-new
comparisons of the rerun (compare.py, sweep_summary.py), the angle-only bound, and a
one-epoch run of the sweep driver (so that its variants build and train)."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOWDIM = os.path.join(ROOT, "benchmarks", "results", "lowdim")
sys.path.insert(0, LOWDIM)

import aggregate  # noqa: E402
import angular_bound  # noqa: E402
import compare  # noqa: E402
import run as lowdim_run  # noqa: E402
import slim  # noqa: E402
import sweep_summary  # noqa: E402


def write_run(root, setup, seed, losses):
    path = root / setup / f"seed{seed}"
    path.mkdir(parents=True)
    entries = []
    for name, acc, diverged in losses:
        metrics = {} if diverged else {"acc": acc, "mean_average_precision_at_r": acc / 2}
        entries.append({"loss": name, "metrics": metrics, "diverged": diverged})
    (path / "results.json").write_text(json.dumps({"losses": entries}))


def test_aggregate_means_stds_and_points_against_softmax(tmp_path, monkeypatch):
    write_run(tmp_path, "digits-2d", 0, [("Softmax", 0.8, False), ("X", 0.7, False)])
    write_run(tmp_path, "digits-2d", 1, [("Softmax", 0.9, False), ("X", 0.8, False)])
    write_run(tmp_path, "digits-2d", 2, [("Softmax", 0.85, False), ("Y", None, True)])
    monkeypatch.setattr(aggregate, "HERE", str(tmp_path))
    aggregate.main()
    text = (tmp_path / "summary.md").read_text()
    # X: mean 0.75 of two seeds, sample std 0.1/sqrt(2), t_{0.975,1} = 12.706: half-width
    # 12.706 * 0.0707 / sqrt(2) = 0.635. Same-seed differences from softmax: -0.1 at both
    # seeds, so -10.0 points with (numerically) no spread: worse.
    assert "| X | 2 | 0.750 [0.115, 1.385] | -10.0 [-10.0, -10.0] worse |" in text
    # MAP@R (acc / 2 here): 0.35, 0.40 -> half-width 12.706 * 0.0354 / sqrt(2) = 0.318
    assert "| 0.375 [0.057, 0.693] | -5.0 [-5.0, -5.0] worse |" in text
    assert "| Y | 1 | diverged in 1 of 1 seeds | n/a | n/a | n/a |" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["digits-2d"]["Softmax"]["acc"] == pytest.approx(0.85)
    # the old fields stay: the population std (0.05), which compare.py reads
    assert summary["digits-2d"]["X"]["acc"] == pytest.approx(0.75)
    assert summary["digits-2d"]["X"]["acc_std"] == pytest.approx(0.05)
    assert summary["digits-2d"]["X"]["map_at_r_std"] == pytest.approx(0.025)
    assert summary["digits-2d"]["X"]["acc_vs_softmax_ci95"]["seeds"] == [0, 1]


def test_t975_is_students_quantile():
    # Tables of Student's t, two-sided 95 %.
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042)):
        assert aggregate.t975(df) == pytest.approx(t, abs=5e-4)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=str(bad)):
            aggregate.t975(bad)


def test_ci95_against_a_hand_computation():
    c = aggregate.ci95([0.1, 0.2, None, 0.3])  # None (a diverged seed) is left out
    # mean 0.2, sample std (ddof=1) 0.1, half-width t_{0.975,2} * 0.1 / sqrt(3), t = 4.303
    half = 4.303 * 0.1 / math.sqrt(3)
    assert c["n"] == 3 and c["mean"] == pytest.approx(0.2) and c["sd"] == pytest.approx(0.1)
    assert c["t"] == pytest.approx(4.303, abs=5e-4)
    assert c["half_width"] == pytest.approx(half, rel=1e-4)
    assert c["lo"] == pytest.approx(0.2 - half, abs=1e-4)
    assert c["hi"] == pytest.approx(0.2 + half, abs=1e-4)
    assert aggregate.fmt_ci(c) == f"0.200 [{0.2 - half:.3f}, {0.2 + half:.3f}]"
    # with 3 seeds the half-width is 2.48 sample stds, as the tables' header says
    assert c["half_width"] / c["sd"] == pytest.approx(2.48, abs=5e-3)


def test_ci95_of_one_seed_is_no_interval():
    c = aggregate.ci95([0.7])
    assert c["mean"] == pytest.approx(0.7) and c["n"] == 1
    assert c["half_width"] is None and c["lo"] is None and c["hi"] is None
    assert aggregate.fmt_ci(c) == "0.700 (n = 1, no interval)"
    p = aggregate.paired_ci95({0: 0.7, 1: None}, {0: 0.6, 1: 0.6})
    assert p["verdict"] is None and p["seeds"] == [0]
    assert aggregate.fmt_diff(p) == "+10.0 (n = 1, no interval)"
    empty = aggregate.ci95([None, None])
    assert empty["n"] == 0 and aggregate.fmt_ci(empty) == "n/a"


def test_paired_difference_uses_same_seed_differences():
    ref = {0: 0.70, 1: 0.80, 2: 0.90, 3: 0.50}
    loss = {0: 0.72, 1: 0.81, 2: 0.92, 3: None}  # seed 3 diverged: not paired
    p = aggregate.paired_ci95(loss, ref)
    # differences 0.02, 0.01, 0.02: mean 0.01667, sample std 0.005774, half-width
    # 4.303 * 0.005774 / sqrt(3) = 0.01434 -> [0.0023, 0.0310]: better. The unpaired means
    # (0.817 and 0.800, each with a sample std near 0.1) could not tell them apart.
    assert p["seeds"] == [0, 1, 2] and p["n"] == 3
    assert p["mean"] == pytest.approx(0.05 / 3)
    assert p["sd"] == pytest.approx(math.sqrt(1 / 3) / 100, rel=1e-6)
    assert p["half_width"] == pytest.approx(4.303 * math.sqrt(1 / 3) / 100 / math.sqrt(3), rel=1e-4)
    assert p["verdict"] == "better"
    assert aggregate.fmt_diff(p) == "+1.7 [+0.2, +3.1] better"
    worse = aggregate.paired_ci95(ref, loss)
    assert worse["verdict"] == "worse" and worse["mean"] == pytest.approx(-0.05 / 3)
    # differences 0.02, -0.01, 0.03: mean 0.0133, interval [-0.025, 0.051]: not resolved
    mixed = aggregate.paired_ci95({0: 0.72, 1: 0.79, 2: 0.93}, ref)
    assert mixed["verdict"] == "not resolved" and mixed["lo"] < 0 < mixed["hi"]
    assert aggregate.fmt_diff(mixed).endswith("]")


def test_aggregate_leaves_out_and_counts_diverged_seeds(tmp_path, monkeypatch):
    for seed, (soft, x) in enumerate(((0.80, 0.10), (0.90, 0.92), (0.85, 0.88))):
        write_run(tmp_path, "digits-3d", seed, [("Softmax", soft, False), ("X", x, False)])
    # seed 0 of X diverged but still wrote metrics: they must not count
    path = tmp_path / "digits-3d" / "seed0" / "results.json"
    res = json.loads(path.read_text())
    res["losses"][1]["diverged"] = {"epoch": 3}
    res["losses"][1]["metrics"] = {"acc": 0.10, "mean_average_precision_at_r": 0.05}
    path.write_text(json.dumps(res))
    monkeypatch.setattr(aggregate, "HERE", str(tmp_path))
    aggregate.main()
    x = json.loads((tmp_path / "summary.json").read_text())["digits-3d"]["X"]
    assert x["diverged_seeds"] == 1 and x["acc_ci95"]["n"] == 2
    assert x["acc"] == pytest.approx(0.90) and x["acc_ci95"]["mean"] == pytest.approx(0.90)
    # paired over seeds 1 and 2 only: differences +0.02, +0.03
    assert x["acc_vs_softmax_ci95"]["seeds"] == [1, 2]
    assert x["acc_vs_softmax_ci95"]["mean"] == pytest.approx(0.025)
    half = 12.706 * statistics.stdev([0.92, 0.88]) / math.sqrt(2)
    row = [ln for ln in (tmp_path / "summary.md").read_text().splitlines() if "| X |" in ln][0]
    assert row.startswith(
        f"| X | 3 | diverged in 1 of 3 seeds; the others 0.900 [{0.9 - half:.3f}, "
        f"{0.9 + half:.3f}] | +2.5 ["
    )


def test_aggregate_pairs_each_variant_with_its_base(tmp_path, monkeypatch):
    rows = {
        0: [("Softmax", 0.8, False), ("A", 0.70, False), ("A(paper)", 0.50, False)],
        1: [("Softmax", 0.8, False), ("A", 0.80, False), ("A(paper)", 0.62, False)],
        2: [("Softmax", 0.8, False), ("A", 0.90, False), ("A(paper)", 0.70, False)],
    }
    for seed, losses in rows.items():
        write_run(tmp_path, "digits-2d", seed, losses + [("B", 0.6, False), ("B(x)", 0.6, False)])
    monkeypatch.setattr(aggregate, "HERE", str(tmp_path))
    aggregate.main()
    text = (tmp_path / "summary.md").read_text()
    # A(paper) - A: -0.20, -0.18, -0.20 -> mean -19.33 points, sample std 1.155 points,
    # half-width 4.303 * 1.155 / sqrt(3) = 2.87: [-22.2, -16.5], worse. MAP@R is acc / 2.
    assert "| A(paper) | A | -19.3 [-22.2, -16.5] worse | -9.7 [-11.1, -8.2] worse |" in text
    # the same numbers at every seed: no interval of zero width, but what it is
    assert "| B(x) | B | 0 (identical at every seed) | 0 (identical at every seed) |" in text
    entry = json.loads((tmp_path / "summary.json").read_text())["digits-2d"]["A(paper)"]
    assert entry["base"] == "A" and entry["acc_vs_base_ci95"]["verdict"] == "worse"
    assert entry["acc_vs_base_ci95"]["mean"] == pytest.approx(-0.58 / 3)


def test_aggregate_keeps_the_unnormalised_map_at_r(tmp_path, monkeypatch):
    for seed, raw in ((0, 0.4), (1, 0.6)):
        path = tmp_path / "digits-2d" / f"seed{seed}"
        path.mkdir(parents=True)
        run = {"loss": "Softmax", "metrics": {"acc": 0.8, "mean_average_precision_at_r": 0.1}}
        run["metrics_unnormalized"] = {"mean_average_precision_at_r": raw}
        (path / "results.json").write_text(json.dumps({"losses": [run]}))
    monkeypatch.setattr(aggregate, "HERE", str(tmp_path))
    aggregate.main()
    entry = json.loads((tmp_path / "summary.json").read_text())["digits-2d"]["Softmax"]
    assert entry["map_at_r"] == pytest.approx(0.1)
    assert entry["map_at_r_unnormalized"] == pytest.approx(0.5)
    assert entry["map_at_r_unnormalized_std"] == pytest.approx(0.1)


def table_rows(path, prefix):
    """{first cell: cells} of the Markdown table rows of ``path`` that start with prefix."""
    rows = [ln.strip("| ").split(" | ") for ln in path.read_text().splitlines()]
    return {r[0]: r for r, ln in zip(rows, path.read_text().splitlines()) if ln.startswith(prefix)}


def cell(accs, maps=None, raw=None, diverged=0):
    """A summary.json cell: seeds with these accuracies, then `diverged` diverged seeds."""
    seeds = [
        {"acc": a, "map_at_r": (maps or accs)[i], "diverged": False} for i, a in enumerate(accs)
    ]
    seeds += [{"acc": None, "map_at_r": None, "diverged": True}] * diverged
    e = {"seeds": seeds, "acc": None, "acc_std": None, "map_at_r": None, "map_at_r_std": None}
    if accs:
        e.update(acc=float(np.mean(accs)), acc_std=float(np.std(accs)))
        m = maps or accs
        e.update(map_at_r=float(np.mean(m)), map_at_r_std=float(np.std(m)))
    if raw:
        e.update(map_at_r_unnormalized=float(np.mean(raw)))
        e.update(map_at_r_unnormalized_std=float(np.std(raw)))
    return e


def test_compare_calls_each_cell_against_the_larger_std(tmp_path):
    old = {
        "digits-2d": {
            "A": cell([0.70, 0.72, 0.74]),  # mean 0.72, std 0.0163
            "B": cell([0.70, 0.72, 0.74]),
            "C": cell([], diverged=3),
            "D": cell([], diverged=3),
            "Softmax": cell([0.8, 0.8, 0.8], maps=[0.5, 0.5, 0.5]),
            "Gone": cell([0.5, 0.5, 0.5]),
        }
    }
    new = {
        "digits-2d": {
            "A": cell([0.71, 0.73, 0.75]),  # +1.0 points: within 1x
            "B": cell([0.73, 0.75, 0.77]),  # +3.0 points: over 1x (1.63), within 2x (3.27)
            "C": cell([], diverged=3),
            "D": cell([0.6, 0.6], diverged=1),
            # normalised MAP@R moved, the unnormalised one (the old protocol) did not
            "Softmax": cell([0.8, 0.8, 0.8], maps=[0.1, 0.1, 0.1], raw=[0.5, 0.5, 0.5]),
            "New": cell([0.9, 0.9, 0.9]),
        }
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    out = tmp_path / "rerun.md"
    compare.main(
        ["--old", str(tmp_path / "old.json"), "--new", str(tmp_path / "new.json")]
        + ["--out", str(out)]
    )
    rows = table_rows(out, "| ")
    assert rows["A"][3:6] == ["+1.0", "agree", "agree"]
    assert rows["B"][3:6] == ["+3.0", "disagree", "agree"]
    assert rows["C"][4:6] == ["agree (all diverged)"] * 2
    assert rows["D"][4] == "disagree (diverged 3/3 → 1/3)"
    assert rows["Softmax"][7:11] == ["0.500 ± 0.000", "+0.0", "agree", "agree"]
    assert rows["Gone"][2] == "—" and rows["Gone"][4] == "not rerun"
    assert rows["New"][1] == "—" and rows["New"][4] == "new"
    counts = out.read_text().split("## Counts")[1]
    assert "| Acc | 1× | 3 | 2 |" in counts and "| Acc | 2× | 4 | 1 |" in counts


def test_compare_false_disagree_rate_matches_a_direct_count():
    # The rule's chance of calling two draws of one distribution different, counted here
    # with another generator and a plain loop.
    rng = np.random.default_rng(12345)
    n, hits = {1: 0, 2: 0}, 4000
    for _ in range(hits):
        a, b = rng.normal(3.0, 0.01, 3), rng.normal(3.0, 0.01, 3)
        for k in n:
            n[k] += abs(a.mean() - b.mean()) > k * max(a.std(), b.std())
    for k in n:
        assert compare.false_disagree_rate(k) == pytest.approx(n[k] / hits, abs=0.025)
    assert compare.false_disagree_rate(50) < 1e-3


def test_compare_says_whether_the_runs_commits_share_their_code(monkeypatch):
    calls = []

    def fake_run(cmd, returncode):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode)

    for code, expected in ((0, "yes"), (1, "no"), (128, "unknown")):
        monkeypatch.setattr(compare.subprocess, "run", lambda cmd, c=code, **kw: fake_run(cmd, c))
        assert compare.same_code(["aaaaaaa", "bbbbbbb"]) == expected
    assert calls[0][-4:] == [
        "--",
        "pml_extras",
        "benchmarks/retrieval.py",
        "benchmarks/retrieval_bench",
    ]
    assert calls[0][3:7] == ["diff", "--quiet", "aaaaaaa", "bbbbbbb"]

    def no_git(cmd, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(compare.subprocess, "run", no_git)
    assert compare.same_code(["aaaaaaa", "bbbbbbb"]) == "unknown"


def test_sweep_summary_reads_old_tables_and_flags_changed_defaults(tmp_path, monkeypatch):
    (tmp_path / "sweeps.md").write_text(
        "## Sweep A (2-D)\n\n| sc_normal_ada_0.25 | 0.500 | 0.001 | x |\n"
        "## Sweep C (2-D). Note\n\n| Variant | mean acc | std | seeds |\n|---|---:|---:|---|\n"
        "| sc_normal_ada_0.25 | 0.659 | 0.064 | 0.709, 0.700, 0.569 |\n"
        "| sc_spread_ada_0.25 | 0.640 | 0.077 | 0.711, 0.676, 0.533 |\n"
        "## Sweep A (3-D)\n\n| sc_normal_ada_0.25 | 0.100 | 0.001 | x |\n"
    )
    for seed, acc in enumerate((0.70, 0.72, 0.74)):
        path = tmp_path / "sweeps" / "digits-2d" / f"seed{seed}"
        path.mkdir(parents=True)
        runs = [
            {"loss": v, "hparams": {"m": 0.25}, "metrics": {"acc": acc}, "step_losses": [1.0] * 9}
            for v in ("sc_normal_ada_0.25", "sc_spread_ada_0.25")
        ]
        (path / "results.json").write_text(json.dumps({"losses": runs, "git_commit": "abcdef12"}))
    monkeypatch.setattr(sweep_summary, "HERE", str(tmp_path))
    out = tmp_path / "sweeps_rerun.md"
    sweep_summary.main(["--strip", "--old", str(tmp_path / "sweeps.md"), "--out", str(out)])
    rows = table_rows(out, "| s")
    # the latest 2-D section's value (not Sweep A's, not the 3-D one); +6.1 points against
    # a std of 6.4: agree
    assert rows["sc_normal_ada_0.25"][2:8] == [
        "0.659 ± 0.064 (Sweep C)",
        "0.720 ± 0.016",
        "0.700, 0.720, 0.740",
        "+6.1",
        "agree",
        "agree",
    ]
    # +8.0 points against a std of 7.7: over 1x, within 2x; in brackets (not like-for-like)
    assert rows["sc_spread_ada_0.25"][6:8] == ["(disagree)", "(agree)"]
    assert rows["sc_spread_ada_0.25"][8].startswith("no: spread proxies had unit length")
    saved = json.loads((tmp_path / "sweeps" / "digits-2d" / "seed0" / "results.json").read_text())
    assert "step_losses" not in saved["losses"][0] and saved["losses"][0]["metrics"]["acc"] == 0.7
    assert "commit abcdef1" in out.read_text()


def test_sweep_summary_pairs_variants_seed_by_seed(tmp_path, monkeypatch):
    def write(folder, seed, accs):
        path = tmp_path / folder / f"seed{seed}"
        path.mkdir(parents=True)
        runs = [{"loss": k, "metrics": {"acc": a}, "diverged": a is None} for k, a in accs]
        (path / "results.json").write_text(json.dumps({"losses": runs}))

    soft, sc, short = (0.80, 0.70, 0.90), (0.70, 0.61, 0.80), (0.73, 0.62, 0.83)
    for seed in range(3):
        write("sweeps/digits-2d", seed, [("Softmax", soft[seed]), ("scA", sc[seed])])
        write("other", seed, [("short", short[seed]), ("Softmax", soft[seed] + (seed == 2))])
    (tmp_path / "sweeps.md").write_text("## Sweep A (2-D)\n")
    monkeypatch.setattr(sweep_summary, "HERE", str(tmp_path))
    monkeypatch.setattr(sweep_summary, "PAIRS", [("other", "short", "sweeps/digits-2d", "scA")])
    same = [("sweeps/digits-2d", "Softmax", "other", "Softmax")]
    monkeypatch.setattr(sweep_summary, "SAME_RUNS", same)
    out = tmp_path / "sweeps_rerun.md"
    sweep_summary.main(["--old", str(tmp_path / "sweeps.md"), "--out", str(out)])
    rows = table_rows(out, "| ")
    # scA - Softmax: -0.10, -0.09, -0.10 -> mean -9.67 points, sample std 0.577 points,
    # half-width 4.303 * 0.577 / sqrt(3) = 1.43: [-11.1, -8.2], worse
    assert rows["scA"][10] == "-9.7 [-11.1, -8.2] worse"
    assert rows["Softmax"][10] == "(reference)"
    # scA's own interval: mean 0.7033, sample std 0.0950, half-width 0.236
    assert rows["scA"][9] == "0.703 [0.467, 0.939]"
    # across folders: short - scA = +0.03, +0.01, +0.03 -> +2.33, sd 1.155, half 2.87
    pair = [r for k, r in rows.items() if k.startswith("`other` short")]
    assert pair and pair[0][4] == "0, 1, 2" and pair[0][5] == "+2.3 [-0.5, +5.2]"
    text = out.read_text()
    assert "`sweeps/digits-2d` Softmax and `other` Softmax: DIFFERENT" in text


INTERVAL = re.compile(r"([+-]?\d+\.\d+) \[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]")


def intervals(text):
    """Every ``mean [lo, hi]`` of a text, the Unicode minus read as "-"."""
    return set(INTERVAL.findall(text.replace("\u2212", "-")))


def test_docs_and_readme_cite_intervals_of_the_generated_tables():
    """Every interval docs/low_dim.md and the README's low-dim bullet quote is one that
    aggregate.py (summary.md) or sweep_summary.py (sweeps_rerun.md) wrote, sign included."""
    tables = set()
    for name in ("summary.md", "sweeps_rerun.md"):
        with open(os.path.join(LOWDIM, name)) as f:
            tables |= intervals(f.read())
    with open(os.path.join(ROOT, "docs", "low_dim.md")) as f:
        page = intervals(f.read())
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    bullet = readme[readme.index("**Low-dimensional embeddings**") :]
    bullet = bullet[: bullet.index("\n- **")]
    cited = intervals(bullet)
    assert len(page) >= 40 and len(cited) >= 4
    assert page - tables == set() and cited - tables == set()
    # no mean ± std left where a reader would take it for an interval
    assert "±" not in bullet
    assert not any("± " in ln for ln in open(os.path.join(ROOT, "docs", "low_dim.md")))


def test_slim_drops_only_derived_fields_logs_and_sweep_tables(tmp_path):
    run = {
        "losses": [{"loss": "X", "metrics": {"acc": 0.5}, "epoch_losses": [1.23456789, 2.0]}],
        "summary": [1],
        "baseline_summary": [2],
        "ranking": {"samples": 3},
        "git_commit": "abc",
    }
    for setup, seed in (("digits-2d", 0), ("digits-2d", 1), ("digits-3d", 0), ("digits-128d", 0)):
        path = tmp_path / setup / f"seed{seed}"
        path.mkdir(parents=True)
        (path / "results.json").write_text(json.dumps(run))
    for name in ("log.txt", "results.md", "metrics.png"):
        (tmp_path / "digits-2d" / "seed1" / name).write_text("x")
    (tmp_path / "digits-3d" / "seed0" / "log.txt").write_text("x")  # no results.md: stays
    sweep = tmp_path / "sweeps" / "digits-2d" / "seed0"
    sweep.mkdir(parents=True)
    for name in ("log.txt", "results.md", "results.json"):
        (sweep / name).write_text("{}")
    done = slim.main(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in done if p.endswith(".json")) == [
        os.path.join(setup, f"seed{seed}", "results.json")
        for setup, seed in (
            ("digits-128d", 0),
            ("digits-2d", 0),
            ("digits-2d", 1),
            ("digits-3d", 0),
        )
    ]
    assert sorted(p.name for p in (tmp_path / "digits-2d" / "seed1").iterdir()) == [
        "results.json",
        "results.md",
    ]
    assert (tmp_path / "digits-3d" / "seed0" / "log.txt").exists()
    assert sorted(p.name for p in sweep.iterdir()) == ["results.json"]
    slimmed = json.loads((tmp_path / "digits-2d" / "seed1" / "results.json").read_text())
    assert slimmed["losses"][0]["epoch_losses"] == [1.23457, 2.0]
    assert slimmed["losses"][0]["metrics"] == {"acc": 0.5} and slimmed["git_commit"] == "abc"
    assert not {"summary", "baseline_summary", "ranking"} & set(slimmed)


def test_arc_bound_is_the_best_arc_labelling():
    rng = np.random.default_rng(0)
    c, n = 10, 2000
    labels = rng.integers(0, c, n)
    # Each class on its own arc of 36 degrees: the angle says everything.
    angle = (labels + rng.uniform(0.05, 0.95, n)) * 2 * math.pi / c - math.pi
    radius = rng.uniform(0.1, 5.0, n)  # the radius must not matter
    emb = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    assert angular_bound.arc_bound(emb, labels, 360) == 1.0
    # Two classes sharing every arc in equal numbers: the best labelling gets half.
    shared = np.repeat(np.linspace(-math.pi + 0.01, math.pi - 0.01, 500), 2)
    emb2 = np.stack([np.cos(shared), np.sin(shared)], 1)
    assert angular_bound.arc_bound(emb2, np.tile([0, 1], 500), 36) == pytest.approx(0.5)


def test_angular_bound_writes_its_table(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    d = tmp_path / "digits-2d" / "seed0"
    d.mkdir(parents=True)
    labels = rng.integers(0, 3, 300)
    np.savez(d / "embeddings_test.npz", labels=labels, emb_A=rng.normal(size=(300, 2)))
    monkeypatch.setattr(angular_bound, "HERE", str(tmp_path))
    out = tmp_path / "bound.md"
    angular_bound.main(["--bins", "12", "--out", str(out)])
    row = [ln for ln in out.read_text().splitlines() if ln.startswith("| A |")]
    expected = angular_bound.arc_bound(np.load(d / "embeddings_test.npz")["emb_A"], labels, 12)
    assert row == [f"| A | {expected:.3f} |"]


def test_sweep_variants_build_and_train_one_epoch(tmp_path):
    variants = "cfE_order_frozen,cfE_spreadL0.05_mhalf,scE_spreadL0.05,afE_auto"
    out = tmp_path / "sweep"
    cmd = [sys.executable, os.path.join(LOWDIM, "sweep.py"), "--dataset", "digits"]
    cmd += ["--embedding-dim", "2", "--epochs", "1", "--losses", variants, "--out", str(out)]
    cmd += ["--threads", "1", "--no-progress", "--no-plots", "--knn", "torch"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["loss"]: r for r in json.loads((out / "results.json").read_text())["losses"]}
    assert set(runs) == set(variants.split(","))
    for r in runs.values():
        assert not r.get("diverged") and not r.get("error"), r
        assert 0.0 <= r["metrics"]["acc"] <= 1.0
    # The margins the names promise: pi/10 for the half-separation rule in 2-D.
    assert runs["cfE_spreadL0.05_mhalf"]["hparams"]["margin"] == pytest.approx(math.pi / 10)
    assert runs["afE_auto"]["hparams"]["margin"] == pytest.approx(math.pi / 10)
    assert runs["cfE_order_frozen"]["hparams"]["frozen"] is True


def test_lowdim_driver_runs_todays_benchmark(tmp_path):
    """run.py drives today's benchmarks/retrieval.py (no copy pinned through git show):
    its registered losses train, in the closed set, and the run records the driver."""
    src = open(os.path.join(LOWDIM, "run.py")).read()
    assert '"show"' not in src and not hasattr(lowdim_run, "BENCH_COMMIT")
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(LOWDIM, "run.py"), "--dataset", "digits"]
    cmd += ["--embedding-dim", "2", "--epochs", "1", "--out", str(out), "--threads", "1"]
    cmd += ["--losses", "SparseCircleLoss,CurricularFaceLoss(paper),Softmax", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["splits"] == ["samples"] and saved["lowdim"]["driver"].endswith("run.py")
    runs = {r["loss"]: r for r in saved["losses"]}
    assert set(runs) == {"SparseCircleLoss", "CurricularFaceLoss(paper)", "Softmax"}
    for r in runs.values():
        assert not r.get("error") and 0.0 <= r["metrics"]["acc"] <= 1.0, r
    assert runs["CurricularFaceLoss(paper)"]["hparams"]["scale"] == 64.0
    assert (out / "embeddings.png").exists()
