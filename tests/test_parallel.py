"""Tensor and data parallel on this machine: several processes on loopback, MLX's ring backend.

Fast: the pieces. The collectives of the kernel table and a lowered tensor-parallel graph over a ring of two
processes against float64 NumPy; the peer probe naming a rank that does not answer; in-place ops made values; the
settings vLLM or the platform refuses.

Slow (engines, minutes on 2 cores): tiny Llama checkpoints with 8 query heads and 4, 2 or 1 KV heads (sharded 2 and 1
per rank, replicated at 1) through `vllm.LLM` at tensor_parallel_size 1 and 2, greedy tokens identical; the OpenAI
server at tensor_parallel_size 2 against the same tokens, then a rank killed mid-generation; the server at
data_parallel_size 2 with 32 requests against data_parallel_size 1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest
import torch

import runtime  # noqa: F401  (fast BLAS before mlx)
import tp_helpers as tph
import vllm_helpers as vh
from reliability_helpers import run_python
from lowering.testing import check_pass
from passes.inplace import PASS as FUNCTIONALIZE
from runtime import distributed
from runtime.config import ConfigError
from runtime.kernels import Cpu, Cuda, Metal

LOGPROB_TOLERANCE = 1e-4  # f32: a tensor-parallel sum adds the shards in another order
NEAR_TIE = 1e-4


# -- the pieces -------------------------------------------------------------------------------------------------
def test_peer_probe_names_the_rank_that_does_not_answer():
    listener = distributed.reserve_address("127.0.0.1")
    try:
        live = f"127.0.0.1:{listener.getsockname()[1]}"
        distributed.wait_for_peers([live, live], 0, 5.0)  # a listening peer answers at once
        dead = f"127.0.0.1:{vh.free_port()}"
        start = time.monotonic()
        with pytest.raises(distributed.DistributedError) as info:
            distributed.wait_for_peers([live, live, dead], 0, 1.0)
        took = time.monotonic() - start
    finally:
        listener.close()
    message = str(info.value)
    assert f"rank 2 of 3 at {dead} did not answer rank 0 within 1 s" in message, message
    assert took < 5, took
    print(f"\nrefused in {took:.1f} s: {message}")


def test_unavailable_backend_and_missing_group_are_named():
    missing = [b for b in distributed.BACKENDS if not mx.distributed.is_available(b)]
    if not missing:
        pytest.skip("every MLX backend is available here")
    with pytest.raises(ConfigError, match=rf"VLLM_METAL_DIST_BACKEND='{missing[0]}': this MLX build .* has no "
                                          rf"{missing[0]} backend \(available here: .*ring"):
        distributed.check_available(missing[0])
    with pytest.raises(ConfigError, match="VLLM_METAL_DIST_BACKEND='tcp' is invalid; accepted: auto, ring"):
        distributed.check_available("tcp")
    with pytest.raises(distributed.DistributedError, match="vLLM's group tp:7, but this process has no MLX group"):
        distributed.group("tp:7")


def test_each_kernel_table_names_its_backend_and_whether_ranks_share_memory():
    """`VLLM_METAL_DIST_BACKEND=auto` is the device's: MLX's TCP ring on the CPU and Metal (the ranks of a host share
    its memory), NCCL on CUDA (one GPU per rank); a backend named explicitly is kept."""
    tables = (Cpu(), Metal(), Cuda())
    assert [distributed.resolve_backend("auto", t) for t in tables] == ["ring", "ring", "nccl"]
    assert [distributed.resolve_backend("mpi", t) for t in tables] == ["mpi"] * 3
    assert [t.ranks_share_memory for t in tables] == [True, True, False]


_RING_RANK = textwrap.dedent("""
    import json, sys
    import runtime  # noqa: F401
    import mlx.core as mx
    import numpy as np
    import torch
    import vllm.distributed.parallel_state  # noqa: F401  (registers torch.ops.vllm.all_reduce / all_gather)
    from lowering.api import lower
    from lowering.compile import load_step
    from lowering.testing import capture, dynamic_dims
    from runtime import distributed
    from runtime.kernels import Generic

    rank, addresses = int(sys.argv[1]), json.loads(sys.argv[2])
    distributed.init_group("tp:0", rank, 2, "ring", addresses)
    k = Generic()
    out = {}
    # the kernels: every rank's array differs, the sum and the concatenations are checked against numpy
    base = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
    mine = mx.array(base[rank])
    out["all_reduce"] = float(np.abs(np.array(mx.compile(lambda x: k.all_reduce(x, group="tp:0"))(mine))
                                     - base.astype(np.float64).sum(0)).max())
    for dim in (0, 1, -1):
        got = np.array(k.all_gather(mine, dim=dim, group="tp:0", world_size=2))
        out[f"all_gather_{dim}"] = bool(np.array_equal(got, np.concatenate([base[0], base[1]], axis=dim)))

    # a tensor-parallel MLP and vocabulary-parallel head, vLLM style, lowered and run
    rng = np.random.default_rng(1)
    w1, w2, w3 = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((32, 16), (16, 32), (24, 16)))
    shard = lambda w, axis: torch.from_numpy(np.split(w, 2, axis=axis)[rank].copy())  # noqa: E731

    def tp_mlp(x, w1, w2, w3):
        linear = torch.nn.functional.linear
        y = linear(torch.relu(linear(x, w1)), w2)                     # column- then row-parallel linears
        y = torch.ops.vllm.all_reduce(y, group_name="tp:0")
        return torch.ops.vllm.all_gather(linear(y, w3), -1, 2, group_name="tp:0")  # each rank's slice of the vocab

    weights = (shard(w1, 0), shard(w2, 1), shard(w3, 0))
    example = (torch.zeros(5, 16),) + weights
    program = capture(tp_mlp, example, dynamic_dims(example, (torch.zeros(9, 16),) + weights))
    lowered = lower(program)
    step = load_step(lowered.source)
    out["source_all_reduce"] = lowered.source.count("k.all_reduce(")
    out["source_all_gather"] = lowered.source.count("k.all_gather(")
    errors = []
    for t in (1, 7):
        x = rng.standard_normal((t, 16)).astype(np.float32)
        got, _ = step({}, [], {}, mx.array(x), *(mx.array(w.numpy()) for w in weights))
        full = np.maximum(x.astype(np.float64) @ w1.T, 0) @ w2.T @ w3.T
        errors.append(float(np.abs(np.array(got) - full).max() / np.abs(full).max()))
    out["mlp_rel_error"] = max(errors)
    print("@@RESULT", json.dumps(out), flush=True)
""")


def test_collectives_over_a_ring_of_two_processes(tmp_path):
    """Two processes on loopback with MLX's ring backend: `k.all_reduce` (compiled) and `k.all_gather` along three
    axes against NumPy, and a graph with vLLM's collective ops captured, lowered by the default pipeline and run on
    both ranks against the unsharded computation in float64."""
    addresses = json.dumps([f"127.0.0.1:{vh.free_port()}", f"127.0.0.1:{vh.free_port()}"])
    env = vh.clean_env()
    procs = [subprocess.Popen([vh.PYTHON, "-c", _RING_RANK, str(rank), addresses], cwd=str(vh.REPO), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
             for rank in (0, 1)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            vh.kill_group(proc.pid)
    for rank, (proc, text) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank}:\n{text[-4000:]}"
        result = json.loads(next(line for line in text.splitlines() if line.startswith("@@RESULT"))[9:])
        assert result["all_reduce"] < 1e-5, result
        assert all(result[f"all_gather_{d}"] for d in (0, 1, -1)), result
        assert (result["source_all_reduce"], result["source_all_gather"]) == (1, 1), result
        assert result["mlp_rel_error"] < 1e-5, result
        print(f"\nrank {rank}: {result}")


def test_in_place_ops_on_fresh_tensors_become_values():
    """vLLM's vocab-parallel embedding zeroes the rows of other ranks' tokens in place (`masked_fill_`), then reads
    the tensor: the out-of-place op, read by the later users, lowers to MLX."""

    def masked(x, mask):
        y = x * 2
        y.masked_fill_(mask[:, None], 0)
        return y + 1

    def make(dtype, size):
        return torch.randn(size, 16, dtype=dtype), torch.arange(size) % 3 == 0

    check_pass(FUNCTIONALIZE, masked, make, expect_matched=1, ops_before={"masked_fill_.Scalar"},
               ops_absent_after={"masked_fill_"}, ops_after={"masked_fill.Scalar"},
               dtypes=(torch.float32, torch.bfloat16), sizes=(1, 7, 33))


_REFUSALS = textwrap.dedent("""
    import json, os, sys
    import runtime  # noqa: F401
    from vllm import LLM
    for env, kwargs in json.loads(os.environ["CASES"]):
        os.environ.update(env)
        try:
            LLM(model=os.environ["MODEL"], dtype="float32", max_model_len=512, skip_tokenizer_init=True, **kwargs)
            print("@@STARTED", flush=True)
        except Exception as e:
            print("@@REFUSED |", str(e).replace(chr(10), " // "), flush=True)
        for name in env:
            del os.environ[name]
    os._exit(0)
""")


def test_parallel_settings_refused_before_any_process_starts(models, tmp_path):
    absent = next((b for b in ("nccl", "mpi", "jaccl") if not mx.distributed.is_available(b)), None)
    cases = [({}, {"tensor_parallel_size": 3}), ({}, {"pipeline_parallel_size": 2}),
             ({"VLLM_METAL_DIST_BACKEND": "tcp"}, {"tensor_parallel_size": 2})]
    expected = ["Total number of attention heads (8) must be divisible by tensor parallel size (3)",
                "vllm-metal: pipeline_parallel_size must be 1 (got 2)",
                "VLLM_METAL_DIST_BACKEND='tcp' is invalid; accepted: auto, ring, nccl, mpi, jaccl"]
    if absent is not None:
        cases.append(({"VLLM_METAL_DIST_BACKEND": absent}, {"tensor_parallel_size": 2}))
        expected.append(f"VLLM_METAL_DIST_BACKEND='{absent}': this MLX build ({mx.__version__}) has no {absent} "
                        "backend (available here: ring")
    env = vh.clean_env(CASES=json.dumps(cases), MODEL=str(models[4]))
    rc, out, secs = run_python(_REFUSALS, env, 300, tmp_path / "refusals.log")
    lines = [line for line in out.splitlines() if line.startswith("@@")]
    assert rc == 0 and len(lines) == len(cases), out[-4000:]
    for want, line in zip(expected, lines):
        assert line.startswith("@@REFUSED") and want in line, f"{want!r} not in {line!r}"
    print(f"\n{len(cases)} settings refused in {secs:.1f} s:\n" + "\n".join("  " + x[12:200] for x in lines))


# -- engines ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_models")
    return {kv: tph.tiny_llama(root / f"kv{kv}", kv) for kv in (4, 2, 1)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel")


def _run_engines(tp: int, models: dict, workdir: Path, timeout: float) -> subprocess.Popen:
    runs = {f"kv{kv}": {"model": str(path), "prompts": tph.prompts(), "tokens": tph.GREEDY_TOKENS}
            for kv, path in models.items()}
    if tp == 1:  # the data-parallel reference: the same engine, one process
        runs["dp"] = {"model": str(models[4]), "prompts": tph.dp_prompts(), "tokens": tph.DP_TOKENS}
    spec = workdir / f"tp{tp}.spec.json"
    spec.write_text(json.dumps({"tp": tp, "runs": runs}))
    env = vh.clean_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_METAL_CACHE=str(workdir / "metal-cache"))
    log = open(workdir / f"tp{tp}.log", "wb")
    proc = subprocess.Popen([vh.PYTHON, str(Path(tph.__file__).resolve()), str(spec), str(workdir / f"tp{tp}.json")],
                            cwd=str(vh.REPO), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.deadline, proc.log_file, proc.tp = time.monotonic() + timeout, log, tp
    return proc


def _engine_result(proc: subprocess.Popen, workdir: Path) -> dict:
    try:
        proc.wait(timeout=max(proc.deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        vh.kill_group(proc.pid)
        proc.wait()
        proc.log_file.close()
    log = (workdir / f"tp{proc.tp}.log").read_text(errors="replace")
    path = workdir / f"tp{proc.tp}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result["log"] = log
    return result


@pytest.fixture(scope="module")
def reference(models, workdir):
    """tensor_parallel_size 1: one engine per checkpoint after the other, and the data-parallel prompts."""
    return _engine_result(_run_engines(1, models, workdir, timeout=1200), workdir)


@pytest.fixture(scope="module")
def tp2(models, workdir):
    return _engine_result(_run_engines(2, models, workdir, timeout=1800), workdir)


def _entry(result: dict, name: str) -> dict:
    entry = result.get(name)
    assert entry is not None and "error" not in entry, (f"{name}: {entry and entry.get('error')}\nlog tail:\n"
                                                        + result["log"][-5000:])
    return entry


def _assert_same_greedy(got: list[list[int]], ref: dict, what: str) -> None:
    """Token ids identical; a difference is accepted only where the reference's top two were a near-tie."""
    for i, (a, b) in enumerate(zip(got, ref["tokens"])):
        first = vh.first_difference(a, b)
        if first is not None:
            gap = ref["gaps"][i][first] if first < len(ref["gaps"][i]) else None
            assert gap is not None and gap < NEAR_TIE, (
                f"{what}: prompt {i} differs at token {first} (top-2 gap there {gap}): {a} vs {b}")
    assert len(got) == len(ref["tokens"]), (len(got), len(ref["tokens"]))


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads, per_rank", [(4, 2), (2, 1), (1, 1)])
def test_tp2_greedy_equals_tp1_through_vllm_llm(reference, tp2, kv_heads, per_rank):
    """8 prompts (1 to 300 tokens) x 24 greedy tokens, f32: identical at tensor_parallel_size 2 and 1; the chosen
    tokens' logprobs within 1e-4. Every rank of the TP=2 engine is in a ring group of 2, keeps `per_rank` KV heads
    (4 -> 2, 2 -> 1, 1 -> 1 replicated) and runs a step with 9 all-reduces (the embedding and two per layer) and
    one all-gather (the logits)."""
    one, two = _entry(reference, f"kv{kv_heads}"), _entry(tp2, f"kv{kv_heads}")
    _assert_same_greedy(two["tokens"], one, f"TP=2 vs TP=1, {kv_heads} KV heads")
    diffs = [abs(a - b) for x, y in zip(two["logprobs"], one["logprobs"]) for a, b in zip(x, y)]
    assert max(diffs) <= LOGPROB_TOLERANCE, max(diffs)
    ranks = sorted(two["ranks"], key=lambda r: r["tp_rank"])
    assert [(r["tp_rank"], r["tp_size"], r["mlx_group"]) for r in ranks] == [(0, 2, [0, 2]), (1, 2, [1, 2])], ranks
    assert all(r["kv_heads"] == per_rank and r["cache_shape"][1] == per_rank for r in ranks), ranks
    assert all((r["all_reduce"], r["all_gather"]) == (9, 1) for r in ranks), ranks
    assert one["ranks"][0]["kv_heads"] == kv_heads and one["ranks"][0]["mlx_group"] is None, one["ranks"]
    assert (one["ranks"][0]["all_reduce"], one["ranks"][0]["all_gather"]) == (0, 0), one["ranks"]
    print(f"\n{kv_heads} KV heads: {sum(map(len, two['tokens']))} tokens identical, max logprob diff "
          f"{max(diffs):.2e}; TP=2 start {two['start_s']} s, generate {two['generate_s']} s; TP=1 start "
          f"{one['start_s']} s, generate {one['generate_s']} s")


def _complete(server: vh.Server, prompt: list[int], tokens: int) -> list[int]:
    body = {"model": server.served_name, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    request = urllib.request.Request(server.base_url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]


def _completions(server: vh.Server, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    with ThreadPoolExecutor(len(prompts)) as pool:  # all at once: the engine batches them
        return list(pool.map(lambda p: _complete(server, p, tokens), prompts))


_SERVER_ARGS = ["--skip-tokenizer-init", "--max-num-seqs", "16", "--max-num-batched-tokens", "256"]


def _health(server: vh.Server) -> int | str:
    try:
        with urllib.request.urlopen(server.base_url + "/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return type(e).__name__


@pytest.mark.slow
def test_openai_server_tp2_then_a_rank_killed_mid_generation(reference, models, workdir):
    """The OpenAI server at tensor_parallel_size 2: the 8 prompts' greedy tokens equal vllm.LLM's at size 1. Then a
    streamed request is running when rank 1 is killed (SIGKILL): the stream ends with an error, /health stops
    answering 200 and the server exits, each within a bounded time, and the log names the MLX group that lost it."""
    ref = _entry(reference, "kv4")
    env = vh.clean_env(VLLM_METAL_CACHE=str(workdir / "metal-cache"))
    server = vh.Server(str(models[4]), workdir / "server_tp2", served_name="tiny", env=env,
                       extra=["--tensor-parallel-size", "2", *_SERVER_ARGS])
    try:
        start_s = server.wait_healthy(timeout=900)
        t = time.monotonic()
        got = _completions(server, tph.prompts(), tph.GREEDY_TOKENS)
        greedy_s = time.monotonic() - t
        _assert_same_greedy(got, ref, "server TP=2 vs LLM TP=1")

        found = re.search(r"\(Worker(?:_TP\d)? pid=(\d+)\)[^\n]*MLX ring group tp:0: rank 1 of 2", server.log())
        assert found, server.log()[-4000:]
        victim = int(found.group(1))
        body = {"model": "tiny", "prompt": tph.prompts()[3], "max_tokens": 500, "temperature": 0,
                "ignore_eos": True, "stream": True}
        request = urllib.request.Request(server.base_url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        chunks, ended, killed = [], threading.Event(), {}

        def read():
            try:
                with urllib.request.urlopen(request, timeout=300) as stream:
                    for line in stream:
                        if line.strip():
                            chunks.append(line.decode().strip())
                        if len(chunks) == 5 and not killed:
                            killed["at"] = time.monotonic()
                            os.kill(victim, signal.SIGKILL)
            except OSError as e:
                chunks.append(f"stream error: {e}")
            finally:
                ended.set()

        threading.Thread(target=read, daemon=True).start()
        assert ended.wait(timeout=240), f"stream still open; {len(chunks)} chunks"
        assert killed, f"the stream ended before the kill: {chunks[-3:]}"
        stream_s = time.monotonic() - killed["at"]
        assert any("error" in c for c in chunks[5:]), chunks[-3:]
        assert stream_s < 60, stream_s
        deadline = time.monotonic() + 120
        while server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        exit_s = time.monotonic() - killed["at"]
        assert server.proc.poll() is not None, f"server still running {exit_s:.0f} s after the kill (health " \
                                               f"{_health(server)})"
        log = server.log()
        assert "a peer of this rank's MLX group stopped answering (tp:0: rank 0 of 2" in log \
            or "died unexpectedly" in log, log[-5000:]
        named = next((x for x in log.splitlines() if "stopped answering" in x or "died unexpectedly" in x), "")
        print(f"\nserver TP=2: healthy after {start_s:.0f} s, 8 greedy requests {greedy_s:.1f} s, identical to TP=1;"
              f"\nrank 1 (pid {victim}) killed after 5 chunks: stream ended with an error {stream_s:.1f} s later, "
              f"server exited after {exit_s:.1f} s:\n  {named.strip()[:300]}\n  last chunk: {chunks[-2][:200]}")
    finally:
        server.stop()


@pytest.mark.slow
def test_openai_server_dp2_32_requests_equal_dp1(reference, models, workdir):
    """The OpenAI server at data_parallel_size 2 (two engines with the plugin, each with its own lowered model and KV
    cache, behind vLLM's own front end): 32 concurrent requests, greedy tokens identical to one engine's, both
    engines having served some of them (vLLM's per-engine request counters)."""
    ref = _entry(reference, "dp")
    env = vh.clean_env(VLLM_METAL_CACHE=str(workdir / "metal-cache"))
    server = vh.Server(str(models[4]), workdir / "server_dp2", served_name="tiny", env=env,
                       extra=["--data-parallel-size", "2", *_SERVER_ARGS])
    try:
        start_s = server.wait_healthy(timeout=900)
        t = time.monotonic()
        got = _completions(server, tph.dp_prompts(), tph.DP_TOKENS)
        took = time.monotonic() - t
        _assert_same_greedy(got, ref, "DP=2 vs DP=1")
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
        served = {}
        for engine, count in re.findall(r'vllm:request_success_total\{engine="(\d+)",finished_reason="length"'
                                        r'[^}]*\} ([\d.]+)', metrics):
            served[engine] = served.get(engine, 0) + float(count)
        assert sorted(served) == ["0", "1"] and sum(served.values()) == tph.DP_REQUESTS, served
        assert all(n > 0 for n in served.values()), served
        print(f"\nserver DP=2: healthy after {start_s:.0f} s; {tph.DP_REQUESTS} requests in {took:.1f} s, identical "
              f"to DP=1; requests per engine {served}")
    finally:
        server.stop()
