"""The retrieval benchmark as a package, one idea per module; ``benchmarks/retrieval.py`` is
the entry point.

* :mod:`.idx` — IDX (MNIST-format) files; :mod:`.data` — in-memory datasets and the two
  evaluation protocols (closed set, class-disjoint); :mod:`.images` — image files on disk
  (folder, CUB-200-2011, Cars196, SOP), transforms and DataLoaders
* :mod:`.losses` — the losses under test, ``--losses`` / ``--loss-args``
* :mod:`.models` (+ :mod:`.resnet`) — embedding models
* :mod:`.training` — one (loss, seed) run; :mod:`.evaluation` — embedding + k-NN metrics
* :mod:`.report` — seed aggregation and tables; :mod:`.plots` — figures
* :mod:`.env` — seeds, device, versions; :mod:`.cli` — the command line
"""
