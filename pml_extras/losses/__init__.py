"""PML-native losses. Each subclasses ``pytorch_metric_learning.losses.BaseMetricLossFunction``."""

from ._low_dim import auto_proxy_init_
from ._spread import spread_init_
from .arcface_loss import ArcFaceLoss
from .base_proxy_loss import BaseProxyLoss  # noqa: F401  (for contributors; not a loss)
from .center_loss import CenterLoss
from .circle_loss import CircleLoss
from .cosface_loss import CosFaceLoss
from .curricular_face_loss import CurricularFaceLoss
from .sparse_circle_loss import SparseCircleLoss
from .standalone_center_loss import StandaloneCenterLoss

__all__ = [
    "ArcFaceLoss",
    "CenterLoss",
    "CircleLoss",
    "CosFaceLoss",
    "CurricularFaceLoss",
    "SparseCircleLoss",
    "StandaloneCenterLoss",
    "auto_proxy_init_",
    "spread_init_",
]
