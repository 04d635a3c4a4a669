"""MetalPlatform: vLLM's CPU platform, with MLX doing the model's math.

Subclassing CpuPlatform keeps vLLM's CPU-side machinery (gloo, CPU tensors for inputs and the
sampler); `_enum = OOT` makes vLLM's custom ops take their native torch paths, which is what our
lowering captures. Here live the config checks: what we refuse, with which message, and the
settings our worker needs (our worker class, our attention backend, block size, no torch compile).
"""

from __future__ import annotations

import os

import torch
from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform
from vllm.platforms.interface import PlatformEnum

from runtime.config import RuntimeConfig
from runtime.device import device_memory_bytes
from vllm_metal_plugin.distributed import check_parallel_config
from vllm_metal_plugin.startup import StartupError, check_environment

log = init_logger("vllm.plugins.metal")  # under "vllm." so it prints with vLLM's own log lines


class MetalPlatform(CpuPlatform):
    _enum = PlatformEnum.OOT
    device_name = "cpu"  # torch tensors of inputs, outputs and the sampler live on the CPU
    device_type = "cpu"  # CpuPlatform.check_and_update_config asserts this
    dispatch_key = "CPU"
    dist_backend = "gloo"

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        # The first entry is what dtype="auto" turns a float32 checkpoint into. MLX's CPU backend is fast
        # in float32 only (OpenBLAS; it has no fast bfloat16/float16 matmul), so there float32 stays.
        if RuntimeConfig.from_env().device == "cpu":
            return [torch.float32, torch.bfloat16, torch.float16]
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def validate_environ(cls, hard_fail: bool) -> None:
        """vLLM's check for unknown `VLLM_*` variables, knowing ours, after validating ours: called
        before vLLM builds its config, so a bad value is refused as one plain error."""
        from vllm import envs

        check_environment()
        for name in os.environ:
            if name.startswith("VLLM_") and name not in envs.environment_variables and not _ours(name):
                if hard_fail:
                    raise ValueError(f"Unknown vLLM environment variable detected: {name}")
                log.warning("Unknown vLLM environment variable detected: %s", name)

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        config = RuntimeConfig.from_env()
        return f"MLX ({config.device})"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return device_memory_bytes(RuntimeConfig.from_env().device)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if getattr(attn_selector_config, "use_sparse", False):
            raise NotImplementedError("vllm-metal: sparse attention is not supported yet")
        if getattr(attn_selector_config, "use_mla", False):
            # vLLM's reference CPU MLA backend: its KV spec (one latent row per token) sizes the cache, and it is
            # the torch path; the lowered step attends over that latent cache itself
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            return AttentionBackendEnum.CPU_MLA.get_path()
        return "vllm_metal_plugin.attention_backend.MetalAttentionBackend"

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        # The lowered step reads ONE block table for every layer. vLLM's hybrid KV cache manager gives
        # sliding-window layers their own table and drops their out-of-window blocks, which broke the
        # full-attention layers of mixed models (Gemma 2: greedy tokens diverged once a window slid
        # past a block). Without it every layer keeps every block; the window is applied by the mask.
        return False

    @classmethod
    def use_custom_op_collectives(cls) -> bool:
        return True  # vLLM's all-reduce / all-gather as torch.ops.vllm.* nodes: the collectives pass's anchors

    @classmethod
    def opaque_attention_op(cls) -> bool:
        return True  # one vllm.unified_attention_with_output node per layer: the attention pass's anchor

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        """vLLM asks this before it reads any model config. A GGUF file has no config.json, which vLLM reads
        first (its speculator check): the model argument naming one is pointed at the file's model directory
        (vllm_metal_plugin/checkpoints.py), which vLLM then reads like any other; and AWQ/GPTQ checkpoints are
        claimed by this platform's quantization config, which builds full-precision layers (the weights go into
        MLX as they are quantized)."""
        super().pre_register_and_update(parser)
        # here, not at the top: vLLM's layer modules that checkpoints.py builds on import the platform themselves
        from vllm_metal_plugin.checkpoints import redirect_gguf, register_quantization

        register_quantization()
        from vllm.engine import arg_utils  # vLLM's engine arguments: imported by the time vLLM asks this

        check = arg_utils.maybe_override_with_speculators
        if not getattr(check, "reads_gguf", False):
            def gguf_aware(*args, model, tokenizer, **kwargs):
                model, tokenizer = redirect_gguf(model, tokenizer)
                return check(*args, model=model, tokenizer=tokenizer, **kwargs)

            gguf_aware.reads_gguf = True
            arg_utils.maybe_override_with_speculators = gguf_aware

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        config = RuntimeConfig.from_env()  # raises ConfigError naming any bad VLLM_METAL_* value
        check_parallel_config(vllm_config, config)  # tensor and data parallel: vllm_metal_plugin/distributed.py
        parallel = vllm_config.parallel_config
        model = vllm_config.model_config
        if config.use_mlx and model is not None and model.runner_type == "pooling":
            raise StartupError(
                "vllm-metal: the MLX step computes next-token logits, not the hidden states a pooling model "
                "(--runner pooling, embeddings) reads; set VLLM_METAL_USE_MLX=0 to pool with vLLM's torch "
                "model through this plugin"
            )
        if parallel.worker_cls == "auto":
            parallel.worker_cls = "vllm_metal_plugin.worker.MetalWorker"
        from vllm_metal_plugin.checkpoints import serve_quantized  # see pre_register_and_update

        quantized = serve_quantized(vllm_config)  # the runner loads a quantized checkpoint into MLX itself
        if quantized is not None:
            log.info("vllm-metal: %s checkpoint: its weights load into MLX as they are quantized", quantized)
        super().check_and_update_config(vllm_config)
        cache = vllm_config.cache_config
        if cache is not None and not getattr(cache, "user_specified_block_size", False):
            cache.block_size = config.block_size  # CpuPlatform picked 128 for its own kernels
        if cache is not None and cache.kv_cache_memory_bytes is None:
            # Our worker sizes the cache from VLLM_METAL_MEMORY_FRACTION; a set value also turns off
            # CPUWorker's start-up check of free RAM against gpu_memory_utilization, which is not ours.
            cache.kv_cache_memory_bytes = 0
        from vllm.config import CompilationMode

        vllm_config.compilation_config.mode = CompilationMode.NONE  # we compile with MLX, not inductor
        vllm_config.compilation_config.cudagraph_mode = vllm_config.compilation_config.cudagraph_mode.NONE
        _quiet_accelerator()
        log.info("vllm-metal: MLX platform active (device %s, block size %d, use_mlx=%s)",
                 config.device, cache.block_size if cache else config.block_size, config.use_mlx)


def _ours(name: str) -> bool:
    return name.startswith(("VLLM_METAL_", "VLLM_MLX_"))


def _quiet_accelerator() -> None:
    """CPU torch has no accelerator; vLLM's shutdown path calls torch.accelerator.empty_* anyway."""
    acc = getattr(torch, "accelerator", None)
    for name in ("empty_cache", "empty_host_cache"):
        if acc is not None and hasattr(acc, name):
            setattr(acc, name, lambda *a, **k: None)
