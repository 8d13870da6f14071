"""Stateless core of the pair-level Circle loss, computed without a B x N similarity matrix.

For an anchor row i with positive similarities s_p and negative similarities s_n,

    P_i = logsumexp_k  -gamma * [1 + m - s_p_k]_+ * (s_p_k - (1 - m))
    N_i = logsumexp_j   gamma * [s_n_j + m]_+    * (s_n_j - m)
    L_i = softplus(P_i + N_i)           (0 when the row has no positive or no negative)

with the [.]_+ weights treated as constants in the gradient (as in the paper and PML).

Two entry points, both returning per-anchor losses of shape (B,):

* ``all_pairs_circle_loss``: every (i, j) pair is positive when the labels match and negative
  otherwise.  A custom autograd Function (``_BlockwiseCircle``) runs an online logsumexp
  over column blocks of the reference set and recomputes each block in backward, so memory
  is O((B + N) * D) plus one block of temporaries.
* ``mined_pairs_circle_loss``: explicit (anchor, positive) and (anchor, negative) index pairs
  from a miner.  Few pairs (``path="gather"``, :mod:`~pml_extras.ops.pair_gather`): each
  pair's similarity is a row-wise dot product computed over chunks of pairs, followed
  by a per-anchor scatter logsumexp; memory O(P) per-pair scalars and indices (the miner
  already hands over P indices) plus O(chunk * D), never O(P * D).  Dense mining (at least
  ``DENSE_PAIR_FRACTION`` of all pairs, ``path="dense"``): the pairs are scattered into
  (B, N) boolean masks and the all-pairs Function runs with those masks instead of label
  comparisons.

Inputs are the already-normalised embeddings: s_ij = <x_i, y_j>.  All logsumexp / softplus
arithmetic is done in float32, or float64 when an input is float64.

``impl`` picks who runs the blockwise pass (all pairs and dense mining): "torch" is the
loop in :class:`~pml_extras.ops.pair_circle_autograd.BlockwiseCircle`, which works
everywhere and is the oracle for "triton", the fused kernels of ``pair_circle_triton``
(similarity tiles in registers, bf16/fp16 tensor-core matmuls with float32
accumulation); "auto" takes Triton on CUDA.
The kernels' operand dtype follows the operand policy of the class-level ops
(:func:`pml_extras.ops.precision.operand_dtype`): the autocast dtype under
``torch.autocast``, else bf16/fp16 when both embedding sets are, else float32.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import precision
from .dispatch import IMPLS, resolve_impl

# Moved to pair_circle_autograd / pair_gather; re-exported from their old home.
from .pair_circle_autograd import (  # noqa: F401
    _BLOCK_ELEMS,
    BlockSize,
    BlockwiseCircle,
    LabelMasks,
    PairMasks,
    blockwise_circle,
    circle_logits,
    exp_floor,
    pair_logits,
    resolve_block_size,
)
from .pair_gather import (  # noqa: F401
    _check_index_range,
    gather_pairs_circle_loss,
    pair_similarity,
    resolve_pair_chunk,
    scatter_logsumexp,
    unique_pairs,
)
from .precision import accumulate_dtype  # noqa: F401

_BlockwiseCircle, _LabelMasks, _PairMasks = BlockwiseCircle, LabelMasks, PairMasks


def pair_operand_dtype(embeddings: Tensor, ref_emb: Tensor) -> torch.dtype:
    """The pair kernels' matmul operand dtype for (raw) ``embeddings`` against ``ref_emb``:
    the operand policy of both families (:func:`pml_extras.ops.precision.operand_dtype`).
    Read it where the caller's autocast state holds (before anything is normalised)."""
    return precision.operand_dtype(embeddings, ref_emb)


def resolve_operand_dtype(
    impl: str, x: Tensor, y: Tensor, operand_dtype: Optional[torch.dtype], detach_weights: bool
) -> Optional[torch.dtype]:
    """The Triton kernels' matmul operand dtype, or None for the PyTorch path.

    ``operand_dtype`` defaults to the operand policy of ``x`` and ``y``
    (:func:`pml_extras.ops.precision.operand_dtype`: the autocast dtype under autocast,
    else bf16/fp16 when both are, else float32); callers that normalised half-precision
    embeddings in float32 pass :func:`pair_operand_dtype` of the raw embeddings, so that
    the matmuls run on bf16/fp16 tensor cores. "auto" picks Triton on CUDA when it is
    installed, for float32/bf16/fp16 operands and the paper's detached weights.
    """

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "hybrid":  # dispatch owns which families have it: it raises, naming both
        resolve_impl(impl, x.device, operand_dtype, family="pair_circle")
    if operand_dtype is None:
        operand_dtype = pair_operand_dtype(x, y)
    supported = operand_dtype in precision.TRITON_DTYPES
    if impl == "auto":
        if not (supported and detach_weights):
            return None
        impl = resolve_impl("auto", x.device, operand_dtype, family="pair_circle")
    elif impl == "triton":
        resolve_impl("triton", x.device)  # raises when Triton cannot run here
        if not supported:
            raise TypeError(
                "impl='triton' supports float32/bfloat16/float16 operands, got "
                f"{operand_dtype}; use impl='torch' or 'auto'"
            )
        if not detach_weights:
            raise ValueError("impl='triton' supports only detach_weights=True")
        # Self-checked once per (device, dtype); raises KernelCheckError on a failure.
        resolve_impl("triton", x.device, operand_dtype, family="pair_circle")
    return operand_dtype if impl == "triton" else None


def all_pairs_circle_loss(
    x: Tensor,
    y: Tensor,
    labels: Tensor,
    ref_labels: Tensor,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    self_compare: bool = False,
    block_size: BlockSize = None,
    detach_weights: bool = True,
    impl: str = "auto",
    operand_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Per-anchor pair-level Circle loss over all pairs, computed blockwise.

    Args:
        x: (B, D) normalised query embeddings.
        y: (N, D) normalised reference embeddings (may be ``x`` itself).
        labels: (B,) query labels; ref_labels: (N,) reference labels.
        self_compare: drop the pairs (i, i) (the reference set is the batch itself).
        block_size: int for square blocks, ``(rows, cols)``, or None for a default.
        detach_weights: treat the [.]_+ weights as constants in the gradient (paper / PML).
        impl: "auto" (fused Triton kernels on CUDA, else PyTorch), "torch" or "triton".
        operand_dtype: matmul operand dtype of the Triton kernels (default: the operand
            policy, :func:`pair_operand_dtype`); accumulation is float32 either way.

    Returns:
        (B,) losses in float32 (float64 if an input is float64); 0 for rows with no positive
        or no negative.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (B, D) and (N, D), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if labels.shape != (x.shape[0],) or ref_labels.shape != (y.shape[0],):
        raise ValueError("labels must be (B,) and ref_labels (N,)")
    masks = _LabelMasks(labels, ref_labels, bool(self_compare))
    return _run_blockwise(x, y, masks, m, gamma, block_size, detach_weights, impl, operand_dtype)


def _run_blockwise(x, y, masks, m, gamma, block_size, detach_weights, impl, operand_dtype):
    operand = resolve_operand_dtype(impl, x, y, operand_dtype, bool(detach_weights))
    return blockwise_circle(x, y, masks, m, gamma, block_size, detach_weights, operand)


# Dense mined path when the miner hands over at least this fraction of all B * N pairs
# (counted before deduplication, so no device sync).  Measured on CPU (D = 128, B = N = 1024
# and 2048, fwd+bwd, random subsets of all pairs, 1 and 2 threads): the dense pass costs
# about what the all-pairs loss costs whatever P is, the sparse path grows linearly with P
# (~0.5-0.7 us per pair), and they cross between 7 % and 15 %; at 10 % the dense pass was
# never the slower one.  The two (B, N) boolean masks then take 2 * B * N <= 20 * P bytes,
# next to the 16 * P bytes of the miner's own int64 indices, so memory stays O(P).
DENSE_PAIR_FRACTION = 0.1


def choose_mined_path(num_pairs: int, num_rows: int, num_cols: int) -> str:
    """``"dense"`` when ``num_pairs >= DENSE_PAIR_FRACTION * num_rows * num_cols``, else
    ``"gather"``."""
    return "dense" if num_pairs >= DENSE_PAIR_FRACTION * num_rows * num_cols else "gather"


PATHS = ("auto", "dense", "gather")
# path="sparse" was the gather path's old name ("sparse" now means the class-level loss).
_DEPRECATED_PATHS = {"sparse": "gather"}


def _resolve_path(path: str) -> str:
    if path in _DEPRECATED_PATHS:
        new = _DEPRECATED_PATHS[path]
        warnings.warn(
            f"mined_pairs_circle_loss(path={path!r}) is deprecated; use path={new!r} (the "
            "same gather/scatter evaluation)",
            DeprecationWarning,
            stacklevel=3,
        )
        return new
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


def mined_pairs_circle_loss(
    x: Tensor,
    y: Tensor,
    a1: Tensor,
    p: Tensor,
    a2: Tensor,
    n: Tensor,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    detach_weights: bool = True,
    check: bool = True,
    chunk_size: Optional[int] = None,
    block_size: BlockSize = None,
    path: str = "auto",
    impl: str = "auto",
    operand_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Per-anchor pair-level Circle loss over explicit pairs (a1[k], p[k]) and (a2[k], n[k]).

    Repeated pairs count once (PML builds boolean masks from the indices); self-pairs (i, i)
    count like any other pair.  With ``check`` (default), out-of-range indices and pairs
    that are both positive and negative raise ValueError; these checks synchronise with the
    device once per call.

    Two evaluations with the same result (up to rounding), picked by ``path``:

    * ``"gather"`` (formerly ``"sparse"``, still accepted with a DeprecationWarning):
      deduplicate the pairs, compute each pair's similarity chunk by chunk
      (``pair_similarity``) and take a per-anchor scatter logsumexp.  Memory O(P) plus one
      chunk of ``chunk_size`` gathered rows; time O(P * D) but with gathers and scatters.
    * ``"dense"``: scatter the pairs into (B, N) boolean masks (B * N bytes each) and run
      the blockwise all-pairs machinery with those masks; time O(B * N * D) in matmuls,
      memory O(B * N) bytes plus one block, the same as the all-pairs loss.
    * ``"auto"`` (default): dense when the miner returned at least
      ``DENSE_PAIR_FRACTION`` (10 %) of the B * N pairs (repeats included), where the dense
      pass is the faster one (measured crossover 7-15 % on CPU) and its masks cost at most
      20 bytes per mined pair, next to the 16 of the miner's own indices.

    ``block_size``, ``impl`` and ``operand_dtype`` are as in ``all_pairs_circle_loss``
    (dense path; the gather path is PyTorch only); ``chunk_size`` as in
    ``pair_similarity`` (gather path).

    Returns (B,) losses, B = x.shape[0], in float32 (float64 if an input is float64).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (B, D) and (N, D), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    path = _resolve_path(path)
    num_rows, num_cols = x.shape[0], y.shape[0]
    device = x.device
    a1, p, a2, n = (t.to(device=device, dtype=torch.long).reshape(-1) for t in (a1, p, a2, n))
    if a1.shape != p.shape or a2.shape != n.shape:
        raise ValueError("a1/p and a2/n must have equal lengths")
    if check:
        _check_index_range([a1, a2], num_rows, "anchor")
        _check_index_range([p, n], num_cols, "positive/negative")
    if path == "auto":
        path = choose_mined_path(a1.numel() + a2.numel(), num_rows, num_cols)
    if path == "dense":
        masks = _dense_pair_masks(x, y, (a1, p, a2, n), check)
        return _run_blockwise(
            x, y, masks, m, gamma, block_size, detach_weights, impl, operand_dtype
        )
    resolve_operand_dtype(impl, x, y, operand_dtype, bool(detach_weights))  # validate impl
    return gather_pairs_circle_loss(
        x,
        y,
        a1,
        p,
        a2,
        n,
        m=m,
        gamma=gamma,
        detach_weights=detach_weights,
        check=check,
        chunk_size=chunk_size,
    )


def _pair_mask(rows: Tensor, cols: Tensor, num_rows: int, num_cols: int) -> Tensor:
    mask = torch.zeros(num_rows * num_cols, dtype=torch.bool, device=rows.device)
    # Flat keys built in place on one P-sized temporary; repeats just set True again.
    key = rows * num_cols
    mask.index_fill_(0, key.add_(cols), True)
    return mask.view(num_rows, num_cols)


def _dense_pair_masks(x, y, pairs, check) -> PairMasks:
    a1, p, a2, n = pairs
    num_rows, num_cols = x.shape[0], y.shape[0]
    pos = _pair_mask(a1, p, num_rows, num_cols)
    neg = _pair_mask(a2, n, num_rows, num_cols)
    if check and bool((pos & neg).any()):
        raise ValueError("Each pair should be either be positive or negative")
    return PairMasks(pos, neg)


__all__ = [
    "DENSE_PAIR_FRACTION",
    "IMPLS",
    "PATHS",
    "accumulate_dtype",
    "all_pairs_circle_loss",
    "choose_mined_path",
    "circle_logits",
    "mined_pairs_circle_loss",
    "pair_operand_dtype",
    "pair_logits",
    "pair_similarity",
    "resolve_block_size",
    "resolve_operand_dtype",
    "resolve_pair_chunk",
    "scatter_logsumexp",
    "unique_pairs",
]
