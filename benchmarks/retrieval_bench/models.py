"""Embedding models: the small MLP/CNN for in-memory images, and ResNet-18/50 backbones
(torchvision's; our torchvision-compatible copy where torchvision does not import) followed
by a linear embedding layer of ``--embedding-dim``.

Backbone weights: ``--weights FILE`` (a local state_dict of the torchvision model, or of the
whole embedding model), ``--pretrained`` (torchvision's ImageNet weights through its own
cache, which may download on the user's machine), or random initialisation.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["MODELS", "make_model", "import_torchvision", "EmbeddingNet"]

MODELS = ("mlp", "cnn", "resnet18", "resnet50")
RESNET_FEATURES = {"resnet18": 512, "resnet50": 2048}


def import_torchvision():
    """torchvision, or None where it is missing or fails to import. A torchvision built for
    another torch raises RuntimeError ('operator torchvision::nms does not exist'), not
    ImportError, so everything is caught."""
    try:
        import torchvision
        import torchvision.models  # noqa: F401

        return torchvision
    except Exception:
        return None


class EmbeddingNet(nn.Module):
    """``backbone`` (features, its classifier removed) -> Linear(features, embedding_dim)."""

    def __init__(self, backbone: nn.Module, features: int, embedding_dim: int, channels: int):
        super().__init__()
        self.backbone = backbone
        self.embedding = nn.Linear(features, embedding_dim)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:  # grey images through an RGB backbone
            x = x.expand(-1, 3, -1, -1)
        return self.embedding(self.backbone(x))


def _resnet(kind: str, pretrained: bool) -> Tuple[nn.Module, str]:
    tv = import_torchvision()
    if tv is not None:
        weights = "DEFAULT" if pretrained else None
        return getattr(tv.models, kind)(weights=weights), f"torchvision {tv.__version__}"
    if pretrained:
        raise SystemExit(
            f"--pretrained needs torchvision's weights, but torchvision does not import here; "
            f"pass a saved torchvision {kind} state_dict with --weights FILE instead"
        )
    from . import resnet

    return getattr(resnet, kind)(), "benchmarks/retrieval_bench/resnet.py (torchvision layout)"


def _load_weights(model: EmbeddingNet, path: str) -> str:
    if not os.path.isfile(path):
        raise SystemExit(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"--weights {path}: cannot read a state_dict ({e})") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SystemExit(f"--weights {path}: expected a state_dict, got {type(state).__name__}")
    whole = any(k.startswith("backbone.") for k in state)  # a saved EmbeddingNet
    target = "embedding model" if whole else "backbone"
    if not whole:  # a torchvision backbone; its fc is not used
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = (model if whole else model.backbone).load_state_dict(
            state, strict=False
        )
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise SystemExit(
            f"--weights {path}: does not match the {target}: {first[0].strip()}"
        ) from None
    missing = [k for k in missing if not k.startswith(("fc.", "embedding."))]
    if missing or unexpected:
        raise SystemExit(
            f"--weights {path}: does not match the {target}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    return f"{target} from {path}"


def make_model(
    kind: str,
    image_shape: Sequence[int],
    embedding_dim: int,
    weights: Optional[str] = None,
    pretrained: bool = False,
) -> Tuple[nn.Module, dict]:
    """Build an embedding model; returns ``(model, info)`` (implementation, weights).

    ``mlp``: flatten -> 128 -> emb for inputs of <= 256 values (digits: 64 -> 128 -> emb),
    else flatten -> 256 -> 128 -> emb (28x28: 784 -> 256 -> 128 -> emb).
    ``cnn``: two 3x3 conv blocks (16, 32 channels, max-pool) -> 128 -> emb; closer to the
    seeds' CNNs but ~15x slower than the MLP on a CPU.
    ``resnet18`` / ``resnet50``: the ImageNet ResNet, its fc replaced by Linear(512 or 2048,
    emb); grey inputs are repeated to 3 channels.
    """
    c, h, w = image_shape
    if kind in ("mlp", "cnn") and (weights or pretrained):
        raise SystemExit(f"--weights/--pretrained apply to the resnet models, not {kind}")
    if kind == "mlp":
        d = c * h * w
        hidden = [128] if d <= 256 else [256, 128]
        layers: List[nn.Module] = [nn.Flatten()]
        for hdim in hidden:
            layers += [nn.Linear(d, hdim), nn.BatchNorm1d(hdim), nn.ReLU()]
            d = hdim
        layers.append(nn.Linear(d, embedding_dim))
        return nn.Sequential(*layers), {"implementation": "mlp", "weights": "random"}
    if kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, embedding_dim),
        )
        return model, {"implementation": "cnn", "weights": "random"}
    if kind in RESNET_FEATURES:
        if c not in (1, 3):
            raise SystemExit(f"--model {kind} needs 1- or 3-channel images, got {c} channels")
        if weights and pretrained:
            raise SystemExit("--weights and --pretrained exclude each other")
        backbone, impl = _resnet(kind, pretrained)
        backbone.fc = nn.Identity()
        model = EmbeddingNet(backbone, RESNET_FEATURES[kind], embedding_dim, c)
        info = {
            "implementation": impl,
            "weights": "torchvision DEFAULT (ImageNet)" if pretrained else "random",
        }
        if weights:
            info["weights"] = _load_weights(model, weights)
        return model, info
    raise ValueError(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")


def model_for(args, image_shape: Sequence[int]) -> Tuple[nn.Module, dict]:
    """:func:`make_model` with the command line's choices (``--model``,
    ``--embedding-dim``, and ``--weights`` / ``--pretrained`` where the options have
    them): the one place the training runs and the untrained baseline build their model,
    so that both start from the same network."""
    return make_model(
        args.model,
        image_shape,
        args.embedding_dim,
        weights=getattr(args, "weights", None),
        pretrained=getattr(args, "pretrained", False),
    )
