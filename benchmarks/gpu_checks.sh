#!/usr/bin/env bash
# The GPU measurements of issue 17 as one prepared run (ViT-B/16 at 224 px, bf16, batch 128).
#
#   benchmarks/gpu_checks.sh prepare     # here, once: wheels and the covid-cxr data into .gpu/
#   benchmarks/gpu_checks.sh run [PART..] # on the GPU machine, from the repository root
#
# `prepare` fills .gpu/ (git-ignored through .git/info/exclude, about 45 MiB): the wheels the
# GPU image lacks (open_clip_torch and its ftfy, wcwidth) and a copy of ../shared/data/covid-cxr,
# which does not travel with the checkout. `run` installs the wheels into /tmp/site, puts src/
# on the path and writes its tables to $OUT (or gpu-checks/): the training step with open_clip's
# own step as a baseline (open_clip text tower: the MiniLM package, 88 MiB, is over what a call
# can carry) and the phase profile, the loss at batch sizes a GPU is used at, the tiled loss's
# memory, and torch.compile's speed and exactness. PARTs (default: all): step, loss, tiles,
# compile; each has its own time limit so that one stuck part leaves the rest. On an H200
# step + loss took 2.5 minutes and compile 3.5 (its first step compiles for 3): where one call
# may run 10 minutes at most, run `run step loss tiles` and `run compile` as two calls.
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
    timeout 60 python3 -c 'import torch, open_clip, transformers, mgll
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "open_clip",
      open_clip.__version__, "transformers", transformers.__version__)' 2>&1 |
        tee -a "$out/gpu.txt"
    local common=(--device cuda --precision bf16 --batch-size 128 --data-root .gpu/data)
    local arch=(model.image.arch=ViT-B-16 model.text.type=open_clip model.text.name=null)
    local parts=" ${*:-step loss tiles compile} "
    # overrides before --variants, which takes every word after it; the most wanted table first
    [[ $parts == *" step "* ]] && timeout 200 python3 benchmarks/train_step.py "${arch[@]}" \
        "${common[@]}" --rounds 15 --warmup 3 --profile --variants clip "clip, joined" mgll-2 \
        mgll-3 "clip, no token cache" "mgll-3, no token cache" open_clip 2>&1 |
        tee "$out/train_step.md"
    [[ $parts == *" loss "* ]] && timeout 150 python3 benchmarks/loss.py --device cuda --compile \
        --sizes 1024 4096 16384 --repeats 5 2>&1 | tee "$out/loss.md"
    [[ $parts == *" tiles "* ]] && timeout 90 python3 benchmarks/loss.py --tiles --device cuda \
        --tile-sizes 8192 32768 --chunk-size 2048 2>&1 | tee "$out/tiles.md"
    [[ $parts == *" compile "* ]] && timeout 300 python3 benchmarks/compile_step.py "${arch[@]}" \
        "${common[@]}" --rounds 10 --variants mgll-3 2>&1 | tee "$out/compile_step.md"
    return 0
}

case "${1:-}" in
prepare) prepare ;;
run)
    shift
    run "$@"
    ;;
*)
    echo "usage: benchmarks/gpu_checks.sh prepare|run" >&2
    exit 2
    ;;
esac
