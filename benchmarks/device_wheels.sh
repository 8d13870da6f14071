#!/usr/bin/env bash
# Builds the wheel folder a bare GPU machine needs to run benchmarks/gpu_checks.sh from a
# checkout: the packages pml_extras, its tests and the benchmarks import that a
# pip-installed CUDA torch lacks (PML and its import-time needs numpy, scipy and tqdm;
# pytest and hypothesis for the CUDA tests), for the device's Python, no dependencies
# resolved (the list is the closure; sklearn is not imported by anything run there).
#
#   bash benchmarks/device_wheels.sh [DIR]       # default DIR: .whl (ignored by git)
#
# DEVICE_PYTHON (default 3.12) and DEVICE_PLATFORM (default manylinux_2_28_x86_64, older
# manylinux tags accepted) choose the wheels; the versions are the CI venv's. The folder
# must stay within 64 MiB (what may travel with the repository to a lent machine): the
# script fails, naming the size, when it does not. gpu_checks.sh installs .whl/*.whl with
# `pip install --no-index --no-deps --target /tmp/site` and puts that on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
python_version="${DEVICE_PYTHON:-3.12}"
platform="${DEVICE_PLATFORM:-manylinux_2_28_x86_64}"
limit=$((64 * 1024 * 1024))
packages=(
    pytorch-metric-learning==2.9.0 numpy==2.4.6 scipy==1.17.1 tqdm==4.70.1
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
    hypothesis==6.170.27 sortedcontainers==2.4.0
)
# Override the list (shell words), e.g. for a rehearsal on another Python.
[[ -n ${DEVICE_PACKAGES:-} ]] && eval "packages=(${DEVICE_PACKAGES})"
mkdir -p "$dest"
rm -f "$dest"/*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp \
    --platform "$platform" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "${packages[@]}"
size=$(du -cb "$dest"/*.whl | tail -n 1 | cut -f 1)
ls -1 "$dest"/*.whl
echo "wheels: $(ls "$dest"/*.whl | wc -l), $size bytes ($((size / 1048576)) MiB) in $dest"
if ((size > limit)); then
    echo "too large: $size bytes > $limit (64 MiB) may not travel with the repository" >&2
    exit 1
fi
