#!/bin/sh
# The glyph experiment, start to end (CPU): build the data set, then the benchmark's losses
# and the baselines on the unseen classes, MLP (all ten losses) and CNN (all ten, in two
# runs), 3 seeds. Logs go to /tmp/glyphs-*.log.
# One torch thread per run: on a shared, oversubscribed machine two threads made each step
# ~10x slower (OpenMP waits). The two models run side by side.
set -e
cd "$(dirname "$0")/../../.."
DATA=${DATA:-/tmp/glyphs}
[ -f "$DATA/manifest.json" ] || python benchmarks/glyphs/build.py --out "$DATA" --idx "$DATA-idx"
python benchmarks/results/glyphs/sample_sheet.py "$DATA" benchmarks/results/glyphs/samples.png
COMMON="--seeds 0,1,2 --dataset idx --data-dir $DATA-idx --split classes --threads 1 --no-progress"
python benchmarks/results/glyphs/experiment.py --out benchmarks/results/glyphs/idx-mlp \
    --model mlp --losses all $COMMON > /tmp/glyphs-mlp.log 2>&1 &
python benchmarks/results/glyphs/experiment.py --out benchmarks/results/glyphs/idx-cnn \
    --model cnn --losses ArcFaceLoss,MultiSimilarityLoss,SparseCircleLoss,CircleLoss $COMMON \
    > /tmp/glyphs-cnn.log 2>&1 &
wait
# the other six losses with the CNN
python benchmarks/results/glyphs/experiment.py --out benchmarks/results/glyphs/idx-cnn-rest \
    --model cnn --losses CurricularFaceLoss,CenterLoss+Softmax,StandaloneCenterLoss,CosFaceLoss,TripletMarginLoss,Softmax \
    $COMMON > /tmp/glyphs-cnn-rest.log 2>&1
