"""Tensor and data parallel: vLLM's parallel config, carried over to MLX.

vLLM starts the ranks (one worker process each), connects them with its own process groups (gloo) and builds
each rank's shard of the model. What is ours: the check of the config (`check_parallel_config`), the MLX group
each worker makes from its rank and world size in vLLM's tensor-parallel group (`init_mlx_group`), which the
lowered step's collectives run over (runtime/distributed.py), and the rank in the lowered artefact's identity.

The host list comes from vLLM's settings: every rank listens on 127.0.0.1 when all of them run on one node, and
on vLLM's address of its host (`VLLM_HOST_IP`, else the interface vLLM finds) across nodes; the addresses are
exchanged over vLLM's tensor-parallel group. The backend is `VLLM_METAL_DIST_BACKEND` (runtime/config.py).

Data parallel needs nothing here: vLLM runs one engine per data-parallel rank, each with its own worker,
lowered model and KV cache, behind its own front end.
"""

from __future__ import annotations

import torch.distributed as dist
from vllm.logger import init_logger

from runtime import distributed
from runtime.config import RuntimeConfig
from runtime.kernels import current, select

log = init_logger("vllm.plugins.metal")
PEER_TIMEOUT_S = 60.0  # without vLLM's distributed_timeout_seconds


def backend(config: RuntimeConfig) -> str:
    return distributed.resolve_backend(config.dist_backend, select(config))


def check_parallel_config(vllm_config, config: RuntimeConfig) -> None:
    """Refuse what the plugin cannot run, with the setting to change."""
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ValueError(f"vllm-metal: pipeline_parallel_size must be 1 (got {parallel.pipeline_parallel_size}); "
                         "use tensor_parallel_size to spread a model over several processes")
    if parallel.tensor_parallel_size > 1 and config.use_mlx:
        distributed.check_available(backend(config))


def tensor_parallel() -> tuple[int, int]:
    """(rank, world size) of this process in vLLM's tensor-parallel group."""
    from vllm.distributed import parallel_state  # not at the top: vLLM imports the platform (this module) first

    group = parallel_state.get_tp_group()
    return group.rank_in_group, group.world_size


def init_mlx_group(vllm_config, config: RuntimeConfig):
    """MLX's group for this worker's tensor-parallel group (None at world size 1): addresses exchanged over vLLM's
    group, every peer checked to answer within the timeout, then MLX connects."""
    from vllm.distributed import parallel_state
    from vllm.utils.network_utils import get_ip

    tp = parallel_state.get_tp_group()
    if tp.world_size == 1:
        return None
    parallel = vllm_config.parallel_config
    name = backend(config)
    host = "127.0.0.1" if getattr(parallel, "nnodes", 1) <= 1 else get_ip()
    listener = distributed.reserve_address(host)
    try:
        mine = f"{host}:{listener.getsockname()[1]}"
        addresses = [None] * tp.world_size
        dist.all_gather_object(addresses, mine, group=tp.cpu_group)
        timeout = float(parallel.distributed_timeout_seconds or PEER_TIMEOUT_S)
        distributed.wait_for_peers(addresses, tp.rank_in_group, timeout)
        dist.barrier(group=tp.cpu_group)  # every rank heard from every other one
    finally:
        listener.close()
    dist.barrier(group=tp.cpu_group)  # every probe listener closed: none of MLX's connections lands on one
    current().use_rank_device(tp.local_rank)
    group = distributed.init_group(tp.unique_name, tp.rank_in_group, tp.world_size, name, addresses)
    log.info("vllm-metal: MLX %s group %s: rank %d of %d (%s)", name, tp.unique_name, group.rank(), group.size(),
             ", ".join(addresses))
    return group


def identity() -> dict:
    """What distinguishes this rank's lowered step from another's: the rank and size of its tensor-parallel group
    (shapes are per shard; the vocab-parallel embedding's range is a constant of the graph)."""
    rank, size = tensor_parallel()
    return {} if size == 1 else {"tp_rank": rank, "tp_size": size}


def ranks_sharing_device(vllm_config, config: RuntimeConfig) -> int:
    """How many tensor-parallel ranks share this node's device memory: all of the node's ranks on the CPU or a Mac's
    unified memory; one with CUDA, where each rank has a GPU of its own."""
    if not select(config).ranks_share_memory:
        return 1
    _, size = tensor_parallel()
    return max(1, size // max(1, getattr(vllm_config.parallel_config, "nnodes", 1)))
