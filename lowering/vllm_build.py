"""Build vLLM's own torch model for a checkpoint in this process, without the engine.

For the CLI (`lower-model --front vllm`) and tests: the same model class, weights loader and
custom-op paths the engine would use under this plugin's platform, at world size 1.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def build_vllm_model(path: str, dtype: str = "float32", max_model_len: int = 2048, load_format: str = "auto"):
    """Returns (model, vllm_config). `load_format`: vLLM's (a registered loader's) name for how weights load."""
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
        max_num_batched_tokens=max(512, max_model_len), load_format=load_format,
    ).create_engine_config()
    _set_torch_accelerator_to_noop()  # the loader empties the accelerator cache; CPU torch has none
    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():
            init_distributed_environment(
                world_size=1, rank=0, local_rank=0, backend="gloo",
                distributed_init_method=f"file://{tempfile.mktemp(prefix='vllm-dist-')}",
            )
            ensure_model_parallel_initialized(1, 1)
        _ensure_expert_group(config)
        with _foreign_classes_restored():
            model = get_model(vllm_config=config)
    return model.eval(), config


@contextlib.contextmanager
def _foreign_classes_restored():
    """vLLM's Transformers modeling backend (GPT-NeoX in vLLM 0.32) makes transformers' own model
    class compile-aware by patching that class in place (bases, __init__, __call__): from then on
    every transformers model of the class in this process needs a vLLM config to be built or called.
    The engine has its own process; here, where transformers references share the process, the class
    is put back once vLLM's model is built (vLLM never compiles it: compilation mode 0)."""
    from vllm.compilation import decorators

    names = ("__init__", "__call__", "save_aot_compiled_function", decorators.IGNORE_COMPILE_KEY)
    original, patched = decorators._support_torch_compile, []

    def recording(cls, *args, **kwargs):
        if not cls.__module__.startswith("vllm."):
            patched.append((cls, cls.__bases__, {n: cls.__dict__[n] for n in names if n in cls.__dict__}))
        return original(cls, *args, **kwargs)

    decorators._support_torch_compile = recording
    try:
        yield
    finally:
        decorators._support_torch_compile = original
        for cls, bases, attrs in reversed(patched):
            cls.__bases__ = bases
            for n in names:
                if n in attrs:
                    setattr(cls, n, attrs[n])
                elif n in cls.__dict__:
                    delattr(cls, n)


def _ensure_expert_group(config) -> None:
    """vLLM creates the expert-parallel group only when the groups are first initialised for a MoE
    model; a process that built a dense model first has none. Create it (one rank) on demand."""
    from vllm.distributed import parallel_state as ps

    if config.model_config.is_moe and ps._EP is None:
        ps._EP = ps.init_model_parallel_group([[0]], ps.get_world_group().local_rank, "gloo", group_name="ep")
