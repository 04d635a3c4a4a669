"""Every runtime env var, read and validated in one place.

`RuntimeConfig.from_env()` is the only reader; a bad value raises `ConfigError` with one line naming
the variable, the value and the accepted forms, so a typo fails at start-up instead of mid-serve.
No torch here: the plugin's platform and the CLI import this before any model exists.
(VLLM_METAL_BLAS is read where it acts, in runtime/blas.py, because it is needed before MLX can be imported;
see docs/configuration.md.)
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import mlx.core as mx

from runtime.device import gpu_available

log = logging.getLogger(__name__)

BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(ValueError):
    """An env var holds a value we do not accept."""


def _bad(name: str, value: str, accepted: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is invalid; accepted: {accepted}")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise _bad(name, raw, "1 or 0 (also true/false, yes/no, on/off)")


def _fraction(env: Mapping[str, str]) -> str | float:
    name, raw = "VLLM_METAL_MEMORY_FRACTION", env.get("VLLM_METAL_MEMORY_FRACTION")
    if raw is None or raw.strip() == "" or raw.strip().lower() == "auto":
        return "auto"
    accepted = '"auto" or a number f with 0 < f <= 1 (fraction of device memory)'
    try:
        f = float(raw)
    except ValueError:
        raise _bad(name, raw, accepted) from None
    if not 0.0 < f <= 1.0:  # also rejects nan
        raise _bad(name, raw, accepted)
    return f


def _block_size(env: Mapping[str, str]) -> int:
    name, raw = "VLLM_METAL_BLOCK_SIZE", env.get("VLLM_METAL_BLOCK_SIZE")
    if raw is None or raw.strip() == "":
        return 16
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n not in BLOCK_SIZES:
        raise _bad(name, raw, ", ".join(map(str, BLOCK_SIZES)))
    return n


def _device(env: Mapping[str, str]) -> str:
    name, raw = "VLLM_MLX_DEVICE", env.get("VLLM_MLX_DEVICE")
    has_gpu = gpu_available()
    if raw is None or raw.strip() == "":
        return "gpu" if has_gpu else "cpu"
    v = raw.strip().lower()
    if v not in ("gpu", "cpu"):
        raise _bad(name, raw, "gpu or cpu")
    if v == "gpu" and not has_gpu:
        # Asked for explicitly: running on the CPU instead would be silently 10-100x slower. Refuse.
        raise ConfigError(
            f"{name}={raw!r} but this MLX build ({mx.__version__}) has no GPU backend "
            "(mx.metal / mx.cuda unavailable; on Linux install mlx-cuda-13 or mlx-cuda-12); "
            f"unset {name} or set it to cpu"
        )
    return v


# Kernels of the backends that VLLM_METAL_KERNELS_OFF can turn off (the generic entry runs instead), for A/B runs
KERNEL_SWITCHES = {
    "decode_layer": "CUDA: RoPE + K/V cache write + attention of a decode layer in one kernel",
    "decode_block_limit": "CUDA: the fused decode layer only up to FUSED_MAX_BLOCKS query heads x sequences",
    "paged_decode": "CUDA: decode attention reading the paged cache in place",
    "rope_rows": "CUDA: RoPE of q and k with the K/V cache rows laid out in one kernel",
    "kv_in_place": "CUDA: decode K/V written into the cache by the RoPE kernel, not a scatter",
    "add_rms_norm": "CUDA: residual add + RMSNorm in one kernel",
    "silu_row": "CUDA: SiLU x mul of one token as a kernel writing a contiguous row",
    "quantized_gemv": "CUDA: quantized linear of up to 8 rows as a GEMV of our own over the packed codes",
    "cpu_matmul": "CPU: float32/bfloat16/float16 linears up to GEMM_MAX_M rows through runtime._cpu_ext",
    "cpu_quantized": "CPU: quantized linears through runtime._cpu_ext (else MLX's quantized matmul)",
    "cpu_attention": "CPU: decode attention reading the paged cache in place through runtime._cpu_ext",
    "cpu_prefill": "CPU: prompt chunks over earlier context through the same kernel, from PREFILL_MIN_QUERIES rows",
}
_WARPS, _KEYS = (1, 2, 4, 8, 16, 32), (1, 2, 4, 8)


def _kernels_off(env: Mapping[str, str]) -> frozenset[str]:
    name, raw = "VLLM_METAL_KERNELS_OFF", env.get("VLLM_METAL_KERNELS_OFF", "")
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(names - set(KERNEL_SWITCHES))
    if unknown:
        raise _bad(name, raw, "a comma-separated list of " + ", ".join(KERNEL_SWITCHES))
    return names


def _paged_kernel_tune(env: Mapping[str, str]) -> tuple[int, int]:
    name, raw = "MLX_PAGED_KERNEL_TUNE", env.get("MLX_PAGED_KERNEL_TUNE", "")
    if raw.strip() == "":
        return (8, 4)
    try:
        warps, keys = (int(x) for x in raw.split(","))
    except ValueError:
        warps = keys = -1
    if warps not in _WARPS or keys not in _KEYS:
        raise _bad(name, raw, f"'WARPS,KEYS' with WARPS in {'/'.join(map(str, _WARPS))} and KEYS in "
                              f"{'/'.join(map(str, _KEYS))} (default 8,4)")
    return warps, keys


DIST_BACKENDS = ("auto", "ring", "nccl", "mpi", "jaccl")  # MLX's distributed backends (runtime/distributed.py)


def _dist_backend(env: Mapping[str, str]) -> str:
    name, raw = "VLLM_METAL_DIST_BACKEND", env.get("VLLM_METAL_DIST_BACKEND", "")
    value = raw.strip().lower() or "auto"
    if value not in DIST_BACKENDS:
        raise _bad(name, raw, ", ".join(DIST_BACKENDS))
    return value


QUANTIZE_ENV = "VLLM_METAL_QUANTIZE"
_QUANTIZE_BITS, _QUANTIZE_GROUPS, _DEFAULT_GROUP = {"q4": 4, "q8": 8}, (32, 64, 128), 64
QUANTIZE_ACCEPTED = ", ".join([*_QUANTIZE_BITS, *(f"{q}:{g}" for q in _QUANTIZE_BITS for g in _QUANTIZE_GROUPS)])


@dataclass(frozen=True)
class QuantizeSpec:
    """On-the-fly quantization: MLX affine `bits` (4 or 8) in groups of `group_size` (32, 64 or 128)."""

    bits: int
    group_size: int = _DEFAULT_GROUP

    def __str__(self) -> str:
        return f"q{self.bits}:{self.group_size}"


def parse_quantize_spec(value: str | None, name: str = QUANTIZE_ENV) -> QuantizeSpec | None:
    """`q4`, `q8`, `q4:32`, ... -> QuantizeSpec; None, "" or "none" -> None; anything else -> ConfigError."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    bits, colon, group = value.strip().lower().partition(":")
    try:
        spec = QuantizeSpec(_QUANTIZE_BITS[bits], int(group) if colon else _DEFAULT_GROUP)
    except (KeyError, ValueError):
        spec = None
    if spec is None or spec.group_size not in _QUANTIZE_GROUPS:
        raise _bad(name, value, f"{QUANTIZE_ACCEPTED} (or unset/none for full precision)")
    return spec


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """Where lowered artefacts and prepared models are kept: $VLLM_METAL_CACHE, default ~/.cache/vllm-metal."""
    env = os.environ if env is None else env
    return Path(env.get("VLLM_METAL_CACHE") or Path.home() / ".cache" / "vllm-metal").expanduser()


@dataclass(frozen=True)
class RuntimeConfig:
    memory_fraction: str | float = "auto"  # "auto" or 0 < f <= 1
    use_mlx: bool = True
    device: str = "cpu"  # resolved: "gpu" only when a GPU backend exists
    block_size: int = 16
    debug: bool = False
    debug_dir: str = os.path.join(tempfile.gettempdir(), "vllm-metal-debug")
    kernels_off: frozenset[str] = frozenset()  # KERNEL_SWITCHES names
    paged_kernel_tune: tuple[int, int] = (8, 4)  # CUDA decode attention: warps per block, keys in flight per warp
    quantize: QuantizeSpec | None = None  # quantize full-precision linear and embedding weights at load
    dist_backend: str = "auto"  # MLX's backend for tensor parallel: auto (nccl with CUDA, else ring) or DIST_BACKENDS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RuntimeConfig":
        env = os.environ if env is None else env
        debug_dir = env.get("VLLM_METAL_DEBUG_DIR", "").strip() or cls.debug_dir
        return cls(
            memory_fraction=_fraction(env),
            use_mlx=_flag(env, "VLLM_METAL_USE_MLX", True),
            device=_device(env),
            block_size=_block_size(env),
            debug=_flag(env, "VLLM_METAL_DEBUG", False),
            debug_dir=os.path.expanduser(debug_dir),
            kernels_off=_kernels_off(env),
            paged_kernel_tune=_paged_kernel_tune(env),
            quantize=parse_quantize_spec(env.get(QUANTIZE_ENV)),
            dist_backend=_dist_backend(env),
        )
