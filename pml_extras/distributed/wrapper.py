"""Data-parallel wrappers for losses whose parameters are replicated on every rank.

PML's ``utils.distributed.DistributedLossWrapper`` all-gathers the embeddings *without*
gradient, puts the local ones first, computes the loss on the gathered batch and returns
``world_size * loss``, so that the local embeddings' gradient survives DDP's averaging.
The factor also multiplies the gradient of the loss's own parameters (proxies W, centers),
which are not averaged by anything: with N ranks each replica receives N times the
single-process gradient (``tests/distributed/test_wrapper_gradients.py`` measures it). The
wrappers here avoid that while keeping PML's calling convention.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.miners import BaseMiner
from torch import Tensor

from ..ops.class_lse import IMPLS
from . import _comm


def _check_part(emb, labels, owner: str, what: str, label_what: str) -> int:
    if not torch.is_tensor(emb) or emb.ndim != 2:
        shape = tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__
        raise ValueError(f"{owner}: {what} must be a 2-D tensor, got {shape}")
    if labels is not None and (
        not torch.is_tensor(labels) or labels.ndim != 1 or len(labels) != len(emb)
    ):
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(
            f"{owner}: {label_what} must have shape ({len(emb)},) to match the {what}, got {shape}"
        )
    return emb.shape[0]


def _width(x) -> int:
    return x.shape[1] if torch.is_tensor(x) and x.ndim == 2 else -1


def _agreement(embeddings, labels, indices_tuple, ref_emb, ref_labels, extra=()):
    """What must be the same on every rank, else the collectives that follow would not line
    up (shapes, dtypes, which tensors are gathered) or the ranks would mix two objectives."""
    given, dtype = _comm.describe_bool, _comm.describe_dtype
    agree = [
        ("whether labels were given", int(labels is not None), given),
        ("whether ref_emb was given", int(ref_emb is not None), given),
        ("whether ref_labels were given", int(ref_labels is not None), given),
        ("whether an indices_tuple was given", int(indices_tuple is not None), given),
        ("the embeddings' dtype", _comm.dtype_code(embeddings), dtype),
        ("the embedding size", _width(embeddings), None),
        ("the labels' dtype", _comm.dtype_code(labels), dtype),
        # (always present: every rank's row of the all-gather must have the same length)
        ("ref_emb's dtype", _comm.dtype_code(ref_emb), dtype),
        ("ref_emb's embedding size", _width(ref_emb), None),
        ("ref_labels' dtype", _comm.dtype_code(ref_labels), dtype),
    ]
    return agree + list(extra)


def _gather_batch(
    embeddings,
    labels,
    ref_emb,
    ref_labels,
    group,
    owner,
    with_grad=True,
    indices_tuple=None,
    extra_agree=(),
):
    """Validate and all-gather the batch (and ``ref_emb``) of every rank, in rank order.

    One validation all-gather per call, whatever the number of parts: it carries every
    rank's sizes, errors, what the ranks must agree on, and whether some rank's embeddings
    require grad (then every rank joins the backward all-reduce). All embeddings are
    gathered in one differentiable collective (one all-reduce in backward).
    Returns ((all_emb, all_labels, sizes), (all_ref, all_ref_labels) or None, needs_grad).
    """
    tensors = [t for t in (embeddings, ref_emb) if torch.is_tensor(t)]
    device = tensors[0].device if tensors else torch.device("cpu")
    local_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def check():
        n = _check_part(embeddings, labels, owner, "embeddings", "labels")
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError(f"{owner}: ref_labels were given without ref_emb")
            return n, 0
        return n, _check_part(ref_emb, ref_labels, owner, "ref_emb", "ref_labels")

    agree = _agreement(embeddings, labels, indices_tuple, ref_emb, ref_labels, extra_agree)
    both, needs_grad = _comm.synced_validation(
        check, owner, None, None, device, group, needs_grad=local_grad, agree=agree, num_sizes=2
    )
    sizes = [b[0] for b in both]
    needs_grad = needs_grad and with_grad and torch.is_grad_enabled()
    embs, sizes_list = [embeddings], [sizes]
    if ref_emb is not None:
        embs.append(ref_emb)
        sizes_list.append([b[1] for b in both])
    if not with_grad:
        embs = [e.detach() for e in embs]
    gathered = _comm.gather_rows_many(embs, sizes_list, group, requires_grad=needs_grad)
    all_labels = all_ref_labels = None
    if labels is not None:
        all_labels = _comm.gather_rows_nograd(labels.to(device), sizes, group)
    if ref_labels is not None:
        all_ref_labels = _comm.gather_rows_nograd(ref_labels.to(device), sizes_list[1], group)
    refs = None if ref_emb is None else (gathered[1], all_ref_labels)
    return (gathered[0], all_labels, sizes), refs, needs_grad


def _own_pairs(labels: Tensor, ref_labels: Tensor, offset: Optional[int]):
    """All (anchor, ref) pairs of the local batch against the references.

    With ``offset`` (the references are the gathered batch, whose rows offset..offset+B-1
    are the local samples), the self pairs (i, offset + i) are left out of the positive
    mask before it is turned into indices: no boolean-mask indexing (a host sync each),
    only the two ``nonzero`` that any list of pairs needs, as in
    ``lmu.get_all_pairs_indices``.
    """
    matches = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    diffs = ~matches
    if offset is not None and len(labels) > 0:
        rows = torch.arange(len(labels), device=labels.device)
        matches[rows, rows + offset] = False
    a1, p = torch.where(matches)
    a2, n = torch.where(diffs)
    return a1, p, a2, n


def _drop_self_comparisons(indices_tuple, offset: int):
    """A miner's (local anchor, global ref) indices without the pairs of a sample with
    itself. Which ones survive is data-dependent, so one ``nonzero`` (one host sync) is
    unavoidable; the kept positions are then gathered with ``index_select``, instead of
    one boolean-mask indexing (and sync) per index tensor."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        keep = torch.nonzero(p != a + offset).squeeze(1)
        return a.index_select(0, keep), p.index_select(0, keep), n.index_select(0, keep)
    a1, p, a2, n = indices_tuple
    keep = torch.nonzero(p != a1 + offset).squeeze(1)
    return a1.index_select(0, keep), p.index_select(0, keep), a2, n


def _accumulate_grad_node(p: Tensor):
    get_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    if get_edge is not None:
        return get_edge(p).node
    return p.view_as(p).grad_fn.next_functions[0][0]  # torch < 2.2


class _AverageLossGradsAfterBackward(torch.autograd.Function):
    """Identity on the loss; in backward, queues an all-reduce-average of the loss params.

    Only in a backward that accumulates into the loss's parameters (``loss.backward()``);
    ``torch.autograd.grad(loss, x)`` or ``backward(inputs=[x])`` leave the parameters'
    ``.grad`` alone. The parameters are anchored into the loss's graph on every rank, so
    the answer is the same on every rank when they all run the same kind of backward.
    """

    @staticmethod
    def forward(ctx, loss, wrapper, params):
        ctx.wrapper, ctx.params = wrapper, params
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        wrapper = ctx.wrapper
        will_run = getattr(torch._C, "_will_engine_execute_node", None)
        nodes = [_accumulate_grad_node(p) for p in ctx.params]
        # (Without the engine query, an old torch: average in every backward, as before.)
        if will_run is None or any(will_run(node) for node in nodes):
            torch.autograd.Variable._execution_engine.queue_callback(wrapper._average_loss_grads)
        return grad, None, None


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
      gradient (as with PML);
    * ``efficient=True``: each rank computes the loss of its own samples against the
      gathered batch as references (PML's efficient mode; all pairs minus self pairs if no
      ``indices_tuple``). Rank r returns L_r; embeddings receive d(sum_s L_s)/dx_r; the
      loss parameters' gradients are all-reduce-averaged after backward, so they equal
      d((1/N) sum_s L_s)/dtheta on every rank. For losses that accept ``ref_emb`` only
      (not the class-level losses).

    Replicated state, with DDP's cadence and DDP's traffic (W = the loss's parameters,
    b = its buffers, per training step):

    * the parameters are broadcast from group rank 0 once, at the first forward
      (``sync_initial_state``, default), so that replicas start equal whatever the seeds;
    * after every backward that reaches them (``loss.backward()``, not
      ``torch.autograd.grad(loss, x)``), their gradients are all-reduce-averaged: every
      rank's optimizer then applies the same update, so the parameters stay equal without
      being sent again. This is the |W| all-reduce DDP would do;
    * the buffers (CurricularFace's ``t``, CenterLoss's ``update_rule="paper"`` centers)
      are broadcast from rank 0 at every training forward, as DDP's ``broadcast_buffers``
      does: they are updated inside the forward, and bit-identical updates on every rank
      are not guaranteed (the center update sums duplicate labels in a fixed order, but
      the kernels before it need not round alike on every rank: another GPU model,
      cuBLAS on several streams), so they could drift apart. |b| per step;
    * ``check_every=K`` (> 0): every K-th training forward all-gathers a checksum of the
      parameters and buffers (float64 sum and 2-norm of each tensor) and raises a
      RuntimeError on every rank if they differ. Off by default; one small all-gather and
      one host sync when it runs.

    Per step that is |W| all-reduced + |b| broadcast + the embeddings' all-gather (and its
    backward all-reduce) + one small all-gather of sizes and checks, i.e. what DDP itself
    moves for a module holding the same parameters and buffers
    (``tests/distributed/test_distributed_wrapper.py`` counts the bytes on gloo against DDP's).
    ``sync_every`` (deprecated, a FutureWarning) keeps the old cadence: every
    ``sync_every``-th training forward also broadcasts the parameters (|W| more per step;
    0: nothing at all after the first forward); :meth:`sync_state` broadcasts on demand.

    Keep the wrapped loss *out of* DDP: it needs nothing from DDP, and inside DDP its
    gradients would be all-reduced twice (2|W| per step) and its buffers broadcast
    twice. Miners must index the same rank-ordered batch: use
    :class:`DistributedMinerWrapper` from this module, not PML's (which puts the local
    samples first). The sharded losses of this
    package distribute themselves and must not be wrapped.

    Misuse raises on every rank, within the one validation all-gather each call makes
    (never a hang or an abort in a later collective): labels, ``ref_emb``, ``ref_labels``
    or an ``indices_tuple`` given on some ranks only, different dtypes or embedding sizes,
    ``efficient``, train/eval mode or the loss's ``impl`` differing between ranks.

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
        sync_every: Optional[int] = None,
        check_every: int = 0,
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
        if sync_every is not None:
            if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 0:
                raise ValueError(f"sync_every must be an int >= 0, got {sync_every!r}")
            warnings.warn(
                "DistributedLossWrapper(sync_every=...) is deprecated: the parameters are "
                "broadcast once and the buffers at every training step, as DDP does; "
                "use check_every=K to detect drift, or sync_state() to resynchronise",
                FutureWarning,
                stacklevel=2,
            )
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be an int >= 0, got {check_every!r}")
        self.loss = loss
        self.efficient = bool(efficient)
        self.process_group = process_group
        self.sync_initial_state = bool(sync_initial_state)
        self.sync_every = sync_every
        self.check_every = check_every
        self._synced = False
        self._train_calls = 0  # training forwards so far (the same count on every rank)

    def sync_state(self) -> None:
        """Broadcast the loss's parameters and buffers from group rank 0 (a collective)."""
        _comm.broadcast_module_state(self.loss, self.process_group)
        self._synced = True

    @torch.no_grad()
    def check_state(self) -> None:
        """Raise a RuntimeError on every rank if the loss's parameters or buffers differ
        between ranks (a collective: a checksum of each tensor is all-gathered)."""
        named = list(self.loss.named_parameters()) + list(self.loss.named_buffers())
        if not named or not _comm.is_active(self.process_group):
            return
        sums = []
        for _, t in named:
            t = t.detach()
            if t.is_complex():
                t = torch.view_as_real(t)
            elif not t.is_floating_point():
                t = t.to(torch.float64)
            sums.append(torch.sum(t, dtype=torch.float64))
            sums.append(torch.linalg.vector_norm(t, dtype=torch.float64))
        local = torch.stack(sums)
        _, world = _comm.group_info(self.process_group)
        rows = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(rows, local, group=self.process_group)
        # Exact comparison (NaN equal to NaN: a NaN in every replica is not a drift).
        same = torch.stack(
            [torch.isclose(row, rows[0], rtol=0.0, atol=0.0, equal_nan=True) for row in rows]
        )
        same = same.view(world, len(named), 2).all(2).tolist()  # one host sync
        bad = []
        for i, (name, _) in enumerate(named):
            ranks = [r for r in range(world) if not same[r][i]]
            if ranks:
                bad.append(f"{name} (ranks {ranks} differ from rank 0)")
        if bad:
            raise RuntimeError(
                f"{type(self).__name__}: the replicated state of {type(self.loss).__name__} "
                f"differs across ranks after {self._train_calls} training steps: "
                f"{', '.join(bad)}. Something changed it on some ranks only (a different "
                "optimizer or learning rate, a load_state_dict on one rank...); call "
                "sync_state() on every rank to copy rank 0's"
            )

    def _sync_before_forward(self) -> None:
        first = self.sync_initial_state and not self._synced
        if first:
            self.sync_state()
        elif self.training:
            if self.sync_every is None:
                buffers = list(self.loss.buffers())
                if buffers:  # DDP's broadcast_buffers
                    _comm.broadcast_tensors(buffers, self.process_group)
            elif self.sync_every and self._train_calls % self.sync_every == 0:
                self.sync_state()  # the deprecated cadence
        if self.training:
            self._train_calls += 1
            if self.check_every and self._train_calls % self.check_every == 0:
                self.check_state()

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

    def _impl_code(self) -> int:
        impl = getattr(self.loss, "impl", None)
        return IMPLS.index(impl) if impl in IMPLS else -1

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        group = self.process_group
        rank, world = _comm.group_info(group)
        if world == 1:
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        owner = type(self).__name__
        given = _comm.describe_bool
        extra = [
            ("efficient", int(self.efficient), given),
            ("training mode", int(self.training), given),
            ("the loss's impl", self._impl_code(), lambda i: repr(IMPLS[i]) if i >= 0 else "-"),
        ]
        (all_emb, all_labels, sizes), refs, needs_grad = _gather_batch(
            embeddings, labels, ref_emb, ref_labels, group, owner, True, indices_tuple, extra
        )
        all_ref, all_ref_labels = (None, None) if refs is None else refs
        self._sync_before_forward()  # after the agreement: every rank is in the same mode
        params = [p for p in self.loss.parameters() if p.requires_grad]
        params_grad = torch.is_grad_enabled() and bool(params)
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
        # Whatever the loss used, the gathered tensors and the loss's parameters stay in
        # this rank's graph, so every rank runs the backward all-reduce of the gather and
        # agrees on whether the backward reaches the parameters (see _comm.anchor).
        anchored = params if params_grad else []
        loss = _comm.anchor(loss, all_emb, all_ref, *anchored, force=needs_grad or params_grad)
        if params_grad:
            loss = _AverageLossGradsAfterBackward.apply(loss, self, tuple(params))
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
        ref = ref_emb.detach() if torch.is_tensor(ref_emb) else ref_emb
        extra = [("efficient", int(self.efficient), _comm.describe_bool)]
        (all_emb, all_labels, sizes), refs, _ = _gather_batch(
            emb, labels, ref, ref_labels, group, owner, False, None, extra
        )
        all_ref, all_ref_labels = (None, None) if refs is None else refs
        if not self.efficient:
            return self.miner(all_emb, all_labels, all_ref, all_ref_labels)
        if all_ref is not None:
            return self.miner(emb, labels, all_ref, all_ref_labels)
        indices = self.miner(emb, labels, all_emb, all_labels)
        return _drop_self_comparisons(indices, sum(sizes[:rank]))
