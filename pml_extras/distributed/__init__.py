"""Multi-process training: class-sharded losses and data-parallel loss/miner wrappers.

* :class:`ShardedSparseCircleLoss`, :class:`ShardedCurricularFaceLoss`: the class-level
  losses with W split by classes over the ranks (model parallel, Partial-FC style, with
  optional negative-class sampling). Keep them outside DDP.
* :class:`DistributedLossWrapper`, :class:`DistributedMinerWrapper`: for losses whose
  parameters are replicated (CenterLoss, StandaloneCenterLoss, CircleLoss, the
  single-GPU SparseCircleLoss / CurricularFaceLoss); unlike PML's wrapper, the loss
  parameters get the single-process gradient instead of world_size times it.
* :class:`GlobalGradScaler`: mixed precision with sharded W; every rank skips the same
  overflowing steps and keeps the same loss scale.
* :func:`reshard_checkpoints`: per-rank checkpoints of a sharded loss (W, t, sample_step,
  optimizer state) re-sharded offline to another world size, never all of W in memory.
* :func:`clip_grad_norm_`: gradient clipping by the norm of the whole gradient when some
  parameters (the W shards) differ per rank; ``torch.nn.utils.clip_grad_norm_`` on one
  rank would see only its own shard.

Gradient contract of everything here, with N ranks: the loss parameters receive the
gradient of the objective DDP optimises (the single-process loss on the concatenated
batch, for equal local batches and a mean reduction); rank r's embeddings receive N times
that gradient, which DDP's averaging of the model gradients divides back.
"""

from .amp import GlobalGradScaler
from .checkpoint import reshard_checkpoints
from .clip import clip_grad_norm_
from .sharded import ShardedCurricularFaceLoss, ShardedSparseCircleLoss, shard_ranges
from .wrapper import DistributedLossWrapper, DistributedMinerWrapper

__all__ = [
    "DistributedLossWrapper",
    "GlobalGradScaler",
    "DistributedMinerWrapper",
    "ShardedCurricularFaceLoss",
    "ShardedSparseCircleLoss",
    "clip_grad_norm_",
    "reshard_checkpoints",
    "shard_ranges",
]
