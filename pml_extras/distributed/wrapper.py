"""Data-parallel wrappers for losses whose parameters are replicated on every rank.

PML's ``utils.distributed.DistributedLossWrapper`` all-gathers the embeddings *without*
gradient, puts the local ones first, computes the loss on the gathered batch and returns
``world_size * loss``, so that the local embeddings' gradient survives DDP's averaging.
The factor also multiplies the gradient of the loss's own parameters (proxies W, centers),
which are not averaged by anything: with N ranks each replica receives N times the
single-process gradient (``tests/test_distributed.py`` measures it). The wrappers here avoid
that while keeping PML's calling convention.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor

from . import _comm


def _check_batch(embeddings, labels, owner: str, what: str = "embeddings"):
    def check():
        if not torch.is_tensor(embeddings) or embeddings.ndim != 2:
            shape = tuple(embeddings.shape) if torch.is_tensor(embeddings) else type(embeddings)
            raise ValueError(f"{owner}: {what} must be a 2-D tensor, got {shape}")
        if labels is not None and (
            not torch.is_tensor(labels) or labels.ndim != 1 or len(labels) != len(embeddings)
        ):
            shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels)
            raise ValueError(
                f"{owner}: labels must have shape ({len(embeddings)},) to match the {what}, "
                f"got {shape}"
            )
        return embeddings.shape[0]

    return check


def _gather_batch(parts, group, owner, with_grad=True):
    """Validate and all-gather (embeddings, labels, what) triples of every rank, in rank order.

    All embeddings are gathered in one differentiable collective (one all-reduce in
    backward). The ranks agree on whether that backward collective is needed: yes if any
    rank's embeddings require grad.
    Returns ([(gathered embeddings, gathered labels, sizes) per part], needs_grad).
    """
    device = torch.device("cpu")
    for emb, _, _ in parts:
        if torch.is_tensor(emb):
            device = emb.device
            break
    local_grad = torch.is_grad_enabled() and any(
        torch.is_tensor(e) and e.requires_grad for e, _, _ in parts
    )
    all_sizes, needs_grad = [], False
    for emb, labels, what in parts:
        sizes, grad = _comm.synced_validation(
            _check_batch(emb, labels, owner, what),
            owner,
            None,
            None,
            device,
            group,
            needs_grad=local_grad,
        )
        all_sizes.append(sizes)
        needs_grad = needs_grad or grad
    needs_grad = needs_grad and with_grad and torch.is_grad_enabled()
    embs = [emb if with_grad else emb.detach() for emb, _, _ in parts]
    gathered = _comm.gather_rows_many(embs, all_sizes, group, requires_grad=needs_grad)
    out = []
    for (emb, labels, _), all_emb, sizes in zip(parts, gathered, all_sizes):
        all_labels = None
        if labels is not None:
            all_labels = _comm.gather_rows_nograd(labels.to(emb.device), sizes, group)
        out.append((all_emb, all_labels, sizes))
    return out, needs_grad


def _own_pairs(labels: Tensor, ref_labels: Tensor, offset: Optional[int]):
    """All (anchor, ref) pairs of the local batch against the references.

    With ``offset`` (the references are the gathered batch, whose rows offset..offset+B-1
    are the local samples), the self pairs (i, offset + i) are removed.
    """
    indices = lmu.get_all_pairs_indices(labels, ref_labels)
    return indices if offset is None else _drop_self_comparisons(indices, offset)


def _drop_self_comparisons(indices_tuple, offset: int):
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        keep = p != a + offset
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices_tuple
    keep = p != a1 + offset
    return a1[keep], p[keep], a2, n


class _AverageLossGradsAfterBackward(torch.autograd.Function):
    """Identity on the loss; in backward, queues an all-reduce-average of the loss params."""

    @staticmethod
    def forward(ctx, loss, wrapper):
        ctx.wrapper = wrapper
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        wrapper = ctx.wrapper
        torch.autograd.Variable._execution_engine.queue_callback(wrapper._average_loss_grads)
        return grad, None


class DistributedLossWrapper(torch.nn.Module):
    """Run a PML loss with replicated parameters under DDP with single-process gradients.

    A drop-in for ``pytorch_metric_learning.utils.distributed.DistributedLossWrapper``
    (same arguments and calling convention) for losses that own parameters or buffers
    (CenterLoss, StandaloneCenterLoss, SparseCircleLoss / CurricularFaceLoss with a
    replicated W) or none (CircleLoss). Differences from PML's wrapper:

    * the embeddings are all-gathered *with* gradient, in rank order (uneven local batch
      sizes allowed); the backward of the gather sums over ranks;
    * ``efficient=False`` (default): every rank computes the loss on the same global
      batch and returns it *unscaled*: the returned value is the single-process loss on
      the concatenated batch, the loss parameters receive exactly the single-process
      gradient on every rank (PML's wrapper gives N times it), and rank r's embeddings
      receive N * dL/dx_r, which DDP's averaging turns into the single-process model
      gradient (as with PML). Every rank computes the same update from the same inputs,
      but not always bit for bit: on CUDA, ``index_add_``/``scatter_add_`` with duplicate
      labels use atomics, so W, CenterLoss's ``update_rule="paper"`` centers and
      CurricularFace's t can drift apart by rounding, and the drift compounds. Hence the
      state synchronisation below;
    * ``efficient=True``: each rank computes the loss of its own samples against the
      gathered batch as references (PML's efficient mode; all pairs minus self pairs if no
      ``indices_tuple``). Rank r returns L_r; embeddings receive d(sum_s L_s)/dx_r; the
      loss parameters' gradients are all-reduce-averaged after backward, so they equal
      d((1/N) sum_s L_s)/dtheta on every rank. For losses that accept ``ref_emb`` only
      (not the class-level losses);
    * replicated state is kept identical, with DDP's cadence: the loss parameters'
      gradients are all-reduce-averaged after every backward (both modes), so every rank's
      optimizer applies the same update; and every ``sync_every``-th forward in training
      mode (default: every one) broadcasts the loss's parameters and buffers from group
      rank 0 first, which restores any state that drifted or was changed on one rank
      (DDP's ``broadcast_buffers`` does this for buffers). Cost per step: one all-reduce of
      the loss's gradients and one broadcast of its parameters and buffers, the same
      volume as putting the loss in DDP. ``sync_every=0``: only the first forward
      broadcasts (with ``sync_initial_state``, the default), so replicas start equal
      whatever the seeds; :meth:`sync_state` broadcasts on demand.

    Keep the wrapped loss *out of* DDP (it does not need it; putting its parameters in a
    DDP module is also correct, since DDP would average identical gradients). Miners must
    index the same rank-ordered batch: use :class:`DistributedMinerWrapper` from this
    module, not PML's (which puts the local samples first). The sharded losses of this
    package distribute themselves and must not be wrapped.

    Example::

        loss_fn = DistributedLossWrapper(CurricularFaceLoss(C, D)).to(device)
        miner = DistributedMinerWrapper(MultiSimilarityMiner())   # optional
        emb = ddp_model(x)
        loss = loss_fn(emb, y, miner(emb, y))                      # global-batch loss
        loss.backward()              # DDP averages the model; W's grad is single-process
    """

    def __init__(
        self,
        loss: BaseMetricLossFunction,
        efficient: bool = False,
        process_group=None,
        sync_initial_state: bool = True,
        sync_every: int = 1,
    ):
        super().__init__()
        from .sharded import _ShardedClassLoss

        if isinstance(loss, _ShardedClassLoss):
            raise TypeError(
                f"{type(loss).__name__} already distributes itself over ranks; "
                "call it directly instead of wrapping it"
            )
        if isinstance(loss, CrossBatchMemory):
            raise TypeError(
                "CrossBatchMemory is not supported here; use "
                "pytorch_metric_learning.utils.distributed.DistributedLossWrapper"
            )
        if not isinstance(loss, BaseMetricLossFunction):
            raise TypeError(f"loss must be a PML BaseMetricLossFunction, got {type(loss).__name__}")
        self.loss = loss
        self.efficient = bool(efficient)
        self.process_group = process_group
        self.sync_initial_state = bool(sync_initial_state)
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 0:
            raise ValueError(f"sync_every must be an int >= 0, got {sync_every!r}")
        self.sync_every = sync_every
        self._synced = False
        self._train_calls = 0  # training forwards so far (the same count on every rank)

    def sync_state(self) -> None:
        """Broadcast the loss's parameters and buffers from group rank 0 (a collective)."""
        _comm.broadcast_module_state(self.loss, self.process_group)
        self._synced = True

    def _average_loss_grads(self) -> None:
        group = self.process_group
        _, world = _comm.group_info(group)
        for p in self.loss.parameters():
            if not p.requires_grad:
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            grad = grad.contiguous()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
            p.grad = grad.div_(world)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        group = self.process_group
        rank, world = _comm.group_info(group)
        if world == 1:
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        due = self.sync_initial_state and not self._synced
        if self.training and self.sync_every:
            due = due or self._train_calls % self.sync_every == 0
            self._train_calls += 1
        if due:
            self.sync_state()
        owner = type(self).__name__
        parts = [(embeddings, labels, "embeddings")]
        if ref_emb is not None:
            parts.append((ref_emb, ref_labels, "ref_emb"))
        params_grad = torch.is_grad_enabled() and any(
            p.requires_grad for p in self.loss.parameters()
        )
        gathered, needs_grad = _gather_batch(parts, group, owner)
        all_emb, all_labels, sizes = gathered[0]
        all_ref, all_ref_labels = (None, None) if ref_emb is None else gathered[1][:2]
        if not self.efficient:
            loss = self.loss(all_emb, all_labels, indices_tuple, all_ref, all_ref_labels)
        else:
            refs, refs_labels = (
                (all_emb, all_labels) if all_ref is None else (all_ref, all_ref_labels)
            )
            if indices_tuple is None and labels is not None:
                offset = sum(sizes[:rank]) if all_ref is None else None
                indices_tuple = _own_pairs(labels.to(embeddings.device), refs_labels, offset)
            loss = self.loss(embeddings, labels, indices_tuple, refs, refs_labels)
        # Whatever the loss used, the gathered tensors stay in this rank's graph, so every
        # rank runs their backward all-reduce (see _comm.anchor).
        loss = _comm.anchor(loss, all_emb, all_ref, force=needs_grad or params_grad)
        if params_grad:
            loss = _AverageLossGradsAfterBackward.apply(loss, self)
        return loss


class DistributedMinerWrapper(torch.nn.Module):
    """Mine on the rank-ordered global batch, matching :class:`DistributedLossWrapper`.

    ``efficient=False``: the miner runs on the gathered batch; the indices refer to it
    and are identical on every rank. ``efficient=True``: the miner pairs the local
    samples with the gathered batch as references, self pairs removed; the indices are
    (local anchor, global reference) as :class:`DistributedLossWrapper` with
    ``efficient=True`` expects. (PML's wrapper orders the batch with the local samples
    first, so its indices do not fit this module's loss wrapper, and vice versa.)
    """

    def __init__(self, miner: BaseMiner, efficient: bool = False, process_group=None):
        super().__init__()
        if not isinstance(miner, BaseMiner):
            raise TypeError(f"miner must be a PML BaseMiner, got {type(miner).__name__}")
        self.miner, self.efficient, self.process_group = miner, bool(efficient), process_group

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        group = self.process_group
        rank, world = _comm.group_info(group)
        if world == 1:
            return self.miner(embeddings, labels, ref_emb, ref_labels)
        owner = type(self).__name__
        emb = embeddings.detach() if torch.is_tensor(embeddings) else embeddings
        parts = [(emb, labels, "embeddings")]
        if ref_emb is not None:
            ref = ref_emb.detach() if torch.is_tensor(ref_emb) else ref_emb
            parts.append((ref, ref_labels, "ref_emb"))
        gathered, _ = _gather_batch(parts, group, owner, with_grad=False)
        all_emb, all_labels, sizes = gathered[0]
        all_ref, all_ref_labels = (None, None) if ref_emb is None else gathered[1][:2]
        if not self.efficient:
            return self.miner(all_emb, all_labels, all_ref, all_ref_labels)
        if all_ref is not None:
            return self.miner(emb, labels, all_ref, all_ref_labels)
        indices = self.miner(emb, labels, all_emb, all_labels)
        return _drop_self_comparisons(indices, sum(sizes[:rank]))
