"""The speed benchmark behind ``benchmarks/speed.py``: time and peak memory of the losses at
face-recognition scale, against the bare matmuls of the same shapes measured in the same run.

Structure: setup x provider x mode, one idea per module:

* :mod:`.setups`: what is measured. A *setup* is ``(level, B, D, C, dtype)``:
  ``level="class"`` is a classification head with proxies W of shape (D, C);
  ``level="pair"`` an all-pairs loss over a batch of B embeddings (C unused; labels have 4
  samples per identity). ``dtype`` is the storage dtype of the embeddings and W (``fp32``,
  ``bf16``, ...), or ``autocast_bf16`` / ``autocast_fp16``: the way users train with AMP,
  fp32 W and fp32 model output, the loss's forward under ``torch.autocast``.
* :mod:`.providers`: who is measured. Ours (``SparseCircleLoss``, ``CurricularFaceLoss``,
  ``ArcFaceLoss``, ``CosFaceLoss`` with ``impl="torch"`` and ``impl="triton"``; the pair-level
  ``CircleLoss``), PML's ``ArcFaceLoss``, ``CosFaceLoss`` and ``CircleLoss``, the dense
  versions of ``benchmarks/naive.py``, and the ``floor``: the three matmuls x @ W, dC @ W^T,
  x^T @ dC in the operand dtype (pair level: x @ x^T, dS @ x, dS^T @ x).
* :mod:`.timing`: how. ``--repeats`` rounds, round-robin over the cases; each round is one
  ``torch.utils.benchmark.Timer.blocked_autorange`` measurement of at least
  ``--min-run-time`` (CPU; on CPU its clock also reads the process CPU time), or on CUDA
  ``triton.testing.do_bench`` (``--timer``); the median per call over the pooled rounds is
  reported, with the IQR and the number of timed calls. Gradients are dropped before each
  call, so allocating them is part of it. Extra peak memory above what is held before the
  call: ``max_memory_allocated`` on GPU, the RSS high-water mark of a fresh process per
  case on CPU.
* :mod:`.sweep`: runs every case of a setup (round-robin timing) and computes the ratios
  ``time / floor time`` and ``extra memory / (bytes of dW + dx)``.
* :mod:`.report`: JSON, CSV and Markdown with device, versions and command.
* :mod:`.targets`: the issue's speed and memory targets as PASS/FAIL lines with the ratio.
* :mod:`.checks`: PASS/FAIL verdicts of ``benchmarks/gpu_checks.sh``'s other steps (CUDA
  tests, compute-sanitizer, kernel self-check) and the summary; imports no torch.
* :mod:`.specialisations`: counts the Triton kernel specialisations a run launches.
* :mod:`.cli`: the command line (``python benchmarks/speed.py --help``).

This package imports nothing heavy at import time: ``checks`` runs in a few milliseconds.
"""

import os
import sys

# Other processes on a small shared machine make OpenMP's default busy-waiting very slow;
# this must be set before torch loads its OpenMP runtime (the forkserver inherits it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ``naive`` (the dense baselines) lives next to this package.
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
