#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_decode.sh installs on a GPU machine without network (open_clip_torch and its
# small dependencies, for the CLIP re-ranking row) into .gpu_wheels/ (git-ignored; carry it to the GPU machine).
# PYVERS: the GPU machine's Python versions to cover (default "310 311 312").
set -eu
DEST=${DEST:-.gpu_wheels}
mkdir -p "$DEST"
for v in ${PYVERS:-310 311 312}; do
  python3 -m pip download -q --only-binary=:all: --python-version "$v" --platform manylinux2014_x86_64 \
    --no-deps -d "$DEST" open_clip_torch ftfy wcwidth regex
done
ls "$DEST"
