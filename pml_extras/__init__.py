"""pml-extras: metric-learning losses that pytorch-metric-learning lacks, as native PML losses."""

from . import functional, losses

__version__ = "0.1.0"

__all__ = ["functional", "losses", "__version__"]
