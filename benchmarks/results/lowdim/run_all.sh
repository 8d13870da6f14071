#!/usr/bin/env bash
# Every run of this folder, one at a time, niced, one torch thread (the machine is shared).
#   bash benchmarks/results/lowdim/run_all.sh digits          # 2-D, 3-D, 128-D, seeds 0-2
#   bash benchmarks/results/lowdim/run_all.sh fashion-mnist 3  # one dimension
#   bash benchmarks/results/lowdim/run_all.sh fashion-mnist 3 "0 1"  # some seeds
# PML_EXTRAS_PATH: an optional directory put first on PYTHONPATH (a pinned copy of the
# package); the figures committed here were made with the package of this repository
# (commit 47171cf's, recorded in each results.json).
# Seed 0 at 2-D/3-D writes embeddings_test.npz (the plots' input); the 3-D one is deleted
# here, the 2-D ones stay for angular_bound.py: delete them after it, before a commit
# (no bulk arrays in git; retrieval/compact.py deletes those over 100 KB).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ds="$1"; dims="${2:-2 3 128}"; seeds="${3:-0 1 2}"
losses="SparseCircleLoss,CurricularFaceLoss,SparseCircleLoss(paper),CurricularFaceLoss(paper),Softmax,ArcFaceLoss,CosFaceLoss,ArcFaceLoss(ours-auto),CosFaceLoss(ours-auto),CenterLoss+Softmax,StandaloneCenterLoss"
export PYTHONPATH="${PML_EXTRAS_PATH:+$PML_EXTRAS_PATH:}${PYTHONPATH:-}"
for d in $dims; do
  for s in $seeds; do
    out="$here/$ds-${d}d/seed$s"
    plots=--no-plots
    if [ "$s" = 0 ] && [ "$d" -le 3 ]; then plots=; fi
    mkdir -p "$out"
    nice -n 15 python "$here/run.py" --dataset "$ds" --embedding-dim "$d" --losses "$losses" \
      --seed "$s" --out "$out" --threads 1 --no-progress $plots > "$out/log.txt" 2>&1
    if [ "$d" != 2 ]; then rm -f "$out/embeddings_test.npz"; fi
  done
done
