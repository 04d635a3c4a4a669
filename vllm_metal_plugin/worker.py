"""MetalWorker: vLLM's CPU worker, with our model runner and an MLX-aware memory budget."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from vllm.platforms import current_platform
from vllm.utils.torch_utils import set_random_seed
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import init_worker_distributed_environment


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

    def _maybe_get_memory_pool_context(self, tag: str):
        return nullcontext()  # no CUDA memory pool: MLX owns the device memory

    def determine_available_memory(self) -> int:
        """Bytes for the KV cache, from VLLM_METAL_MEMORY_FRACTION (runtime/memory.py)."""
        return self.model_runner.kv_cache_budget()
