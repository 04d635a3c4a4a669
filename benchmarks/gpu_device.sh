#!/usr/bin/env bash
# benchmarks/gpu.py on the lent GPU machine (issue 10), in stages, from the repo root there:
#   stage1   copy the first half of the MLX CUDA wheel (.gpuwhl/p1, carried) to /root/whl
#   full     kernel tests, checks, profiles (decode batch 1 with AB=ours_rope_off by default, 128; prefills)
#   compare  (after full) the benchmark: ours vs AB (one kernel off) vs mlx-lm, each model in its own process; a batch-1 profile
#   ab       (after stage1) tests, checks, profiles, then gpu.py ab: ours, an older lowering ($OLD), ours with kernels
#            off ($VARIANTS, e.g. ours_kv_scatter), mlx-lm paired in one process
#   run      (after stage1) the command that follows, e.g. `run python3 benchmarks/gpu.py ab --artefacts A,B`
#   torch    torch eager (TORCH_SYSTEMS=eager,compile for both) and torch's copy bandwidth, same machine
#   sweep    prefill profiles; the batch-1 decode profile at several MLX_MAX_OPS_PER_BUFFER and without CUDA graphs
#   bench    the GPU kernel tests, a sweep of the kernel's (warps, unroll) (USE_PICK=1: measure with its pick),
#            the checks, profiles at batch 1 and 128, ours vs ours_composed (kernel off) vs mlx-lm, both models
# A call carries at most 64 MiB, so the 86 MiB wheel travels in two parts on two calls to a warm machine
# (../shared/ENVIRONMENT.md): every stage but stage1 and torch carries .gpuwhl/p2 and installs MLX-CUDA if missing
# (`ab` with $OLD carries that folder too, e.g. .gpuab/old). Results go to $OUT (what comes back).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
W=/root/whl
R=${RUN:-r4}
mkdir -p "$W"
git_state() { echo "HEAD $(git rev-parse HEAD 2>/dev/null)"; git status --short 2>/dev/null; }
# gpu_tests LOG "-k EXPR": tests/test_gpu_device.py (the CUDA kernels vs MLX's own ops), stop the stage on a failure
gpu_tests() {
    python3 -m pytest -q -x -p no:cacheprovider -k "$2" tests/test_gpu_device.py 2>&1 | tee "$OUT/$1"
    [ "${PIPESTATUS[0]}" = 0 ] || exit 5
}
# the lowered SmolLM2 shape on the GPU vs transformers on the CPU, f32 and bf16
checks() {
    python3 benchmarks/gpu.py check --dtype float32 --out "$OUT/gpu-$R-check-f32.json"
    python3 benchmarks/gpu.py check --dtype bfloat16 --out "$OUT/gpu-$R-check-bf16.json"
}

ensure_mlx() {
    python3 -c "import mlx.core as mx; assert mx.cuda.is_available()" 2>/dev/null && return 0
    [ -f .gpuwhl/p2/part.ab ] && cp .gpuwhl/p2/part.ab "$W/"
    [ -f "$W/part.aa" ] && [ -f "$W/part.ab" ] || { echo "wheel parts missing: run stage1 first"; return 3; }
    cat "$W/part.aa" "$W/part.ab" > "$W/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl"
    (cd "$W" && sha256sum -c cuda.sha256) || return 3
    python3 -m pip install -q --no-deps --no-index "$W"/mlx-0.32.4-*.whl "$W"/mlx_cuda_13-*.whl "$W"/mlx_lm-*.whl || return 4
    python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.cuda.is_available())"
}

case "${1:-}" in
stage1)
    cp .gpuwhl/p1/* "$W/" && ls -la "$W" && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    ;;
bench)
    ensure_mlx || exit $?
    git_state > "$OUT/tree-bench.txt"
    gpu_tests pytest-bench.log paged
    set -o pipefail
    # sweep the kernel's (warps, unroll); USE_PICK=1 measures with the best, else with the code's own rule
    tune=$(python3 benchmarks/gpu.py kernel --out "$OUT/gpu-$R-kernel.json" | tail -1)
    [[ "$tune" =~ ^[0-9]+,[0-9]+$ ]] || { echo "kernel sweep failed: $tune"; exit 6; }
    [ "${USE_PICK:-0}" = 1 ] && export MLX_PAGED_KERNEL_TUNE=$tune
    echo "sweep pick $tune; MLX_PAGED_KERNEL_TUNE=${MLX_PAGED_KERNEL_TUNE:-unset}" | tee -a "$OUT/tree-bench.txt"
    set +o pipefail
    checks
    python3 benchmarks/gpu.py profile --systems ours,ours_composed,mlx_lm --out "$OUT/gpu-$R-profile.json"
    python3 benchmarks/gpu.py mlx --systems ours,ours_composed,mlx_lm --out "$OUT/gpu-$R-mlx.json"
    python3 benchmarks/gpu.py profile --models llama8b --batch 128 --systems ours,ours_composed,mlx_lm \
        --out "$OUT/gpu-$R-profile-b128.json"
    ;;
sweep)  # where a prefill's time goes, and MLX-CUDA's graph size (ops per CUDA graph) against the batch-1 decode step
    ensure_mlx || exit $?
    git_state > "$OUT/tree-sweep.txt"
    gpu_tests pytest-sweep.log "paged and (block_shapes or compiled)"
    checks
    python3 benchmarks/gpu.py profile --models smollm2 --prefill 512 --systems ours,mlx_lm --out "$OUT/gpu-$R-prefill-512.json"
    python3 benchmarks/gpu.py profile --models llama8b --prefill 4096 --systems ours,mlx_lm --out "$OUT/gpu-$R-prefill-4096.json"
    for ops in ${OPS:-20 60 120 250}; do
        MLX_MAX_OPS_PER_BUFFER=$ops python3 benchmarks/gpu.py profile --models llama8b,smollm2 --systems ours,mlx_lm \
            --out "$OUT/gpu-$R-ops$ops.json"
    done
    MLX_USE_CUDA_GRAPHS=0 python3 benchmarks/gpu.py profile --models llama8b --systems ours,mlx_lm --out "$OUT/gpu-$R-nographs.json"
    ;;
full)  # GPU kernel tests, checks, profiles: decode at batch 1 (with the A/B) and 128, prefills (one call, < 10 min)
    ensure_mlx || exit $?
    git_state > "$OUT/tree-full.txt"
    gpu_tests pytest-full.log "(paged and (block_shapes or compiled)) or add_rms_norm or rope or off_on_cpu"
    checks
    python3 benchmarks/gpu.py profile --systems ours,${AB:-ours_rope_off},mlx_lm --out "$OUT/gpu-$R-profile.json"
    python3 benchmarks/gpu.py profile --models llama8b --batch 128 --systems ours,mlx_lm --out "$OUT/gpu-$R-profile-b128.json"
    python3 benchmarks/gpu.py profile --models smollm2 --batch 128 --systems ours,mlx_lm --out "$OUT/gpu-$R-profile-smollm2-b128.json"
    python3 benchmarks/gpu.py profile --models smollm2 --prefill 4096 --systems ours,mlx_lm --out "$OUT/gpu-$R-prefill-smollm2-4096.json"
    python3 benchmarks/gpu.py profile --models llama8b --prefill 4096 --systems ours,mlx_lm --out "$OUT/gpu-$R-prefill-4096.json"
    ;;
compare)  # the benchmark table: ours, ours with one kernel off (AB), mlx-lm, both models, each in its own process
    ensure_mlx || exit $?
    git_state > "$OUT/tree-compare.txt"
    for model in llama8b smollm2; do
        python3 benchmarks/gpu.py mlx --models $model --systems ours,${AB:-ours_rope_off},mlx_lm --out "$OUT/gpu-$R-mlx-$model.json"
    done
    python3 benchmarks/gpu.py profile --systems ours,mlx_lm --out "$OUT/gpu-$R-profile.json"
    ;;
ab)  # GPU tests, checks and batch-1 profiles, then the paired benchmark (gpu.py ab): the carried lowering, an older one
    # ($OLD, carried: omit for none) and mlx-lm side by side in one process per model, in rounds of rotating order.
    # Up to 8 files come back from a call, so the results travel as one archive (written on exit, a timeout included).
    ensure_mlx || exit $?
    real_out=$OUT; OUT=$(mktemp -d); trap 'tar czf "$real_out/gpu-$R-ab.tgz" -C "$OUT" .' EXIT
    git_state > "$OUT/tree-ab.txt"
    gpu_tests pytest-ab.log "(paged and (block_shapes or compiled)) or add_rms_norm or rope or silu or off_on_cpu"
    checks
    python3 benchmarks/gpu.py profile --systems ours,${VARIANTS:+$VARIANTS,}mlx_lm --out "$OUT/gpu-$R-profile.json"
    mkdir -p .gpuab && rm -rf .gpuab/ours && cp -r benchmarks/results/gpu-lowered .gpuab/ours
    for model in ${MODELS:-llama8b smollm2}; do
        python3 benchmarks/gpu.py ab --artefacts .gpuab/ours${OLD:+,$OLD} ${VARIANTS:+--variants $VARIANTS} --mlx-lm \
            --models $model --rounds ${ROUNDS:-5} \
            --batches ${BATCHES:-1,8,32,128} --prefills ${PREFILLS:-512,4096} --out "$OUT/gpu-$R-ab-$model.json"
    done
    ;;
run)  # (after stage1) any command once MLX-CUDA is installed: gpu_device.sh run python3 benchmarks/gpu.py ab ...
    ensure_mlx || exit $?
    shift
    "$@"
    ;;
torch)  # torch eager on the same machine (transformers' model, same shapes), and torch's copy bandwidth (the ceiling)
    git_state > "$OUT/tree-torch.txt"
    python3 benchmarks/gpu.py torch --systems ${TORCH_SYSTEMS:-eager} --budget-s ${BUDGET:-300} --out "$OUT/gpu-$R-torch.json"
    ;;
*)
    echo "usage: $0 stage1|full|compare|ab|run|torch|sweep|bench"; exit 2
    ;;
esac
