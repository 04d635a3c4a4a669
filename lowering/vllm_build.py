"""Build vLLM's own torch model for a checkpoint in this process, without the engine.

For the CLI (`lower-model --front vllm`) and tests: the same model class, weights loader and
custom-op paths the engine would use under this plugin's platform, at world size 1.
"""

from __future__ import annotations

import os
import tempfile


def build_vllm_model(path: str, dtype: str = "float32", max_model_len: int = 2048):
    """Returns (model, vllm_config)."""
    os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="vllm-rpc-"))
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    config = EngineArgs(
        model=path, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
        compilation_config={"mode": 0}, skip_tokenizer_init=True, max_num_seqs=8,
        max_num_batched_tokens=max(512, max_model_len),
    ).create_engine_config()
    _set_torch_accelerator_to_noop()  # the loader empties the accelerator cache; CPU torch has none
    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():
            init_distributed_environment(
                world_size=1, rank=0, local_rank=0, backend="gloo",
                distributed_init_method=f"file://{tempfile.mktemp(prefix='vllm-dist-')}",
            )
            ensure_model_parallel_initialized(1, 1)
        model = get_model(vllm_config=config)
    return model.eval(), config
