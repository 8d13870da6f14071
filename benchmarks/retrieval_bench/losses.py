"""The losses under test: one spec per loss, ``--losses`` and ``--loss-args`` parsing, and
:class:`Method`, the trainable loss-side module a model is trained with.

Every loss is built from its spec with the benchmark's defaults, updated by the user's
``--loss-args`` (``'SparseCircleLoss:m=0.4,gamma=80;ArcFaceLoss:margin=28.6'``; a key
``miner.NAME`` goes to the loss's miner). Keys are checked against the constructor's
signature (and its PML base classes') before anything trains; the values used are recorded.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LossSpec",
    "LOSSES",
    "Method",
    "build_method",
    "parse_losses",
    "parse_loss_args",
    "accepted_kwargs",
    "preload",
    "check_range",
    "RANGES",
]


class Method(nn.Module):
    """One loss under test: trainable loss-side modules + how to score classification.

    ``forward(emb, labels)`` returns the scalar training loss. ``classifiers`` maps an accuracy
    column (``"acc"`` = argmax of the loss's logits / linear classifier, ``"center_acc"`` =
    nearest center) to a function embeddings -> logits. ``normalize_eval``: retrieval uses
    L2-normalised embeddings (cosine geometry) for losses that normalise internally.
    """

    def __init__(
        self,
        loss: Optional[nn.Module],
        miner: Optional[nn.Module] = None,
        classifier: Optional[nn.Module] = None,
        aux_weight: float = 1.0,
        normalize_eval: bool = True,
        classifiers: Optional[Dict[str, Callable]] = None,
        hparams: Optional[dict] = None,
    ):
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.classifier = classifier
        self.aux_weight = aux_weight
        self.normalize_eval = normalize_eval
        self.classifiers = classifiers or {}
        self.hparams = hparams or {}

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.classifier is not None:  # TrainWithClassifier-style: CE on a linear head
            total = F.cross_entropy(self.classifier(emb), labels)
            if self.loss is not None:
                total = total + self.aux_weight * self.loss(emb, labels)
            return total
        indices_tuple = self.miner(emb, labels) if self.miner is not None else None
        return self.loss(emb, labels, indices_tuple)


def _ours(name: str):
    def get():
        try:
            from pml_extras import losses as ours
        except Exception as e:
            raise RuntimeError(f"cannot import pml_extras.losses ({type(e).__name__}: {e})") from e
        cls = getattr(ours, name, None)
        if cls is None:
            raise RuntimeError(f"pml_extras.losses has no {name} (not implemented yet?)")
        return cls

    return get


def preload(names: List[str]) -> None:
    """Import the losses' modules once, before the first run, so that every run of a long
    benchmark uses the same code even if the files change meanwhile (a failure is left for
    the loss's own run to report)."""
    if any(LOSSES[n].source == "ours" for n in names):
        try:
            import pml_extras.losses  # noqa: F401
        except Exception:
            pass
    import pytorch_metric_learning.losses  # noqa: F401
    import pytorch_metric_learning.miners  # noqa: F401


def _pml(module: str, name: str):
    def get():
        import importlib

        return getattr(importlib.import_module(f"pytorch_metric_learning.{module}"), name)

    return get


@dataclass
class LossSpec:
    """How to build one loss under test.

    ``kind``: ``proxy`` (class-proxy loss with ``get_logits``: num_classes, embedding_size
    first), ``pair`` (pair/triplet loss + miner), ``center_softmax`` (linear classifier with
    cross-entropy + ``weight_cent`` x center loss), ``center`` (center loss alone, scored by
    nearest center), ``softmax`` (linear classifier alone).
    """

    source: str
    kind: str
    aliases: Tuple[str, ...]
    loss_cls: Optional[Callable[[], type]] = None
    defaults: Dict[str, object] = field(default_factory=dict)
    miner_cls: Optional[Callable[[], type]] = None
    miner_defaults: Dict[str, object] = field(default_factory=dict)
    extras: Dict[str, object] = field(default_factory=dict)  # builder options, not the loss's
    builder: Optional[Callable[..., Method]] = None  # overrides the kind's builder (tests)


LOSSES: Dict[str, LossSpec] = {
    "SparseCircleLoss": LossSpec(
        "ours",
        "proxy",
        ("sparsecircle", "circle-class"),
        _ours("SparseCircleLoss"),
        {"m": 0.4, "gamma": 80},
    ),
    "CurricularFaceLoss": LossSpec(
        "ours",
        "proxy",
        ("curricularface",),
        _ours("CurricularFaceLoss"),
        {"margin": 0.5, "scale": 64.0, "momentum": 0.01},
    ),
    "CenterLoss+Softmax": LossSpec(
        "ours",
        "center_softmax",
        ("centerloss", "center"),
        _ours("CenterLoss"),
        {"update_rule": "gradient"},
        extras={"weight_cent": 1.0},
    ),
    "StandaloneCenterLoss": LossSpec(
        "ours",
        "center",
        ("standalone",),
        _ours("StandaloneCenterLoss"),
        {"intra_weight": 1.0, "inter_weight": 0.1},
    ),
    "CircleLoss": LossSpec(
        "PML",
        "pair",
        ("circle", "circle-pair"),
        _pml("losses", "CircleLoss"),
        {"m": 0.4, "gamma": 80},
        _pml("miners", "MultiSimilarityMiner"),
        {"epsilon": 0.1},
    ),
    "ArcFaceLoss": LossSpec(
        "PML",
        "proxy",
        ("arcface",),
        _pml("losses", "ArcFaceLoss"),
        {"margin": 28.6, "scale": 64},
    ),
    "CosFaceLoss": LossSpec(
        "PML",
        "proxy",
        ("cosface",),
        _pml("losses", "CosFaceLoss"),
        {"margin": 0.35, "scale": 64},
    ),
    "MultiSimilarityLoss": LossSpec(
        "PML",
        "pair",
        ("multisimilarity", "ms"),
        _pml("losses", "MultiSimilarityLoss"),
        {"alpha": 2, "beta": 50, "base": 0.5},
        _pml("miners", "MultiSimilarityMiner"),
        {"epsilon": 0.1},
    ),
    "TripletMarginLoss": LossSpec(
        "PML",
        "pair",
        ("triplet", "tripletmargin"),
        _pml("losses", "TripletMarginLoss"),
        {"margin": 0.2},
        _pml("miners", "TripletMarginMiner"),
        {"margin": 0.2, "type_of_triplets": "semihard"},
    ),
    "Softmax": LossSpec("PML", "softmax", ("softmax", "xent", "ce", "crossentropy")),
}

# set by the benchmark itself, never by --loss-args
_FIXED = ("self", "num_classes", "embedding_size")

# Sign and range of the numeric hyperparameters the losses under test take: a wrong sign is
# accepted by the constructors and trains silently to a meaningless number (a negative scale
# flips the softmax), so it is refused before anything trains. (low, high, low_open,
# high_open); None = unbounded.
RANGES: Dict[str, Tuple[Optional[float], Optional[float], bool, bool]] = {
    "scale": (0.0, None, True, False),
    "gamma": (0.0, None, True, False),
    "alpha": (0.0, None, True, False),
    "beta": (0.0, None, True, False),
    "margin": (0.0, None, False, False),
    "m": (0.0, None, False, False),
    "epsilon": (0.0, None, False, False),
    "base": (None, None, False, False),
    "weight_cent": (0.0, None, False, False),
    "intra_weight": (0.0, None, False, False),
    "inter_weight": (0.0, None, False, False),
    "momentum": (0.0, 1.0, False, False),
}


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_range(loss: str, key: str, value, where: str = "") -> None:
    """SystemExit naming the loss, the argument and the value when ``value`` is outside the
    documented range of ``key`` (or is not a number where one is expected)."""
    rng = RANGES.get(key)
    if rng is None:
        return
    lo, hi, lo_open, hi_open = rng
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SystemExit(f"--loss-args: {loss}: {where}{key}={value!r} is not a number")
    v = float(value)
    bad = v != v  # NaN
    if lo is not None:
        bad = bad or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        raise SystemExit(
            f"--loss-args: {loss}: {where}{key}={value!r} is out of range; "
            f"{key} must be {_range_text(lo, hi, lo_open, hi_open)}"
        )


def accepted_kwargs(cls: type) -> List[str]:
    """Keyword arguments ``cls(...)`` accepts: its ``__init__``'s named parameters and, while
    each level forwards ``**kwargs``, those of its base classes (PML's mixins take reducer,
    distance, regularizers, ...)."""
    names: List[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass in (nn.Module, object):
            break
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _FIXED:
                if p.name not in names:
                    names.append(p.name)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _lookup() -> Dict[str, str]:
    table = {}
    for name, spec in LOSSES.items():
        for key in (name, *spec.aliases):
            table[key.lower()] = name
    return table


def parse_losses(spec: str) -> List[str]:
    """Comma list of loss names/aliases (case-insensitive) or groups ``all``/``ours``/``pml``."""
    lookup = _lookup()
    out: List[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        low = tok.lower()
        if low == "all":
            names = list(LOSSES)
        elif low in ("ours", "pml"):
            names = [n for n, s in LOSSES.items() if s.source.lower() == low]
        elif low in lookup:
            names = [lookup[low]]
        else:
            raise SystemExit(
                f"--losses: unknown loss {tok!r}; choose from all, ours, pml, " + ", ".join(LOSSES)
            )
        out += [n for n in names if n not in out]
    if not out:
        raise SystemExit("--losses: empty list")
    return out


def _value(text: str):
    """A Python literal (0.4, 80, True, None, 'x') or else the bare string (semihard)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_loss_args(spec: Optional[str]) -> Dict[str, Dict[str, Dict[str, object]]]:
    """``'Loss:k=v,k=v;Other:miner.k=v'`` -> ``{loss: {"loss": {...}, "miner": {...},
    "extras": {...}}}``, every key checked against what that loss (or its miner) accepts.

    Loss names take the same aliases as ``--losses``. Errors name the loss and the argument.
    """
    out: Dict[str, Dict[str, Dict[str, object]]] = {}
    if not spec or not spec.strip():
        return out
    lookup = _lookup()
    for entry in (e.strip() for e in spec.split(";")):
        if not entry:
            continue
        if ":" not in entry:
            raise SystemExit(
                f"--loss-args: {entry!r} is not of the form 'LossName:key=value,key=value'"
            )
        raw_name, body = entry.split(":", 1)
        name = lookup.get(raw_name.strip().lower())
        if name is None:
            raise SystemExit(
                f"--loss-args: unknown loss {raw_name.strip()!r}; choose from " + ", ".join(LOSSES)
            )
        lspec = LOSSES[name]
        parsed = out.setdefault(name, {"loss": {}, "miner": {}, "extras": {}})
        for item in (i.strip() for i in body.split(",")):
            if not item:
                continue
            if "=" not in item:
                raise SystemExit(f"--loss-args: {name}: {item!r} is not key=value")
            key, val = (s.strip() for s in item.split("=", 1))
            if key.startswith("miner."):
                key = key[len("miner.") :]
                if lspec.miner_cls is None:
                    raise SystemExit(f"--loss-args: {name} has no miner (got miner.{key})")
                allowed = accepted_kwargs(lspec.miner_cls())
                if key not in allowed:
                    raise SystemExit(
                        f"--loss-args: {name}'s miner {lspec.miner_cls().__name__} has no "
                        f"argument {key!r}; it accepts: {', '.join(allowed)}"
                    )
                parsed["miner"][key] = _value(val)
                check_range(name, key, parsed["miner"][key], where="miner.")
                continue
            if key in lspec.extras:
                parsed["extras"][key] = _value(val)
                check_range(name, key, parsed["extras"][key])
                continue
            allowed = accepted_kwargs(lspec.loss_cls()) if lspec.loss_cls is not None else []
            allowed_all = list(lspec.extras) + allowed
            if key not in allowed:
                what = f"accepts: {', '.join(allowed_all)}" if allowed_all else "takes no arguments"
                raise SystemExit(f"--loss-args: {name} has no argument {key!r}; it {what}")
            parsed["loss"][key] = _value(val)
            check_range(name, key, parsed["loss"][key])
    # construct each once (tiny sizes, CPU) so a bad value fails now, not after training others
    for name, parsed in out.items():
        try:
            build_method(name, 2, 2, parsed)
        except Exception as e:
            raise SystemExit(
                f"--loss-args: {name} rejects {_describe(parsed)}: {type(e).__name__}: {e}"
            ) from e
    return out


def _describe(parsed: Dict[str, Dict[str, object]]) -> str:
    items = [f"{k}={v!r}" for k, v in {**parsed["loss"], **parsed["extras"]}.items()]
    items += [f"miner.{k}={v!r}" for k, v in parsed["miner"].items()]
    return ", ".join(items)


def build_method(
    name: str,
    num_classes: int,
    embedding_dim: int,
    overrides: Optional[Dict[str, Dict[str, object]]] = None,
) -> Method:
    """Build loss ``name`` for ``num_classes`` training classes at ``embedding_dim``, with the
    spec's defaults updated by ``overrides`` (one entry of :func:`parse_loss_args`)."""
    spec = LOSSES[name]
    overrides = overrides or {}
    kw = {**spec.defaults, **overrides.get("loss", {})}
    mkw = {**spec.miner_defaults, **overrides.get("miner", {})}
    extras = {**spec.extras, **overrides.get("extras", {})}
    c, d = num_classes, embedding_dim
    if spec.builder is not None:
        return spec.builder(c, d)
    hp: Dict[str, object] = {**kw, **extras}
    if spec.kind == "proxy":
        loss = spec.loss_cls()(c, d, **kw)
        return Method(loss, classifiers={"acc": loss.get_logits}, hparams=hp)
    if spec.kind == "pair":
        miner_cls = spec.miner_cls()
        margs = ", ".join(f"{k}={v!r}" for k, v in mkw.items())
        hp["miner"] = f"{miner_cls.__name__}({margs})"
        return Method(spec.loss_cls()(**kw), miner=miner_cls(**mkw), hparams=hp)
    if spec.kind == "center_softmax":
        center = spec.loss_cls()(c, d, **kw)
        clf = nn.Linear(d, c)
        return Method(
            center,
            classifier=clf,
            aux_weight=float(extras["weight_cent"]),
            normalize_eval=False,
            classifiers={"acc": clf, "center_acc": center.get_logits},
            hparams=hp,
        )
    if spec.kind == "center":
        loss = spec.loss_cls()(c, d, **kw)
        return Method(
            loss, normalize_eval=False, classifiers={"center_acc": loss.get_logits}, hparams=hp
        )
    if spec.kind == "softmax":
        clf = nn.Linear(d, c)
        return Method(None, classifier=clf, normalize_eval=False, classifiers={"acc": clf})
    raise ValueError(f"{name}: unknown loss kind {spec.kind!r}")
