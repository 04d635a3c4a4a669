"""The kernel table: what the emitted step calls (`k.<name>(...)`), one table per device.

`select(config)` builds the table of the device the config names: `cpu` (MLX's CPU backend), `cuda` or
`metal` (MLX's GPU backends), each a subclass of `generic` that replaces the entries it has faster kernels
for. This package is the only code that asks which device MLX runs on (with runtime/config.py and
runtime/device.py). `select_device(config)` sets MLX's default device and this process's table, once;
`current()` is that table, which an emitted step module binds as `k` when it is loaded
(lowering.compile.load_step may bind another, as benchmarks do to compare variants in one process).
"""

from __future__ import annotations

import logging

import mlx.core as mx

from runtime.config import RuntimeConfig
from runtime.kernels.cpu import Cpu
from runtime.kernels.cuda import Cuda
from runtime.kernels.generic import Generic
from runtime.kernels.metal import Metal

log = logging.getLogger(__name__)
BACKENDS = {"generic": Generic, "cpu": Cpu, "cuda": Cuda, "metal": Metal}
_current: Generic | None = None


def backend_of(device: str) -> str:
    """The backend for a resolved device name ("cpu" or "gpu"): a GPU is CUDA's or Metal's."""
    if device == "cpu":
        return "cpu"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "metal"


def select(config: RuntimeConfig) -> Generic:
    """The kernel table for `config` (its device and its kernel switches)."""
    return BACKENDS[backend_of(config.device)](config)


def select_device(config: RuntimeConfig) -> Generic:
    """Set MLX's default device and this process's kernel table from the config, once per process (later
    calls only check agreement). Returns the table."""
    global _current
    if _current is None:
        mx.set_default_device(mx.gpu if config.device == "gpu" else mx.cpu)
        _current = select(config)
    elif _current.config.device != config.device:
        log.warning("MLX device already set to %s; ignoring request for %s", _current.config.device, config.device)
    return _current


def current() -> Generic:
    """This process's table: the one `select_device` chose, or the table of the device the environment selects."""
    return _current if _current is not None else select_device(RuntimeConfig.from_env())


__all__ = ["BACKENDS", "Cpu", "Cuda", "Generic", "Metal", "backend_of", "current", "select", "select_device"]
