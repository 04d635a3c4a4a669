"""The MLX device this process runs on: whether a GPU backend exists, and how much memory the device has.

With runtime/config.py (which picks the device from VLLM_MLX_DEVICE) and the kernel backends
(runtime/kernels, which select it), the only code that asks about the device.
"""

from __future__ import annotations

import os

import mlx.core as mx

# float32 means float32: MLX runs f32 matmuls as TF32 on CUDA (and M5 GPUs) unless told otherwise,
# which cost 1e-3 relative error on the GPU against 1e-6 with it off (docs/benchmarks.md, GPU section).
# torch keeps TF32 off by default too. A user who wants the speed sets MLX_ENABLE_TF32=1. Set here, in
# every process that runs the lowered step (runtime/config.py and the kernel tables import this module
# before any step runs; MLX reads the variable at its first GPU matmul), and not at `import runtime`:
# the BLAS hook imports `runtime` in every interpreter, and processes that never run our step keep MLX's
# own default.
os.environ.setdefault("MLX_ENABLE_TF32", "0")


def gpu_available() -> bool:
    """Whether this MLX build has a usable GPU backend (Metal on macOS, CUDA with mlx-cuda)."""
    for backend in ("metal", "cuda"):
        mod = getattr(mx, backend, None)
        if mod is not None and hasattr(mod, "is_available") and mod.is_available():
            return True
    return False


def device_memory_bytes(device: str) -> int:
    """Memory the KV cache competes for on the resolved device ("cpu" or "gpu"): unified memory on Metal, GPU
    memory on CUDA, RAM on CPU."""
    if device == "gpu":
        try:
            info = mx.device_info(mx.gpu)
        except Exception:  # noqa: BLE001  older MLX: only the Metal spelling exists
            metal = getattr(mx, "metal", None)
            info = metal.device_info() if metal is not None and metal.is_available() else {}
        for key in ("memory_size", "total_memory"):
            if int(info.get(key, 0) or 0) > 0:
                return int(info[key])
    return ram_bytes()


def ram_bytes() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX sysconf: read /proc
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    # A container's cgroup limit is the real ceiling when it is lower than the host's RAM.
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            raw = f.read().strip()
        if raw.isdigit():
            total = min(total, int(raw))
    except OSError:
        pass
    return total


