#!/usr/bin/env bash
# Download, into .whl/ at the repository root, the wheels that scripts/gpu_check.sh installs on a
# GPU machine that has Python 3.12 and PyTorch but no Taichi and no network: Taichi and those of
# its requirements such a machine lacks (Taichi 1.7.4 requires numpy, colorama, rich and dill; a
# PyTorch image carries the first three). Run it where pip can reach a package index.
#
#   scripts/fetch_gpu_wheels.sh             # Taichi 1.7.4 and dill for CPython 3.12, x86-64 Linux
#   PYTHON_VERSION=3.11 scripts/fetch_gpu_wheels.sh
#   scripts/fetch_gpu_wheels.sh taichi==1.7.4 dill==0.3.9 rich==14.0.0   # another list
set -euo pipefail

cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
version=${PYTHON_VERSION:-3.12}
if [ "$#" -gt 0 ]; then
    packages=("$@")
else
    packages=("taichi==1.7.4" "dill")
fi

mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for pkg in "${packages[@]}"; do
    # --no-deps: the machine's own packages serve the other requirements (one version of each)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        "${platforms[@]}" -d .whl "$pkg"
done

# one wheel per project: two versions of one stop the whole install
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
    echo "fetch_gpu_wheels: several wheels of: $dups; delete the ones not wanted from .whl/" >&2
    exit 1
fi
ls -l .whl/*.whl
du -ch .whl/*.whl | tail -n 1
