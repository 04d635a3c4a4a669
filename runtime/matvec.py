"""Build and load runtime/matvec.c: MLX's cblas_sgemm with M == 1 products sent to cblas_sgemv.

Built once per source version with the system C compiler into `$VLLM_METAL_CACHE/matvec/<hash>/`
(atomic rename, so concurrent first runs are safe). Without a compiler, `load` returns None and MLX
calls OpenBLAS's sgemm directly: correct, just slower at batch 1. Imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("matvec.c")
_lib: ctypes.CDLL | None = None


def _cache_dir() -> Path:
    root = Path(os.environ.get("VLLM_METAL_CACHE", Path.home() / ".cache" / "vllm-metal")).expanduser()
    return root / "matvec" / hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def build() -> Path | None:
    """Path of the built shim (building it if needed), or None without a C compiler."""
    target = _cache_dir() / "libvllm_metal_matvec.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)], check=True, capture_output=True)
        os.replace(tmp, target)
    except (OSError, subprocess.CalledProcessError):
        os.unlink(tmp)
        return None
    return target


def load(blas: ctypes.CDLL) -> int | None:
    """Address of the shim's sgemm, wired to `blas`'s sgemm and sgemv; None if it cannot be had."""
    global _lib
    try:
        gemm, gemv = blas.cblas_sgemm, blas.cblas_sgemv
    except AttributeError:
        return None
    if _lib is None:
        path = build()
        if path is None:
            return None
        _lib = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        _lib.vllm_metal_matvec_init.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        _lib.vllm_metal_matvec_init(ctypes.cast(gemm, ctypes.c_void_p), ctypes.cast(gemv, ctypes.c_void_p))
    return ctypes.cast(_lib.vllm_metal_sgemm, ctypes.c_void_p).value


def path() -> str | None:
    """Where the loaded shim lives (None if it is not in use)."""
    return _lib._name if _lib is not None else None
