"""tools/behaviour_snapshot.py: the same code twice is bit-identical; a change is named."""

import importlib.util
import pathlib

import pytest
import torch

import pml_extras.losses as L

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "behaviour_snapshot", ROOT / "tools" / "behaviour_snapshot.py"
)
snap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(snap)

# A tiny configuration: one module loss with a miner, one functional loss, one sharded
# loss, the clip helper; two steps.
TINY = [
    "losses.SparseCircleLoss.plain.miner",
    "functional.cosface_loss",
    "distributed.ShardedCurricularFaceLoss.default",
    "distributed.clip_grad_norm_",
]


def test_every_public_loss_has_a_case():
    names = list(snap.all_cases())
    public = [*L.__all__, "ShardedSparseCircleLoss", "ShardedCurricularFaceLoss"]
    for name in public:
        if name.endswith("_") or name.startswith("Base"):
            continue  # init functions: run by the "auto" cases; the base: by every loss
        assert any(f".{name}." in n for n in names), name
    import pml_extras.functional as F

    for name in F.__all__:
        assert any(name in n or n == "functional.targets" for n in names), name


def test_snapshot_twice_is_identical(tmp_path):
    a = snap.snapshot(TINY, steps=2)
    b = snap.snapshot(TINY, steps=2)
    assert {k.split("/")[0] for k in a} >= set(TINY)
    assert len(a) > 20
    assert snap.compare(a, b) == []
    assert snap.digest(a) == snap.digest(b)
    # Through the command line, as the report's figures were made.
    before, after = tmp_path / "a.pt", tmp_path / "b.pt"
    for path in (before, after):
        assert snap.main(["snapshot", str(path), "--only", *TINY, "--steps", "2"]) == 0
    assert snap.main(["compare", str(before), str(after)]) == 0


def test_a_perturbed_loss_is_named(monkeypatch, tmp_path, capsys):
    before = snap.snapshot(TINY[:1], steps=2)
    original = L.SparseCircleLoss.compute_loss

    def perturbed(self, *args):
        out = original(self, *args)
        out["loss"]["losses"] = out["loss"]["losses"] * (1.0 + 2.0**-12)
        return out

    monkeypatch.setattr(L.SparseCircleLoss, "compute_loss", perturbed)
    after = snap.snapshot(TINY[:1], steps=2)
    lines = snap.compare(before, after)
    key = "losses.SparseCircleLoss.plain.miner/step0.loss"
    assert any(line.startswith(key + ":") for line in lines), lines
    assert any("/step0.grad.emb:" in line for line in lines), lines
    assert any("/step1.grad.W:" in line for line in lines), lines
    assert any("/state.W:" in line for line in lines), lines
    torch.save(before, tmp_path / "a.pt")
    torch.save(after, tmp_path / "b.pt")
    assert snap.main(["compare", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]) == 1
    assert key in capsys.readouterr().out


def test_compare_names_missing_new_dtype_and_nan_changes():
    base = {
        "a/x": torch.tensor([1.0, float("nan")]),
        "a/y": torch.zeros(2),
        "a/z": torch.ones(3),
    }
    same = {k: v.clone() for k, v in base.items()}
    assert snap.compare(base, same) == []  # NaN at the same place counts as equal
    other = dict(same)
    other["a/x"] = torch.tensor([1.0, 2.0])
    other["a/y"] = torch.zeros(2, dtype=torch.float64)
    del other["a/z"]
    other["a/w"] = torch.ones(1)
    lines = snap.compare(base, other)
    assert lines == [
        "missing in the second file: a/z",
        "new in the second file: a/w",
        "a/x: 1 of 2 values differ (max |diff| 0)",
        "a/y: torch.float32(2,) became torch.float64(2,)",
    ]


@pytest.mark.parametrize("case", ["losses.CurricularFaceLoss.eval"])
def test_eval_mode_case_keeps_buffers(case):
    # The recorded state of an eval-mode CurricularFace has t untouched (buffers update
    # only in training mode), so a snapshot would catch a loss that updates it.
    out = snap.snapshot([case], steps=2)
    assert torch.equal(out[f"{case}/state.t"], torch.zeros(1))
