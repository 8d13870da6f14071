#!/usr/bin/env python
"""Retrieval benchmark: train one embedding model per loss (and seed), evaluate retrieval on
held-out images with pytorch-metric-learning's ``AccuracyCalculator``.

Two protocols (``--split``): ``samples``, the closed set (test images of the training
classes, plus classification / nearest-center accuracy), and ``classes``, class-disjoint as
metric-learning papers evaluate (train on one half of the classes, retrieve among images of
the unseen other half, test against test; Musgrave et al., ECCV 2020).

Examples::

    python benchmarks/retrieval.py                       # digits, all losses, both protocols
    python benchmarks/retrieval.py --dataset fashion-mnist --split classes --seeds 0,1,2
    python benchmarks/retrieval.py --dataset fashion-mnist --embedding-dim 2 --threads 1
    python benchmarks/retrieval.py --dataset cub200 --data-dir ~/CUB_200_2011 \\
        --model resnet50 --pretrained --device cuda --amp bf16
    python benchmarks/retrieval.py --losses sparsecircle,arcface \\
        --loss-args 'SparseCircleLoss:m=0.4,gamma=80;ArcFaceLoss:margin=28.6'
    python benchmarks/retrieval.py --plot-only benchmarks/results/retrieval/fashion-mnist-2d

Nothing is downloaded (but ``--pretrained``, through torchvision's cache). Outputs (in
``--out``, default benchmarks/results/retrieval/latest): results.md, results.json,
loss_curves.png, metrics.png and, for 2-D/3-D embeddings, embeddings.png (+
embeddings_test.npz that the plots are made from). The code is in retrieval_bench/.
"""

from __future__ import annotations

import os
import sys

# Other processes on a small machine make OpenMP's default busy-waiting very slow (measured
# 100x on 2 shared cores); must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from retrieval_bench.cli import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
