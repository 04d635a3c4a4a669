"""Emitted source -> `mx.compile`d callable, and the on-disk cache of emitted artefacts.

An artefact is the step's source plus a JSON description of its weights and attention layers,
stored under `$VLLM_METAL_CACHE/lowered/<key>/`, where the key hashes the model's identity (config,
dtype, front end, weight format, quantization), the versions of torch, vLLM and MLX, and the code of
lowering/, passes/ and runtime/ (so any change to a pass or a kernel makes a new key). Files are written to a temp dir and renamed into place (two processes lowering the
same model never expose a half-written artefact), and the source's sha256 is checked before it is
ever executed: a truncated or altered artefact is rebuilt, never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import types
from pathlib import Path

import mlx.core as mx
import torch

from runtime.config import cache_root
from runtime.model import prepare_weights

SOURCE, META, CONSTANTS = "step.py", "meta.json", "constants.safetensors"


class Step:
    """An emitted step function (compiled or not), the table of what it reads from its weights, and the kernel
    table it calls: call it with `prepare(weights)`, made once (runtime.model.prepare_weights), not with the
    weights themselves."""

    def __init__(self, fn, weights: dict[str, tuple[str, bool]], kernels):
        self.fn, self.weights, self.kernels = fn, weights, kernels

    def __call__(self, *args):
        return self.fn(*args)

    def prepare(self, weights: dict) -> dict:
        return prepare_weights(weights, self.weights)


def load_step(source: str, name: str = "step", jit: bool = True, kernels=None) -> Step:
    """Execute emitted source as a fresh module and return its step function (compiled). `kernels`: the kernel
    table the step calls (runtime.kernels.select(config)); by default this process's (runtime.kernels.current())."""
    module = types.ModuleType(f"lowered_{hashlib.sha256(source.encode()).hexdigest()[:12]}")
    exec(compile_source(source, module.__name__), module.__dict__)
    if kernels is not None:
        module.k = kernels
    fn = getattr(module, name)
    return Step(mx.compile(fn) if jit else fn, getattr(module, "WEIGHTS", {}), module.k)


def compile_source(source: str, filename: str):
    return compile(source, f"<{filename}>", "exec")  # noqa: the builtin, not mx.compile


def cache_dir() -> Path:
    return cache_root() / "lowered"


def code_version() -> str:
    """Hash of the lowering and pass code: a change to either invalidates cached artefacts."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in ("lowering", "passes", "runtime"):
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".j2"):
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_key(identity: dict) -> str:
    try:
        import vllm  # here, not at the top: the HF front end works without vLLM

        vllm_version = vllm.__version__
    except Exception:
        vllm_version = "none"
    full = dict(identity, torch=torch.__version__, mlx=mx.__version__, vllm=vllm_version, code=code_version())
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_artefact(key: str) -> tuple[str, dict, dict] | None:
    """(source, meta, constants) if a verified artefact exists for `key`; a damaged one is deleted."""
    folder = cache_dir() / key
    try:
        meta = json.loads((folder / META).read_text())
        source = (folder / SOURCE).read_text()
        intact = (
            hashlib.sha256(source.encode()).hexdigest() == meta["source_sha256"]
            and _file_sha256(folder / CONSTANTS) == meta["constants_sha256"]
        )
        constants = mx.load(str(folder / CONSTANTS)) if intact else None
    except (OSError, ValueError, KeyError, RuntimeError):
        intact = False
    if not intact:  # altered, truncated or half-deleted: never execute it
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return source, meta, constants


def store_artefact(key: str, source: str, meta: dict, constants: dict) -> Path:
    folder = cache_dir() / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    (tmp / SOURCE).write_text(source)
    mx.save_safetensors(str(tmp / CONSTANTS), constants or {"_": mx.zeros(1)})
    meta = dict(meta, source_sha256=hashlib.sha256(source.encode()).hexdigest(),
                constants_sha256=_file_sha256(tmp / CONSTANTS))
    (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
    try:
        os.rename(tmp, folder)  # atomic; if another process won the race, keep theirs
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
