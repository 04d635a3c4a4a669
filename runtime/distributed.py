"""The MLX communication group of this process: what the lowered step's collectives (`k.all_reduce`,
`k.all_gather`) run over.

A group is registered under the name of the group it stands for (vLLM's tensor-parallel group, "tp:0"), with
the rank and size that group has: the emitted step names it, and the kernel table looks it up here. The
backends are MLX's own (`mx.distributed`):

- "ring": TCP between the ranks, on one host or several; each rank listens on its own address of the host
  list (MLX_HOSTFILE, written here). The default without CUDA.
- "nccl": CUDA GPUs; rank 0's address is the rendezvous (NCCL_HOST_IP, NCCL_PORT). The default with CUDA.
- "mpi", "jaccl": configured by MLX's own environment (an MPI launcher, JACCL's device list); the group they
  give must have the rank and size asked for.

Before MLX connects (its ring waits for a peer with no time limit), `wait_for_peers` checks within a timeout
that every address answers, so a peer that is not there is named instead of waited for.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import mlx.core as mx

from runtime.config import ConfigError

BACKENDS = ("ring", "nccl", "mpi", "jaccl")
_groups: dict[str, mx.distributed.Group] = {}
_addresses: dict[str, list[str]] = {}


class DistributedError(RuntimeError):
    """A peer did not answer, or MLX's group is not the one asked for."""


def resolve_backend(backend: str, table) -> str:
    """The backend "auto" stands for with a kernel table (runtime/kernels: NCCL on CUDA, else the TCP ring)."""
    return table.dist_backend if backend == "auto" else backend


def check_available(backend: str, setting: str = "VLLM_METAL_DIST_BACKEND") -> None:
    """Refuse a backend this MLX build cannot create."""
    if backend not in BACKENDS:
        raise ConfigError(f"{setting}={backend!r} is invalid; accepted: auto, {', '.join(BACKENDS)}")
    if not mx.distributed.is_available(backend):
        present = [b for b in BACKENDS if mx.distributed.is_available(b)]
        raise ConfigError(f"{setting}={backend!r}: this MLX build ({mx.__version__}) has no {backend} backend "
                          f"(available here: {', '.join(present) or 'none'}); choose one of those")


def reserve_address(host: str) -> socket.socket:
    """A listening socket on a free port of `host`: the address this rank gives its peers. It answers their
    probes (`wait_for_peers`) and is closed just before MLX listens on the same port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(16)
    return sock


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def wait_for_peers(addresses: list[str], rank: int, timeout_s: float) -> None:
    """Connect to every other rank's address until it answers; raise DistributedError naming the first rank
    that did not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    for peer, address in enumerate(addresses):
        if peer == rank:
            continue
        while True:
            try:
                with socket.create_connection(_split(address), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                    break
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise DistributedError(
                        f"rank {peer} of {len(addresses)} at {address} did not answer rank {rank} within "
                        f"{timeout_s:g} s ({e.strerror or e}); check that it is running and that the address is "
                        "reachable from here") from None
                time.sleep(0.2)


def init_group(name: str, rank: int, size: int, backend: str, addresses: list[str]) -> mx.distributed.Group:
    """Create MLX's group for `rank` of `size` over `backend`, with `addresses[i]` rank i's "host:port", and
    register it under `name`. With NCCL this process is on its rank's GPU already (the kernel table's
    `use_rank_device`)."""
    check_available(backend)
    if len(addresses) != size:
        raise DistributedError(f"group {name}: {len(addresses)} addresses for {size} ranks")
    os.environ["MLX_RANK"] = str(rank)
    hostfile = None
    if backend == "ring":
        fd, hostfile = tempfile.mkstemp(prefix="mlx-hosts-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump([[a] for a in addresses], f)
        os.environ["MLX_HOSTFILE"] = hostfile
    elif backend == "nccl":
        host, port = _split(addresses[0])
        os.environ.update(NCCL_HOST_IP=host, NCCL_PORT=str(port), MLX_WORLD_SIZE=str(size))
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise DistributedError(f"MLX's {backend} backend could not connect rank {rank} of {size} "
                               f"({', '.join(addresses)}): {e}") from e
    finally:
        if hostfile is not None:
            os.unlink(hostfile)
    if (group.rank(), group.size()) != (rank, size):
        raise DistributedError(f"MLX's {backend} backend gave rank {group.rank()} of {group.size()}, but this process "
                               f"is rank {rank} of {size} in {name}: its environment launches another world")
    _groups[name] = group
    _addresses[name] = list(addresses)
    return group


def group(name: str, size: int | None = None) -> mx.distributed.Group:
    """The MLX group registered under `name`; given `size` (the size the step was lowered for), it must have as
    many ranks."""
    found = _groups.get(name)
    if found is None:
        raise DistributedError(f"the lowered step communicates over vLLM's group {name}, but this process has no "
                               f"MLX group for it (registered: {', '.join(_groups) or 'none'})")
    if size is not None and found.size() != size:
        raise DistributedError(f"the lowered step was lowered for {size} ranks in {name}; its MLX group has "
                               f"{found.size()}")
    return found


def peer_lost(error: BaseException) -> DistributedError | None:
    """For an error of MLX's ring backend (a peer's connection closed: it exited or was killed), the same error
    naming this process's groups and their ranks' addresses; None for any other error."""
    if "[ring]" not in str(error) or not _groups:
        return None
    where = "; ".join(f"{name}: rank {g.rank()} of {g.size()}, ranks at {', '.join(_addresses[name])}"
                      for name, g in _groups.items())
    return DistributedError(f"a peer of this rank's MLX group stopped answering ({where}): {error}")
