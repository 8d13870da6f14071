#!/bin/sh
# The glyph experiment, start to end (CPU; about 40 min on a loaded 2-core machine):
# build the data set, then the benchmark's losses and the baselines, MLP and CNN.
set -e
cd "$(dirname "$0")/../../.."
DATA=${DATA:-/tmp/glyphs}
[ -f "$DATA/manifest.json" ] || python benchmarks/glyphs/build.py --out "$DATA" --idx "$DATA-idx"
python benchmarks/results/glyphs/sample_sheet.py "$DATA" benchmarks/results/glyphs/samples.png
for model in mlp cnn; do
    python benchmarks/results/glyphs/experiment.py --out benchmarks/results/glyphs/idx-$model \
        --seeds 0,1,2 --dataset idx --data-dir "$DATA-idx" --split classes --model $model \
        --losses all --threads 2 --no-progress
done
