#!/usr/bin/env bash
# The GPU measurements of issue 17 as one prepared run (ViT-B/16 at 224 px, bf16, batch 128).
#
#   benchmarks/gpu_checks.sh prepare     # here, once: wheels and the covid-cxr data into .gpu/
#   benchmarks/gpu_checks.sh run         # on the GPU machine, from the repository root
#
# `prepare` fills .gpu/ (git-ignored through .git/info/exclude, about 45 MiB): the wheels the
# GPU image lacks (open_clip_torch and its ftfy, wcwidth) and a copy of ../shared/data/covid-cxr,
# which does not travel with the checkout. `run` installs the wheels into /tmp/site, puts src/
# on the path and writes three tables to $OUT (or gpu-checks/): the training step with open_clip's
# own step as a baseline (open_clip text tower: the MiniLM package, 88 MiB, is over what a call
# can carry), torch.compile's speed and exactness, and the loss at batch sizes a GPU is used at.
# About 5 minutes; each command has its own time limit so that one stuck part leaves the rest.
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    mkdir -p .gpu/whl .gpu/data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation py --platform any -d .gpu/whl \
        "open_clip_torch==$(python3 -c 'import open_clip; print(open_clip.__version__)')" \
        "ftfy==$(python3 -c 'import ftfy; print(ftfy.__version__)')" \
        "wcwidth==$(python3 -c 'import wcwidth; print(wcwidth.__version__)')" || return 1
    rm -rf .gpu/data/covid-cxr && cp -r ../shared/data/covid-cxr .gpu/data/ || return 1
    du -sh .gpu
}

run() {
    local out=${OUT:-gpu-checks}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl/*.whl || return 1
    export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export PYTHONUNBUFFERED=1 MGLL_CACHE=/tmp/mgll-cache
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    local common=(--device cuda --precision bf16 --batch-size 128 --data-root .gpu/data)
    local arch=(model.image.arch=ViT-B-16 model.text.type=open_clip model.text.name=null)
    # overrides before --variants, which takes every word after it
    timeout 180 python3 benchmarks/train_step.py "${arch[@]}" "${common[@]}" --rounds 20 \
        --warmup 3 --variants clip "clip, joined" mgll-2 mgll-3 open_clip 2>&1 |
        tee "$out/train_step.md"
    timeout 180 python3 benchmarks/compile_step.py "${arch[@]}" "${common[@]}" --rounds 10 \
        --variants clip mgll-3 2>&1 | tee "$out/compile_step.md"
    timeout 90 python3 benchmarks/loss.py --device cuda --sizes 1024 4096 16384 --repeats 5 2>&1 |
        tee "$out/loss.md"
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*)
    echo "usage: benchmarks/gpu_checks.sh prepare|run" >&2
    exit 2
    ;;
esac
