"""Pair-level Circle loss: a blockwise, memory-lean drop-in for PML's ``losses.CircleLoss``."""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import AvgNonZeroReducer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..ops.pair_circle import (
    IMPLS,
    BlockSize,
    accumulate_dtype,
    all_pairs_circle_loss,
    mined_pairs_circle_loss,
    pair_operand_dtype,
    resolve_block_size,
)


class CircleLoss(BaseMetricLossFunction):
    r"""Pair-level Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair
    Similarity Optimization", CVPR 2020), numerically equal to
    ``pytorch_metric_learning.losses.CircleLoss`` but computed without a B x N matrix.

    For each anchor i, with cosine similarities s_p to its positives and s_n to its
    negatives,

    .. math::

        L_i = \operatorname{softplus}\Big(
              \operatorname{logsumexp}_j\ \gamma [s_{n_j} + m]_+ (s_{n_j} - m)
            + \operatorname{logsumexp}_k\ -\gamma [1 + m - s_{p_k}]_+ (s_{p_k} - (1 - m))\Big)

    The [.]_+ weights are constants in the gradient (as in the paper and PML).  Anchors with
    no positive or no negative get L_i = 0.  Without ``ref_emb`` the self-pairs (i, i) are
    ignored; like PML, they are also ignored when ``ref_labels`` is the very same tensor
    object as ``labels``.

    Without ``indices_tuple``, all pairs are streamed through an online logsumexp over
    blocks of the reference set (memory O((B + N) * D) plus one block).  With
    ``indices_tuple`` (4-tuple of pairs, or 3-tuple of triplets converted to pairs) a pair
    mined twice counts once, and the P mined pairs are evaluated one of two ways: sparse
    mining (P < 10 % of B * N) chunk by chunk over the pairs (memory O(P) plus O(chunk * D),
    never a (P, D) tensor); dense mining by the same blockwise pass as the all-pairs case
    with the positive / negative masks scattered from the pairs (memory O(B * N) bytes,
    which is O(P) at that density).

    Args:
        m: relaxation margin. Paper settings: face recognition m=0.25 (gamma=256), person
            re-identification m=0.25 (gamma=128), fine-grained retrieval m=0.4 (gamma=80).
        gamma: scale factor (see ``m`` for the paper's values).
        block_size: keyword only; int (square blocks), ``(rows, cols)``, or None for a
            default of at most 1024 rows and ~2M elements per block.  Affects speed and peak
            memory only, not the result (up to float rounding).  PyTorch path only.
        impl: keyword only; "auto" (default: fused Triton kernels on CUDA, PyTorch
            elsewhere and for float64), "torch" or "triton".  The kernels multiply the
            normalised embeddings in their own dtype (bf16/fp16 tensor cores) with float32
            accumulation; the PyTorch path multiplies in float32.  Sparse mining always
            runs in PyTorch.  ``"hybrid"`` exists for the class-level losses only; here
            it raises ValueError.
        **kwargs: as for any PML loss: ``reducer`` (default ``AvgNonZeroReducer``),
            ``distance`` (must be ``CosineSimilarity``, the default, with ``power=1``),
            ``embedding_regularizer``, ``embedding_reg_weight``, ``collect_stats``.

    Shapes:
        embeddings (B, D), labels (B,), ref_emb (N, D), ref_labels (N,).  The per-element
        losses handed to the reducer have shape (B,) and dtype float32 (float64 for float64
        inputs), also for float16/bfloat16 embeddings.  (PML's CircleLoss hands over (B, 1);
        every PML reducer gives the same value for both except ClassWeightedReducer, whose
        (B,) weights broadcast against (B, 1) into a B x B product.)

    Example::

        >>> from pml_extras.losses.circle_loss import CircleLoss
        >>> loss_fn = CircleLoss(m=0.25, gamma=256)
        >>> emb = torch.randn(32, 128, requires_grad=True)
        >>> labels = torch.randint(0, 4, (32,))
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
    """

    def __init__(
        self,
        m: float = 0.4,
        gamma: float = 80,
        *,
        block_size: BlockSize = None,
        impl: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if impl == "hybrid":
            # dispatch.IMPLS is shared by both families; the pair ops have no hybrid path.
            raise ValueError(
                "CircleLoss: impl='hybrid' exists for the class-level losses only "
                "(SparseCircleLoss, CurricularFaceLoss, ArcFaceLoss, CosFaceLoss); the "
                "pair-level loss takes 'auto', 'torch' or 'triton', got 'hybrid'"
            )
        self.impl = impl
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                "CircleLoss requires distance=CosineSimilarity(), got "
                f"{type(self.distance).__name__}"
            )
        if self.distance.power != 1:
            raise ValueError(
                "CircleLoss requires CosineSimilarity with power=1, got "
                f"power={self.distance.power}"
            )
        resolve_block_size(block_size, 1, 1)  # validate early
        self.block_size = block_size
        # Internal switch for tests and benchmarks: "auto" | "dense" | "sparse" (see
        # mined_pairs_circle_loss); the result does not depend on it beyond rounding.
        self._mined_path = "auto"
        self.m = m
        self.gamma = gamma
        # Same recordable attributes as PML's CircleLoss, for logging parity.
        self.op = 1 + self.m
        self.on = -self.m
        self.delta_p = 1 - self.m
        self.delta_n = self.m
        self.add_to_recordable_attributes(
            list_of_names=["m", "gamma", "op", "on", "delta_p", "delta_n"], is_stat=False
        )

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        num_rows, num_cols = embeddings.shape[0], ref_emb.shape[0]
        if indices_tuple is None:
            # PML's get_matches_and_diffs drops the diagonal exactly when ref_labels is
            # missing or is the labels object itself.
            self_compare = ref_labels is None or ref_labels is labels
            if ref_labels is None:
                if num_cols != num_rows:
                    raise ValueError(
                        "ref_labels is required when ref_emb has a different size than embeddings"
                    )
                ref_labels = labels
            if self._at_most_one_pair_each(labels, ref_labels, self_compare):
                return self.zero_losses()
            x, y = self._normalized(embeddings, ref_emb)
            losses = all_pairs_circle_loss(
                x,
                y,
                labels,
                ref_labels,
                m=self.m,
                gamma=self.gamma,
                self_compare=self_compare,
                block_size=self.block_size,
                impl=self.impl,
                operand_dtype=pair_operand_dtype(embeddings, ref_emb),
            )
        else:
            a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
            # PML returns a zero loss in this case even if one positive and one negative
            # pair share an anchor; kept for drop-in equality.
            if all(len(t) <= 1 for t in (a1, p, a2, n)):
                return self.zero_losses()
            x, y = self._normalized(embeddings, ref_emb)
            losses = mined_pairs_circle_loss(
                x,
                y,
                a1,
                p,
                a2,
                n,
                m=self.m,
                gamma=self.gamma,
                block_size=self.block_size,
                path=self._mined_path,
                impl=self.impl,
                operand_dtype=pair_operand_dtype(embeddings, ref_emb),
            )
        return {
            "loss": {
                "losses": losses,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }

    @staticmethod
    def _at_most_one_pair_each(labels, ref_labels, self_compare) -> bool:
        """PML's ``all(len(x) <= 1 ...)`` shortcut on the all-pairs indices, without them.

        Every non-self pair is positive or negative, so with more than two pairs one of the
        two sets has at least two; only tiny batches need an explicit count.
        """
        num_rows, num_cols = labels.shape[0], ref_labels.shape[0]
        num_pairs = num_rows * num_cols - (min(num_rows, num_cols) if self_compare else 0)
        if num_pairs > 2:
            return False
        same = labels[:, None] == ref_labels[None, :]
        diff = ~same
        if self_compare:
            same = same & ~torch.eye(num_rows, num_cols, dtype=torch.bool, device=same.device)
        return int(same.sum()) <= 1 and int(diff.sum()) <= 1

    def _normalized(self, embeddings, ref_emb):
        self.distance.reset_stats()
        self.distance.check_shapes(embeddings, ref_emb)
        acc = accumulate_dtype(embeddings, ref_emb)
        # Normalise in float32+ so half-precision inputs lose nothing before the matmul;
        # normalising once keeps the self-comparison case a single tensor.
        x = self.distance.maybe_normalize(embeddings.to(acc))
        y = x if ref_emb is embeddings else self.distance.maybe_normalize(ref_emb.to(acc))
        self.distance.set_default_stats(embeddings, ref_emb, x, y)
        return x, y

    def get_default_reducer(self):
        return AvgNonZeroReducer()

    def get_default_distance(self):
        return CosineSimilarity()
