"""Backbones, mixed precision and k-NN selection of the retrieval benchmark (CPU only).

Our ResNet (used where torchvision does not import, as beside the CPU torch build CI runs)
is checked against torchvision's own module source: its files are loaded without
torchvision's package __init__, which is what fails to import (it registers C++ operators
its extension cannot provide here); models/resnet.py needs none of them."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)

import retrieval  # noqa: E402
from _retrieval_fixtures import make_folder  # noqa: E402
from retrieval_bench import evaluation as ev  # noqa: E402
from retrieval_bench import models, resnet, training  # noqa: E402
from retrieval_bench.data import ArraySource  # noqa: E402


def _torchvision_resnet_module():
    """torchvision/models/resnet.py from the installed torchvision files, or None."""
    tv = models.import_torchvision()
    if tv is not None:
        from torchvision.models import resnet as tv_resnet

        return tv_resnet
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    saved = {
        k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")
    }
    for k in saved:
        del sys.modules[k]
    pkg = types.ModuleType("torchvision")
    pkg.__path__ = [os.path.dirname(spec.origin)]
    sys.modules["torchvision"] = pkg
    try:
        from torchvision.models import resnet as tv_resnet

        return tv_resnet
    except Exception:
        return None
    finally:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules.update(saved)


TV_RESNET = _torchvision_resnet_module()


@pytest.mark.skipif(TV_RESNET is None, reason="torchvision's files are not installed")
@pytest.mark.parametrize("kind", ["resnet18", "resnet50"])
def test_our_resnet_is_torchvisions(kind):
    torch.manual_seed(0)
    theirs = getattr(TV_RESNET, kind)(weights=None).eval()
    ours = getattr(resnet, kind)().eval()
    a = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b  # same names and shapes: torchvision checkpoints load as is
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ours.double()(x), theirs.double()(x), rtol=1e-10, atol=1e-10)
    # the same initialisation rule (kaiming fan_out for convs, BN 1/0): same statistics
    torch.manual_seed(1)
    w_ours = getattr(resnet, kind)().layer3[0].conv2.weight
    torch.manual_seed(1)
    w_theirs = getattr(TV_RESNET, kind)(weights=None).layer3[0].conv2.weight
    assert w_ours.std().item() == pytest.approx(w_theirs.std().item(), rel=0.05)


def test_resnet_embedding_model_and_weights_file(tmp_path):
    model, info = models.make_model("resnet18", (3, 32, 32), 7)
    assert info["weights"] == "random"
    out = model.eval()(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 7)
    grey, _ = models.make_model("resnet18", (1, 32, 32), 5)
    assert grey.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    # a torchvision-style backbone state_dict (with its fc) loads into the backbone
    torch.manual_seed(3)
    donor = resnet.resnet18()
    path = str(tmp_path / "r18.pth")
    torch.save(donor.state_dict(), path)
    loaded, info = models.make_model("resnet18", (3, 32, 32), 7, weights=path)
    assert "backbone" in info["weights"]
    torch.testing.assert_close(loaded.backbone.conv1.weight, donor.conv1.weight)
    # a whole saved embedding model loads too
    path2 = str(tmp_path / "emb.pth")
    torch.save(loaded.state_dict(), path2)
    again, info = models.make_model("resnet18", (3, 32, 32), 7, weights=path2)
    torch.testing.assert_close(again.embedding.weight, loaded.embedding.weight)
    # wrong architecture, missing file, weights on a small model: clear errors
    torch.save(resnet.resnet50().state_dict(), str(tmp_path / "r50.pth"))
    with pytest.raises(SystemExit, match="does not match the backbone"):
        models.make_model("resnet18", (3, 32, 32), 7, weights=str(tmp_path / "r50.pth"))
    with pytest.raises(SystemExit, match="no such file"):
        models.make_model("resnet18", (3, 32, 32), 7, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(SystemExit, match="resnet"):
        models.make_model("mlp", (1, 8, 8), 7, weights=path)


def test_pretrained_without_torchvision_says_what_to_do(monkeypatch):
    monkeypatch.setattr(models, "import_torchvision", lambda: None)
    with pytest.raises(SystemExit, match="--weights FILE"):
        models.make_model("resnet50", (3, 32, 32), 8, pretrained=True)


# ------------------------------------------------------------------------------------------
# mixed precision and batched embedding (autocast on CPU)
# ------------------------------------------------------------------------------------------


def _model_and_source(kind, shape, dim, n):
    """A seeded ``kind`` model and n random inputs of ``shape`` as an ArraySource."""
    torch.manual_seed(0)
    model, _ = models.make_model(kind, shape, dim)
    x = torch.randn(n, *shape)
    return model, x, ArraySource(x.numpy(), np.zeros(n, dtype=np.int64))


def test_embed_batches_match_one_pass():
    model, x, src = _model_and_source("cnn", (1, 12, 12), 6, 37)
    model.train()
    cpu = torch.device("cpu")
    batched = ev.embed(model, src.eval_batches(5, cpu), cpu)
    assert model.training  # embed restores the mode
    model.eval()
    with torch.no_grad():
        whole = model(x)
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-6)
    assert not batched.requires_grad and batched.dtype == torch.float32


def test_embed_under_bf16_autocast():
    model, x, src = _model_and_source("mlp", (1, 8, 8), 16, 50)
    model.eval()
    cpu = torch.device("cpu")
    amp = ev.embed(model, src.eval_batches(16, cpu), cpu, amp="bf16")
    ref = ev.embed(model, src.eval_batches(16, cpu), cpu)
    assert amp.dtype == torch.float32  # cast back for the k-NN
    assert not torch.equal(amp, ref)  # the matmuls really ran in bf16 ...
    torch.testing.assert_close(amp, ref, rtol=0.05, atol=0.05)  # ... to bf16 accuracy
    assert next(model.parameters()).dtype == torch.float32  # the user's weights untouched


def test_fp16_gradscaler_only_for_fp16():
    cpu = torch.device("cpu")
    assert training.make_scaler(cpu, None) is None
    assert training.make_scaler(cpu, "bf16") is None
    assert isinstance(training.make_scaler(cpu, "fp16"), torch.amp.GradScaler)


def _train_digits(losses, epochs, amp, out):
    """The retrieval benchmark on digits' sample split, quietly, with ``--amp amp``."""
    return retrieval.main(
        ["--losses", losses, "--epochs", str(epochs), "--amp", amp, "--split", "samples"]
        + ["--no-progress", "--no-plots", "--out", str(out)]
    )


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_under_autocast_on_cpu(tmp_path, amp):
    out = str(tmp_path / amp)
    res = _train_digits("sparsecircle,triplet,softmax", 2, amp, out)
    assert res["config"]["amp"] == amp
    for r in res["losses"]:
        assert r["diverged"] is None and not r.get("error"), r
        assert r["metrics"]["precision_at_1"] > 0.5, r["loss"]  # digits, 10 classes
    with open(os.path.join(out, "results.md")) as f:
        assert f"AMP {amp}" in f.read()


def test_amp_changes_the_numbers(tmp_path):
    """The --amp flag reaches the training loop (bf16 and fp32 runs differ)."""
    runs = {}
    for amp in ("none", "bf16"):
        runs[amp] = _train_digits("softmax", 1, amp, tmp_path / amp)["losses"][0]
    assert runs["none"]["epoch_losses"] != runs["bf16"]["epoch_losses"]
    assert math.isclose(
        runs["none"]["epoch_losses"][0], runs["bf16"]["epoch_losses"][0], rel_tol=0.05
    )


# ------------------------------------------------------------------------------------------
# k-NN on a GPU: never faiss on the CPU behind the GPU's back
# ------------------------------------------------------------------------------------------


class _FakeFaiss(types.ModuleType):
    def __init__(self, gpus):
        super().__init__("faiss")
        self._gpus = gpus
        self.__version__ = "fake"

    def get_num_gpus(self):
        return self._gpus


@pytest.mark.parametrize(
    "gpus, backend, expected",
    [(1, "auto", "faiss-gpu"), (0, "auto", "pml-customknn"), (0, "faiss", "faiss-cpu")],
)
def test_knn_choice_on_cuda(monkeypatch, gpus, backend, expected):
    monkeypatch.setitem(sys.modules, "faiss", _FakeFaiss(gpus))
    cuda = torch.device("cuda", 0)  # only the choice is made; nothing runs on it
    knn, dev, name = ev.select_knn(cuda, backend)
    assert name == expected
    assert dev.type == ("cpu" if expected == "faiss-cpu" else "cuda")


def test_knn_on_cuda_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    _, dev, name = ev.select_knn(torch.device("cuda"))
    assert name == "pml-customknn" and dev.type == "cuda"


# ------------------------------------------------------------------------------------------
# end to end: random-init ResNet-18 on 64x64 image files through the DataLoader
# ------------------------------------------------------------------------------------------


def test_end_to_end_resnet18_on_image_folder(tmp_path):
    data = tmp_path / "imgs"
    make_folder(str(data), [f"class_{i}" for i in range(4)], per_class=8, size=(64, 64))
    out = str(tmp_path / "out")
    res = retrieval.main(
        [
            "--dataset",
            "folder",
            "--data-dir",
            str(data),
            "--model",
            "resnet18",
            "--image-size",
            "64",
            "--embedding-dim",
            "16",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "2",
            "--threads",
            "1",  # torch is loaded before retrieval.py can set OMP_WAIT_POLICY
            "--split",
            "both",
            "--losses",
            "sparsecircle",
            "--no-progress",
            "--out",
            out,
        ]
    )
    assert res["splits"] == ["samples", "classes"]
    # a folder has no official class split: the seed draws the training half
    # (protocol.class_partition(4, partition_seed=0) == ([0, 2], [1, 3]))
    assert res["protocols"]["classes"]["train_classes"] == ["class_0", "class_2"]
    assert res["protocols"]["classes"]["class_names"] == ["class_1", "class_3"]
    assert res["protocols"]["classes"]["n_test"] == 16
    for r in res["losses"]:
        assert not r.get("error") and r["diverged"] is None, r
        assert r["model"]["implementation"]  # torchvision or our copy, recorded
        assert r["steps_per_epoch"] >= 1 and r["epochs_completed"] == 1
        for k in ev.METRICS:
            assert 0.0 <= r["metrics"][k] <= 1.0
        assert ("acc" in r["metrics"]) == (
            r["split"] == "samples" and r["loss"] != "TripletMarginLoss"
        )
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["config"]["model"] == "resnet18"
    for f in ("results.md", "loss_curves.png", "metrics.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
