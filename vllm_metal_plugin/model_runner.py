"""MetalModelRunner: vLLM's CPU model runner with the model step replaced by the lowered MLX step.

vLLM keeps doing everything around the model (input batch, block tables, slot mapping, chunked
prefill, prefix caching, preemption, sampling). This runner (1) lowers the loaded torch model
once (cached on disk), (2) allocates the paged KV cache in MLX with the number of blocks vLLM
chose, and (3) turns each step's attention metadata into a runtime StepInput. Logits are computed
in MLX for exactly the rows vLLM samples from. No math lives here.
"""

from __future__ import annotations

import json
import os
import time

import mlx.core as mx
import numpy as np
import torch
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.model_loader import get_model_loader
from vllm.v1.kv_cache_interface import MLAAttentionSpec
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.utils import bind_kv_cache

from lowering.api import cache_layout, lower, lower_cached
from lowering.capture import capture_vllm
from lowering.compile import cache_key, load_artefact, load_step
from lowering.emit import UnsupportedOpsError
from runtime.batch import StepInput
from runtime.config import RuntimeConfig
from runtime.device import device_memory_bytes
from runtime.kernels import select_device
from runtime.memory import plan_kv_blocks, weights_bytes
from runtime.model import CacheLayout, LoweredModel
from vllm_metal_plugin.checkpoints import checkpoint_sources
from vllm_metal_plugin.debug import locate_in_step
from weights.model_dir import quantized_source
from vllm_metal_plugin.distributed import identity as parallel_identity
from vllm_metal_plugin.distributed import ranks_sharing_device

log = init_logger("vllm.plugins.metal")  # under "vllm." so it prints with vLLM's own log lines
_MX_DTYPE = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}


class _PendingLogits:
    """What `_model_forward` returns with MLX: a lazy stand-in for the hidden states.

    vLLM indexes it with the rows it samples from (`hidden[logits_indices]`), which is when the MLX
    step runs - computing logits for those rows only. Slices (`hidden[:num_tokens]` in vLLM's
    bookkeeping, `hidden[a:b]` for prompt logprobs) stay lazy: the step runs only if their rows are
    used (`compute_logits`), and then once for every token of the step.
    """

    def __init__(self, runner: "MetalModelRunner", step, rows: np.ndarray | None = None, shared: dict | None = None):
        self.runner, self.step = runner, step
        self.rows = np.arange(len(step.input_ids)) if rows is None else rows
        self.shared = {} if shared is None else shared  # logits of every token, once computed

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _PendingLogits(self.runner, self.step, self.rows[index], self.shared)
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
        return self._logits(self.rows[index])

    def materialize(self) -> torch.Tensor:
        return self._logits(self.rows)

    def _logits(self, rows: np.ndarray) -> torch.Tensor:
        if "all" in self.shared:
            return self.shared["all"][torch.from_numpy(rows)]
        if self.shared.get("ran"):  # a second set of rows in one step (prompt logprobs): all tokens, once
            self.step.logits_indices = np.arange(len(self.step.input_ids))
            self.shared["all"] = self.runner.run_step(self.step)
            return self.shared["all"][torch.from_numpy(rows)]
        self.shared["ran"] = True
        self.step.logits_indices = rows
        return self.runner.run_step(self.step)


class MetalModelRunner(CPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self.metal = RuntimeConfig.from_env()
        select_device(self.metal)
        self.lowered = None  # runtime.model.LoweredModel, built once the KV cache is sized
        self._source = self._weights = self._layers = None

    # -- load: lower the torch model vLLM built --------------------------------------------------
    def load_model(self, load_dummy_weights: bool = False) -> None:
        try:
            if self.metal.use_mlx:
                self._load_checked()
            else:
                super().load_model(load_dummy_weights)
        except Exception as exc:
            damaged = _damaged_weight_files(self.model_config.model)
            if damaged:  # safetensors' own message names no file ("incomplete metadata, ...")
                raise RuntimeError(f"vllm-metal: cannot load the weights of {self.model_config.model}: "
                                   + "; ".join(damaged)) from exc
            raise
        if not self.metal.use_mlx:
            return
        model = self.model
        state = dict(model.named_parameters(remove_duplicate=False))
        state.update(dict(model.named_buffers(remove_duplicate=False)))
        start = time.perf_counter()
        sources, fmt = checkpoint_sources(model, self.model_config.model)
        identity = self._identity(fmt)
        self._source, self._weights, self._layers, info = lower_cached(
            identity, lambda: capture_vllm(model, self.vllm_config), state, sources=sources, quantize=self.metal.quantize
        )
        log.info("vllm-metal: lowered %s (%s cache, %.1f s, %d attention layers)",
                 self.model_config.model, info["cache"], time.perf_counter() - start, len(self._layers))
        if self.metal.debug:
            os.makedirs(self.metal.debug_dir, exist_ok=True)
            path = os.path.join(self.metal.debug_dir, f"step_{info['key']}.py")
            with open(path, "w") as f:
                f.write(self._source)
            log.info("vllm-metal: debug: lowered MLX source written to %s", path)
        model.compute_logits = _materialize  # logits come out of the MLX step already
        for p in model.parameters():  # MLX holds its own copy: release the torch weights
            p.data = torch.empty(0, dtype=p.dtype)

    def _identity(self, fmt: str | None) -> dict:
        """What the lowered artefact of this model is cached under (lowering.compile.cache_key)."""
        return {
            "front": "vllm",
            "model": self.model_config.model,
            "dtype": str(self.model_config.dtype),
            "hf_config": self.model_config.hf_config.to_json_string(use_diff=False),
            "weights": fmt or "full precision",
            "quantize": str(self.metal.quantize),
            **parallel_identity(),
        }

    def _load_checked(self) -> None:
        """CPUModelRunner.load_model with the lowering check between building the model and reading its weights:
        a model with ops we cannot lower is refused before any weight loads."""
        loader = get_model_loader(self.vllm_config.load_config)
        load_weights = loader.load_weights

        def checked(model, model_config):
            self._refuse_unsupported(model)
            load_weights(model, model_config)

        loader.load_weights = checked
        log.info("Starting to load model %s...", self.model_config.model)
        self.model = loader.load_model(vllm_config=self.vllm_config, model_config=self.model_config)
        if self.lora_config:
            self.model = self.load_lora_model(self.model, self.vllm_config, self.device)
        if hasattr(self, "drafter"):
            self.drafter.load_model(self.model)
        self._setup_eagle3_aux_hidden_state_outputs()

    def _refuse_unsupported(self, model) -> None:
        """Capture and lower the model vLLM built, before its weights load (the capture reads shapes, not values):
        every op without an MLX lowering is named in one error. A model lowered before (a cached artefact) is
        not captured again."""
        found = quantized_source(self.model_config.model)
        if load_artefact(cache_key(self._identity(found[0] if found else None))) is not None:
            return
        try:
            program = lower(capture_vllm(model, self.vllm_config)).program
            cache_layout(program, 16, mx.float32)  # one cache layout for every layer, or a refusal naming why
        except (UnsupportedOpsError, NotImplementedError) as exc:
            missing = exc.targets() if isinstance(exc, UnsupportedOpsError) else [str(exc).splitlines()[0]]
            arch = ", ".join(getattr(self.model_config.hf_config, "architectures", None) or ["this model"])
            raise RuntimeError(
                f"vllm-metal: {arch} cannot run on this platform, it needs what the MLX lowering lacks: "
                f"{'; '.join(missing)} (docs/models.md lists every architecture and what it lacks)") from exc
        except Exception as exc:  # noqa: BLE001  a capture that needs the loaded weights: it runs again after them
            log.debug("vllm-metal: lowering check before the weights load skipped: %r", exc)

    # -- memory ------------------------------------------------------------------------------------
    def kv_cache_budget(self) -> int:
        spec = next(iter(self.get_kv_cache_spec().values()))
        dtype = _MX_DTYPE[spec.dtype]
        layers = len(self.get_kv_cache_spec())
        layout = CacheLayout(layers, spec.num_kv_heads, spec.head_size, spec.block_size, dtype, _planes(spec))
        used = weights_bytes(self._weights) if self._weights else sum(
            p.numel() * p.element_size() for p in self.model.parameters())
        hf = self.model_config.hf_config
        plan = plan_kv_blocks(
            layout, used, self.metal.memory_fraction,
            device_memory_bytes(self.metal.device) // ranks_sharing_device(self.vllm_config, self.metal),
            self.model_config.max_model_len, self.scheduler_config.max_num_seqs,
            hidden_size=getattr(hf, "hidden_size", None), num_heads=getattr(hf, "num_attention_heads", None),
            max_num_batched_tokens=self.scheduler_config.max_num_batched_tokens,
        )
        log.info("vllm-metal: KV cache plan %s", json.dumps(plan.as_dict()))
        return plan.kv_bytes

    # -- KV cache ----------------------------------------------------------------------------------
    def initialize_kv_cache_tensors(self, kv_cache_config, kernel_block_sizes, kv_cache_allocation_context=None):
        num_blocks = kv_cache_config.num_blocks
        names, spec = [], None
        for group in kv_cache_config.kv_cache_groups:
            spec = group.kv_cache_spec
            names.extend(group.layer_names)
        block_size = kernel_block_sizes[0] if kernel_block_sizes else spec.block_size
        if self.metal.use_mlx:
            layout = CacheLayout(len(self._layers), spec.num_kv_heads, spec.head_size, block_size,
                                 _MX_DTYPE[spec.dtype], _planes(spec))
            self.lowered = LoweredModel(load_step(self._source), self._weights, layout, num_blocks)
            caches = {name: torch.empty(0, 1) for name in names}  # no torch cache (MLA layers squeeze dim 1)
        else:
            shape = (2, num_blocks, block_size, spec.num_kv_heads, spec.head_size)
            caches = {name: torch.zeros(shape, dtype=spec.dtype) for name in names}
        bind_kv_cache(caches, self.compilation_config.static_forward_context, self.kv_caches)
        return caches

    # -- the step ----------------------------------------------------------------------------------
    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                       **model_kwargs):
        if not self.metal.use_mlx:
            return super()._model_forward(input_ids=input_ids, positions=positions,
                                          intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds,
                                          **model_kwargs)
        md = next(iter(get_forward_context().attn_metadata.values()))
        n = md.num_actual_tokens
        # MLA metadata splits the requests into decode and prefill parts: their lengths and block table come from
        # the runner's batch (the same arrays vLLM builds every backend's metadata from)
        seq_lens = md.seq_lens if hasattr(md, "seq_lens") else self.seq_lens[:md.num_reqs]
        block_table = md.block_table if hasattr(md, "block_table") else \
            self.input_batch.block_table[0].get_device_tensor(md.num_reqs)
        step = StepInput(
            input_ids=input_ids[:n].numpy(), positions=positions[:n].numpy(),
            query_start_loc=md.query_start_loc.numpy(), seq_lens=seq_lens.numpy(),
            block_table=block_table.numpy(), slot_mapping=md.slot_mapping.numpy(),
            logits_indices=np.zeros(0, np.int64),
        )
        return _PendingLogits(self, step)

    def run_step(self, step) -> torch.Tensor:
        start = time.perf_counter()
        # Debug mode keeps the cache as it was before this step (for the NaN re-run). Only then: a second
        # reference stops MLX from updating the cache in place, so every step copied all of it (2x its
        # memory; ~0.9 s a step for 1.7 GB on 2 loaded cores).
        kv_before = self.lowered.kv if self.metal.debug else None
        logits = self.lowered.step(step)
        out = torch.from_numpy(np.array(logits.astype(mx.float32), copy=False))
        if self.metal.debug:
            if not torch.isfinite(out).all():
                found = locate_in_step(self._source, self.lowered, step, kv_before)
                log.error("vllm-metal: non-finite logits in this step (tokens %d, seqs %d): %s",
                          len(step.input_ids), len(step.seq_lens),
                          found if found is not None else "the eager re-run was finite (compiled-step only)")
            log.info("vllm-metal: step %d tokens / %d seqs in %.1f ms", len(step.input_ids),
                     len(step.seq_lens), (time.perf_counter() - start) * 1e3)
        return out


def _planes(spec) -> int:
    """Cache planes of a KV spec: K and V, or one latent plane (multi-head latent attention)."""
    return 1 if isinstance(spec, MLAAttentionSpec) else 2


def _materialize(hidden):
    return hidden.materialize() if isinstance(hidden, _PendingLogits) else hidden


def _damaged_weight_files(model_dir: str) -> list[str]:
    """'<file> (<n> bytes) is truncated or damaged: <reason>' for each unreadable *.safetensors file."""
    from pathlib import Path

    from safetensors import safe_open

    bad = []
    for path in sorted(Path(model_dir).glob("*.safetensors")) if os.path.isdir(model_dir) else []:
        try:
            with safe_open(str(path), "np") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001  any failure to read the header is the answer
            bad.append(f"{path} ({path.stat().st_size} bytes) is truncated or damaged: {e}")
    return bad
