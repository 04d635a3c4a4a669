"""Every runtime env var, read and validated in one place.

`RuntimeConfig.from_env()` is the only reader; a bad value raises `ConfigError` with one line naming
the variable, the value and the accepted forms, so a typo fails at start-up instead of mid-serve.
No torch here: the plugin's platform and the CLI import this before any model exists.
(VLLM_METAL_CACHE and VLLM_METAL_BLAS are read where they act, in runtime/models.py and
runtime/blas.py, because both are needed before this module can be imported; see docs/configuration.md.)
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Mapping

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


def gpu_available() -> bool:
    """Whether this MLX build has a usable GPU backend (Metal on macOS, CUDA with mlx-cuda)."""
    import mlx.core as mx

    for backend in ("metal", "cuda"):
        mod = getattr(mx, backend, None)
        if mod is not None and hasattr(mod, "is_available") and mod.is_available():
            return True
    return False


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
        import mlx.core as mx

        raise ConfigError(
            f"{name}={raw!r} but this MLX build ({mx.__version__}) has no GPU backend "
            "(mx.metal / mx.cuda unavailable; on Linux install mlx-cuda-13 or mlx-cuda-12); "
            f"unset {name} or set it to cpu"
        )
    return v


@dataclass(frozen=True)
class RuntimeConfig:
    memory_fraction: str | float = "auto"  # "auto" or 0 < f <= 1
    use_mlx: bool = True
    device: str = "cpu"  # resolved: "gpu" only when a GPU backend exists
    block_size: int = 16
    debug: bool = False
    debug_dir: str = os.path.join(tempfile.gettempdir(), "vllm-metal-debug")

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
        )


_selected: str | None = None


def select_device(config: RuntimeConfig) -> str:
    """Set MLX's default device from the config, once per process (later calls only check agreement)."""
    global _selected
    if _selected is None:
        import mlx.core as mx

        mx.set_default_device(mx.gpu if config.device == "gpu" else mx.cpu)
        _selected = config.device
    elif _selected != config.device:
        log.warning("MLX device already set to %s; ignoring request for %s", _selected, config.device)
    return _selected


def on_cuda() -> bool:
    """Whether MLX's default device (at trace time) is a CUDA GPU: where runtime/paged_kernel.py's and
    runtime/norm.py's `mx.fast.cuda_kernel`s run (they exist on every MLX build, run only there)."""
    import mlx.core as mx

    if mx.default_device().type != mx.gpu:
        return False
    cuda = getattr(mx, "cuda", None)
    return cuda is not None and cuda.is_available()
