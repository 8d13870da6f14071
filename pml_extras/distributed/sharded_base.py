"""The template of the class-sharded losses: who owns which classes, and one step.

:func:`shard_ranges` splits the C classes over the ranks; :class:`_ShardedClassLoss` is the
template method both sharded losses (:mod:`pml_extras.distributed.sharded`) share: the
validated, all-gathered global batch, negative-class sampling, the partial logsumexps and
their combination, the reducer, and the inspection helpers (``gather_weight``,
``load_full_weight``, ``shard_logits``, ``predict``). A concrete loss gives its single-device
twin, ``_partials`` (this shard's partial logsumexp and target cosine) and ``_per_sample``.

The class proxies W (D x C) are split by classes over the ranks of a process group: rank r
owns the contiguous columns [start_r, end_r) and no rank ever holds all of W. Per step:

1. every rank normalises its embeddings and all-gathers them (with gradient) and the labels,
   in rank order, so every rank sees the global batch X (B_g x D);
2. each rank runs :func:`pml_extras.ops.class_lse.class_logsumexp` over *its* classes for all
   B_g rows, with labels remapped to local columns (-1 where another rank owns the class):
   this gives a partial logsumexp over its non-target classes and the target cosine (0 on
   ranks that do not own the class);
3. the (B_g,) partials are all-gathered (with gradient) and combined, lse = logsumexp over
   ranks and cos_y = sum over ranks, which are exactly the single-process quantities;
4. each rank turns the rows of its own samples into per-sample losses and hands them to the
   PML reducer. Miners work through per-sample weights, as in the single-GPU losses.

Communication per step is O(B_g * D) for the embeddings plus O(world * B_g) for the partials,
independent of C; memory per rank is O(D * C / world) for W, its gradient and its optimizer
state, plus one chunk of logits.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import common_functions as c_f
from torch import Tensor

from .._validation import check_embeddings, check_labels
from ..functional import masked_logsumexp
from ..losses.base_proxy_loss import BaseProxyLoss
from ..ops.class_lse import IMPLS, class_logsumexp
from . import _comm

_MASK64 = (1 << 64) - 1


def shard_ranges(
    num_classes: int, world_size: int, shard_sizes: Optional[Sequence[int]] = None
) -> List[Tuple[int, int]]:
    """The contiguous class range [start, end) owned by each rank.

    By default the classes are split as evenly as possible, the first ``num_classes %
    world_size`` ranks getting one extra class (C=10 over 3 ranks: [0,4), [4,7), [7,10)).
    ``shard_sizes`` (one positive int per rank, summing to ``num_classes``) overrides it.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if shard_sizes is None:
        if num_classes < world_size:
            raise ValueError(
                f"num_classes={num_classes} is smaller than the world size {world_size}: "
                "every rank must own at least one class"
            )
        base, extra = divmod(num_classes, world_size)
        shard_sizes = [base + (r < extra) for r in range(world_size)]
    shard_sizes = [int(n) for n in shard_sizes]
    if len(shard_sizes) != world_size or any(n < 1 for n in shard_sizes):
        raise ValueError(
            f"shard_sizes must hold {world_size} positive ints (one per rank), got {shard_sizes}"
        )
    if sum(shard_sizes) != num_classes:
        raise ValueError(
            f"shard_sizes {shard_sizes} sum to {sum(shard_sizes)}, not num_classes={num_classes}"
        )
    starts = [sum(shard_sizes[:r]) for r in range(world_size)]
    return [(s, s + n) for s, n in zip(starts, shard_sizes)]


# Host integer arithmetic, run eagerly under torch.compile: the sampling step is a Python
# int that Dynamo turns into a SymInt once it changes, and older Dynamo (2.4) cannot trace
# bitwise ops on one. The seed feeds a torch.Generator, which breaks the graph anyway.
@torch.compiler.disable
def _mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from a few ints (splitmix64 rounds)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class _ShardedClassLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """Shared machinery; see :class:`ShardedSparseCircleLoss` for the full description.

    A subclass names its ``single_device_loss`` (a :class:`BaseProxyLoss`): its
    ``resolve_hyper_parameters`` gives the defaults and "auto" values for the *global*
    (C, D), and its ``default_weight_init`` the default init, so that both losses resolve
    the same values.
    """

    single_device_loss = BaseProxyLoss
    # The twin's scale attribute, copied onto the class: torch 2.4's Dynamo cannot read a
    # class attribute through ``self.single_device_loss`` as a constant.
    scale_name = BaseProxyLoss.scale_name

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        hyper_parameters: Dict[str, object],
        sample_rate: float = 1.0,
        seed: int = 0,
        shard_sizes: Optional[Sequence[int]] = None,
        process_group=None,
        chunk_size: Optional[int] = None,
        impl: str = "auto",
        init_seed: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        name = type(self).__name__
        # Defaults, "auto" and checks of the single-device twin, for the global (C, D):
        # the same values and the same errors.
        values = self.single_device_loss.resolve_hyper_parameters(
            num_classes, embedding_size, owner=name, **hyper_parameters
        )
        BaseProxyLoss.check_arguments(self, num_classes, embedding_size, impl, chunk_size)
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"{name}: sample_rate must lie in (0, 1], got {sample_rate}")
        rank, world = _comm.group_info(process_group)
        ranges = shard_ranges(num_classes, world, shard_sizes)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.sample_rate, self.seed = float(sample_rate), int(seed)
        self.chunk_size, self.impl = chunk_size, impl
        self.process_group = process_group
        self.world_size, self.rank = world, rank
        self.shard_sizes = [end - start for start, end in ranges]
        self.class_start, self.class_end = ranges[rank]
        self.register_buffer("class_range", torch.tensor(ranges[rank], dtype=torch.int64))
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64))
        for key, value in values.items():
            setattr(self, key, value)
        self.add_to_recordable_attributes(list_of_names=list(values), is_stat=False)
        self.W = torch.nn.Parameter(torch.empty(embedding_size, self.class_end - self.class_start))
        self._init_shard(init_seed)
        self.last_sampled_classes: Optional[Tensor] = None
        self._anchor: Optional[Tensor] = None
        self._sample_step_host: Optional[int] = None

    # ----------------------------------------------------------------- construction
    def _init_shard(self, init_seed: Optional[int]) -> None:
        """``weight_init_func`` on this shard, from a per-rank seed.

        With one base seed on every rank (the usual ``torch.manual_seed(s)`` everywhere),
        drawing the shards from the global generator would give every rank the *same*
        values, i.e. classes start + j of all shards would share a proxy. The base is
        ``init_seed`` or one draw from the global generator; rank r uses mix(base, r).
        """
        init = self.weight_init_func
        rule = self.single_device_loss.default_weight_init
        if rule is not None and init is rule:
            # The twin's low-dimensional rule decides on the global C, not the shard's.
            init = functools.partial(rule, num_classes=self.num_classes)
        if self.world_size == 1 and init_seed is None:
            init(self.W)
            return
        base = init_seed if init_seed is not None else int(torch.randint(0, 2**62, ()).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix_seed(base, self.rank))
            init(self.W)

    def get_default_weight_init_func(self):
        """The single-device twin's default init (its low-dimensional rule), else PML's."""
        rule = self.single_device_loss.default_weight_init
        return rule if rule is not None else super().get_default_weight_init_func()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"shard=[{self.class_start}, {self.class_end}) on rank {self.rank}/{self.world_size}, "
            f"sample_rate={self.sample_rate}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "class_range")
        if saved is not None and saved.tolist() != [self.class_start, self.class_end]:
            lo, hi = saved.tolist()
            raise RuntimeError(
                f"{type(self).__name__}: this state_dict holds the shard of classes [{lo}, {hi}) "
                f"but rank {self.rank} owns [{self.class_start}, {self.class_end}); load the "
                "file saved by the matching rank, or re-shard a full W with load_full_weight()"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sample_step_host = None  # re-read from the loaded buffer at the next step

    # ----------------------------------------------------------------- PML entry point
    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """PML's forward without its local shape check (ours is synchronised over ranks).

        The returned loss always depends on the collective part of the graph, even for an
        empty local batch, so that every rank runs the same collectives in backward.
        """
        self.reset_stats()
        self._anchor = None
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        if torch.is_tensor(labels):
            labels = c_f.to_device(labels, embeddings)
        loss = self.reducer(loss_dict, embeddings, labels)
        anchor, self._anchor = self._anchor, None
        return loss if anchor is None else _comm.anchor(loss, anchor)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        group = self.process_group
        sizes, x_all, labels, y_all = self._global_batch(
            embeddings, labels, ref_emb, ref_labels, indices_tuple=indices_tuple
        )
        rank, world = _comm.group_info(group)
        w_used = _comm.scale_grad(self.W, 1.0 / world)
        loss_dict = {"loss": self.zero_loss()}
        if x_all is not None:  # else the global batch is empty: no collectives to run
            cols, target = self._columns_and_targets(y_all)
            if cols is not None:
                w_used = w_used.index_select(1, cols)
            lse_part, cos_part = self._partials(x_all, w_used, target)
            parts = _comm.gather_stack(torch.stack([lse_part, cos_part]), group)  # (world,2,B_g)
            lse_parts = parts[:, 0]
            lse = masked_logsumexp(lse_parts, torch.isfinite(lse_parts), dim=0)
            cos_y = parts[:, 1].sum(0)
            start = sum(sizes[:rank])
            own = slice(start, start + sizes[rank])
            losses = self._per_sample(lse[own], cos_y[own])
            # Keeps the collectives in this rank's graph whatever the reducer does (an
            # empty local batch, a reducer that returns a detached zero...).
            self._anchor = losses
            if sizes[rank] > 0:
                weights = BaseProxyLoss.miner_weights(indices_tuple, labels, losses.dtype)
                loss_dict = {"loss": BaseProxyLoss.element_loss(losses * weights)}
        self.add_weight_regularization_to_loss_dict(loss_dict, w_used.t())
        return loss_dict

    def _global_batch(
        self,
        embeddings,
        labels=None,
        ref_emb=None,
        ref_labels=None,
        *,
        with_labels=True,
        indices_tuple=None,
    ):
        """Validate the local batch on every rank, then all-gather it in rank order.

        A bad input on any rank raises on every rank (see ``_comm.synced_validation``).
        Returns (local batch sizes, normalised global embeddings, local labels, global
        labels); the embeddings are gathered with gradient. With ``with_labels=False`` only
        the embeddings are checked and both label entries are None. For an empty global batch
        nothing is gathered and the two global entries are None.

        The same all-gather makes the ranks agree on what would otherwise desynchronise
        their collectives or mix two objectives: whether labels and an indices_tuple were
        given, the embeddings' and W's dtypes, and ``impl``. A difference raises the same
        ValueError on every rank.
        """
        name = type(self).__name__
        group = self.process_group
        _, world = _comm.group_info(group)
        if world != self.world_size:
            raise RuntimeError(
                f"{name} was built for {self.world_size} rank(s) but the process group now has "
                f"{world}; build the loss after init_process_group, in every rank"
            )
        checked = {"labels": None}

        def check():
            if (ref_emb is not None and ref_emb is not embeddings) or (
                ref_labels is not None and ref_labels is not labels
            ):
                raise ValueError(f"{name}: ref_emb/ref_labels are not supported (refs are W)")
            check_embeddings(embeddings, self.embedding_size, name)
            if with_labels:
                # Shape and dtype here; the range travels with the sizes' all-gather (one
                # process: the usual check, which torch.compile keeps out of the graph).
                n = embeddings.shape[0]
                y = check_labels(labels, self.num_classes, n, name, check_range=world == 1)
                checked["labels"] = y.to(embeddings.device)
            return embeddings.shape[0]

        def label_range():
            y = checked["labels"]
            return y.min(), y.max()

        device = embeddings.device if torch.is_tensor(embeddings) else self.W.device
        num_classes = self.num_classes if with_labels else None
        local_grad = (
            torch.is_grad_enabled() and torch.is_tensor(embeddings) and (embeddings.requires_grad)
        )
        sizes, needs_grad = _comm.synced_validation(
            check,
            name,
            labels,
            num_classes,
            device,
            group,
            needs_grad=local_grad,
            label_range=label_range if with_labels and world > 1 else None,
            # (one process: nothing to agree on, and nothing more for compile to trace)
            agree=self._agreement(embeddings, labels, indices_tuple, with_labels)
            if world > 1
            else (),
        )
        labels = checked["labels"]
        if sum(sizes) == 0:
            return sizes, None, labels, None
        x_all = _comm.gather_rows(
            F.normalize(embeddings, dim=1), sizes, group, requires_grad=needs_grad
        )
        y_all = _comm.gather_rows_nograd(labels, sizes, group) if with_labels else None
        return sizes, x_all, labels, y_all

    def _agreement(self, embeddings, labels, indices_tuple, with_labels):
        """What every rank must have in common, for :func:`_comm.synced_validation`."""
        agree = [
            ("the embeddings' dtype", _comm.dtype_code(embeddings), _comm.describe_dtype),
            ("W's dtype", _comm.dtype_code(self.W), _comm.describe_dtype),
            ("impl", IMPLS.index(self.impl), lambda i: repr(IMPLS[i])),
        ]
        if with_labels:
            agree += [
                ("whether labels were given", int(labels is not None), _comm.describe_bool),
                (
                    "whether an indices_tuple was given",
                    int(indices_tuple is not None),
                    _comm.describe_bool,
                ),
            ]
        return agree

    # ----------------------------------------------------------------- sampling
    def _columns_and_targets(self, y_all: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        """Local columns to use (None = the whole shard) and each row's target among them."""
        lo, hi = self.class_start, self.class_end
        num_local = hi - lo
        owned = (y_all >= lo) & (y_all < hi)
        local = torch.where(owned, y_all - lo, torch.full_like(y_all, -1))
        if self.sample_rate >= 1.0 or not self.training:
            self.last_sampled_classes = None
            return None, local
        device = self.W.device
        # Which columns are positives, without boolean-mask indexing or torch.unique
        # (each a host sync); their count is the one sync left: it sets how many columns
        # are kept, which must be a host int.
        hits = torch.zeros(num_local, dtype=torch.int32, device=device)
        # int32 addition is exact in any order, so index_add_'s CUDA atomics give the same
        # counts in every run: no fixed-order add (ops.class_common.add_rows_) is needed.
        hits.index_add_(0, local.clamp_min(0), owned.to(torch.int32))
        is_positive = hits > 0
        wanted = int(math.ceil(self.sample_rate * num_local - 1e-9))
        keep = min(num_local, max(wanted, int(is_positive.sum()), 1))
        step = self._host_sample_step()
        generator = torch.Generator(device=device)
        generator.manual_seed(_mix_seed(self.seed, step, self.rank))
        score = torch.rand(num_local, generator=generator, device=device)
        score = torch.where(is_positive, torch.full_like(score, 2.0), score)  # always kept
        cols = torch.topk(score, keep, sorted=False).indices.sort().values
        remap = torch.full((num_local,), -1, dtype=torch.int64, device=device)
        remap[cols] = torch.arange(keep, device=device)
        target = torch.where(owned, remap[local.clamp_min(0)], local)
        self.sample_step += 1
        self._sample_step_host = step + 1
        self.last_sampled_classes = cols + lo
        return cols, target

    def _host_sample_step(self) -> int:
        """``sample_step`` as a Python int, mirrored on the host: read from the buffer (one
        sync) only after construction or ``load_state_dict``; after that it is counted
        along with the buffer. (Write the buffer through ``load_state_dict``.)"""
        if self._sample_step_host is None:
            self._sample_step_host = int(self.sample_step)
        return self._sample_step_host

    # ----------------------------------------------------------------- per kind
    def _partials(self, x_all: Tensor, w_used: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _per_sample(self, lse: Tensor, cos_y: Tensor) -> Tensor:
        raise NotImplementedError

    def _scale(self) -> float:
        """The logit scale: the twin's ``scale_name`` attribute (gamma or scale)."""
        return getattr(self, self.scale_name)

    def _class_lse(self, x_all, w_used, target, kind, param, row_param=None):
        """This shard's (partial logsumexp, target cosine) of ``kind`` for every global row."""
        return class_logsumexp(
            x_all,
            w_used,
            target,
            kind,
            self._scale(),
            param,
            row_param=row_param,
            chunk_size=self.chunk_size,
            impl=self.impl,
        )

    # ----------------------------------------------------------------- inspection
    @torch.no_grad()
    def gather_weight(self) -> Tensor:
        """The full (D, C) W, assembled on every rank (a collective: call it on all ranks).

        Only for inspection, export or evaluation at sizes where D x C fits one device (at
        C = 10M, D = 512, fp32 it is 19 GiB on every rank); to change the world size of a
        checkpoint use :func:`pml_extras.distributed.reshard_checkpoints` instead.
        ``SparseCircleLoss(C, D).W.copy_(sharded.gather_weight())`` gives the equivalent
        single-process loss (plus ``.t.copy_(sharded.t)`` for CurricularFace).
        """
        w_t = self.W.detach().t().contiguous()
        return _comm.gather_rows_nograd(w_t, self.shard_sizes, self.process_group).t()

    @torch.no_grad()
    def load_full_weight(self, weight: Tensor) -> None:
        """Copy this rank's columns out of a full (D, C) W (re-sharding a checkpoint)."""
        if tuple(weight.shape) != (self.embedding_size, self.num_classes):
            raise ValueError(
                f"expected a full W of shape {(self.embedding_size, self.num_classes)}, "
                f"got {tuple(weight.shape)}"
            )
        self.W.copy_(weight[:, self.class_start : self.class_end])

    def shard_logits(self, embeddings: Tensor) -> Tensor:
        """(B, C_local) scaled cosines to this rank's classes [class_start, class_end)."""
        check_embeddings(embeddings, self.embedding_size, type(self).__name__)
        return BaseProxyLoss.cosine_logits(embeddings, self.W, self._scale())

    @torch.no_grad()
    def predict(
        self,
        embeddings: Tensor,
        k: int = 1,
        chunk_size: Optional[int] = None,
        return_scores: bool = False,
    ):
        """Nearest-proxy classes of each local embedding, over all C classes (a collective).

        Every rank scores the gathered batch (B_g rows) against its shard in column chunks,
        keeping a running top-k per row, so its memory is O(B_g * (chunk + k) + D * chunk)
        on top of W: it never builds B_g x C/N scores nor a normalised copy of the shard.
        The per-rank top-k (B_g x k values and ids) are all-gathered and merged.

        Args:
            embeddings: (B, D) local embeddings (any norm; cosine similarity is used).
            k: how many classes per row (1 <= k <= num_classes).
            chunk_size: classes scored at once (default: 2**22 // B_g, i.e. 16 MiB of
                float32 scores, as the loss's own chunks; at least 1).
            return_scores: also return the cosines.

        Returns:
            (B,) int64 class ids for k = 1, else (B, k) best first; with ``return_scores``,
            (ids, cosines) of the same shape (float32, or float64 for float64 inputs).
        """
        name = type(self).__name__
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_classes:
            raise ValueError(f"{name}: k must be an int in [1, {self.num_classes}], got {k!r}")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
        group = self.process_group
        rank, _ = _comm.group_info(group)
        sizes, x_all, _, _ = self._global_batch(embeddings, with_labels=False)
        shape = (embeddings.shape[0],) if k == 1 else (embeddings.shape[0], k)
        if x_all is None:
            ids = torch.empty(shape, dtype=torch.int64, device=embeddings.device)
            return (ids, ids.to(torch.float32)) if return_scores else ids
        dtype = torch.promote_types(torch.promote_types(x_all.dtype, self.W.dtype), torch.float32)
        x = x_all.to(dtype)
        rows, local = x.shape[0], self.W.shape[1]
        chunk = chunk_size or max(1, (1 << 22) // max(rows, 1))
        best = x.new_full((rows, k), -math.inf)
        ids = torch.full((rows, k), -1, dtype=torch.int64, device=x.device)
        for lo in range(0, local, chunk):
            w = F.normalize(self.W.detach()[:, lo : lo + chunk].to(dtype), dim=0)
            scores = x @ w
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            del scores
            both = torch.cat([best, top.values], dim=1)
            both_ids = torch.cat([ids, top.indices + (self.class_start + lo)], dim=1)
            keep = torch.topk(both, k, dim=1)
            best, ids = keep.values, both_ids.gather(1, keep.indices)
        # Merge over ranks: (world, B_g, k) -> the k best of world * k candidates per row.
        all_best = _comm.gather_stack(best, group).permute(1, 0, 2).reshape(rows, -1)
        all_ids = _comm.gather_stack(ids, group).permute(1, 0, 2).reshape(rows, -1)
        keep = torch.topk(all_best, k, dim=1)
        start = sum(sizes[:rank])
        own = slice(start, start + sizes[rank])
        pred, cos = all_ids.gather(1, keep.indices)[own], keep.values[own]
        if k == 1:
            pred, cos = pred[:, 0], cos[:, 0]
        return (pred, cos) if return_scores else pred

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_reducer(self):
        return MeanReducer()
