"""MetalWorker: vLLM's CPU worker, with our model runner and an MLX-aware memory budget."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
from vllm.platforms import CpuArchEnum, current_platform
from vllm.utils.torch_utils import set_random_seed
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import init_worker_distributed_environment

from runtime.distributed import peer_lost
from vllm_metal_plugin.distributed import init_mlx_group


class MetalWorker(CPUWorker):
    def init_device(self) -> None:
        # CPUWorker.init_device, minus CPU thread pinning, constructing our runner (it hard-codes its own).
        from vllm_metal_plugin.model_runner import MetalModelRunner

        self.device = torch.device("cpu")
        init = self.distributed_init_method
        os.environ["VLLM_DIST_IDENT"] = (
            os.path.basename(init.removeprefix("file://")) if init.startswith("file://") else init.split(":")[-1]
        )
        init_worker_distributed_environment(
            self.vllm_config, self.rank, self.distributed_init_method, self.local_rank, current_platform.dist_backend
        )
        set_random_seed(self.model_config.seed)
        self.model_runner = MetalModelRunner(self.vllm_config, self.device)
        _sample_as_cpu_platform(self.model_runner)
        if self.model_runner.metal.use_mlx:  # the lowered step's collectives run over MLX's group of these ranks
            init_mlx_group(self.vllm_config, self.model_runner.metal)

    def execute_model(self, *args, **kwargs):
        with _peers_named():
            return super().execute_model(*args, **kwargs)

    def sample_tokens(self, *args, **kwargs):
        with _peers_named():  # the lowered step runs when vLLM reads the logits
            return super().sample_tokens(*args, **kwargs)

    def _maybe_get_memory_pool_context(self, tag: str):
        return nullcontext()  # no CUDA memory pool: MLX owns the device memory

    def determine_available_memory(self) -> int:
        """Bytes for the KV cache, from VLLM_METAL_MEMORY_FRACTION (runtime/memory.py)."""
        return self.model_runner.kv_cache_budget()


def _sample_as_cpu_platform(runner) -> None:
    """Sample the way vLLM's CPU platform does. vLLM's top-k/top-p sampler picks its implementation by
    platform, and `_enum = OOT` gets the generic torch one, whose random stream differs from the CPU
    platform's fused Gumbel-max kernel: the same seed gave other tokens than under `VLLM_PLUGINS=none`.
    Our logits are CPU tensors, so vLLM's CPU sampler applies as it is."""
    sampler = getattr(getattr(runner, "sampler", None), "topk_topp_sampler", None)
    arch = current_platform.get_cpu_architecture()
    if (sampler is not None and hasattr(sampler, "forward_cpu") and hasattr(torch.ops._C, "fused_gumbel_argmax")
            and arch not in (CpuArchEnum.RISCV, CpuArchEnum.POWERPC)):  # vLLM's CPU platform's own exceptions
        sampler.forward = sampler.forward_cpu


@contextmanager
def _peers_named():
    """A collective that failed because a peer rank went away says which group and addresses it was."""
    try:
        yield
    except RuntimeError as e:
        named = peer_lost(e)
        if named is None:
            raise
        raise named from e
