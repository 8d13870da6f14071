"""Stateless losses: tensors in, per-sample losses out. The modules in
:mod:`pml_extras.losses` are thin PML wrappers around these."""

# Numerics helpers shared with pml_extras.distributed (public names, not losses).
from ._numerics import masked_logsumexp, working_dtype  # noqa: F401
from .center import center_distances, center_loss, center_update, standalone_center_loss
from .circle import circle_target_logit, class_circle_loss, sparse_circle_loss
from .curricular import curricular_face_loss, curricular_target, update_t
from .margin import arcface_loss, arcface_target, cosface_loss, cosface_target

__all__ = [
    "arcface_loss",
    "arcface_target",
    "center_distances",
    "center_loss",
    "center_update",
    "circle_target_logit",
    "class_circle_loss",
    "cosface_loss",
    "cosface_target",
    "curricular_face_loss",
    "curricular_target",
    "sparse_circle_loss",
    "standalone_center_loss",
    "update_t",
]
