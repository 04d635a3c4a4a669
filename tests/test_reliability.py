"""Issue 8, the fast half: bad input, client disconnects, bad configuration, concurrent lowering.

One real OpenAI-compatible server (SmolLM2, 127.0.0.1, a random free port) is shared by the request
tests; start-up failures run in their own subprocesses. Every loop and wait is bounded.
The load, cache-pressure and NaN-guard scenarios are in test_reliability_slow.py (-m slow).
"""

from __future__ import annotations

import json
import textwrap
import time

import httpx
import pytest

import reliability_helpers as rh
import vllm_helpers as vh

MODEL = "smollm2"  # vh.Server's served name
GOOD_CHAT = "What is the capital of France?"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def server(smollm2_path, workdir):
    srv = vh.Server(str(smollm2_path), workdir / "server")
    try:
        srv.wait_healthy(timeout=480)
        print(f"\nserver healthy after {srv.start_s:.1f} s")
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=rh.HTTP_TIMEOUT) as c:
        yield c


def _good(client, server) -> str:
    path, body = rh.completion_body(MODEL, GOOD_CHAT, 16, chat=True, stream=False)
    r = rh.send(client, server.base_url, path, body)
    assert r["status"] == 200, r
    return r["text"]


@pytest.fixture(scope="module")
def baseline(client, server):
    text = _good(client, server)
    assert "Paris" in text, text
    return text


# --------------------------------------------------------------------------------------------------
# Bad requests
# --------------------------------------------------------------------------------------------------
def _json(body) -> bytes:
    return json.dumps(body).encode()


C, CH = "/v1/completions", "/v1/chat/completions"
# name, path, raw body, expected status, substrings the error message must contain (lower-cased)
BAD_REQUESTS = [
    ("prompt longer than max_model_len", C, _json({"model": MODEL, "prompt": "hello " * 3000, "max_tokens": 5}),
     400, ["maximum context length is 1024"]),
    ("max_tokens = 0", C, _json({"model": MODEL, "prompt": "hi", "max_tokens": 0}), 400, ["max_tokens", "at least 1"]),
    ("max_tokens < 0", C, _json({"model": MODEL, "prompt": "hi", "max_tokens": -1}), 400, ["max_tokens", "at least 1"]),
    ("max_tokens absurd (1e9)", C, _json({"model": MODEL, "prompt": "hi", "max_tokens": 10**9}), 400,
     ["max_tokens=1000000000", "max_model_len"]),
    ("temperature < 0", C, _json({"model": MODEL, "prompt": "hi", "max_tokens": 5, "temperature": -1}), 400,
     ["temperature", "non-negative"]),
    ("top_p = 0", C, _json({"model": MODEL, "prompt": "hi", "max_tokens": 5, "top_p": 0}), 400, ["top_p", "(0, 1]"]),
    ("top_p = 1.5", C, _json({"model": MODEL, "prompt": "hi", "max_tokens": 5, "top_p": 1.5}), 400,
     ["top_p", "(0, 1]"]),
    ("unknown model name", C, _json({"model": "no-such-model", "prompt": "hi", "max_tokens": 5}), 404,
     ["no-such-model", "does not exist"]),
    ("malformed JSON", C, b'{"model": "smollm2", "prompt": ', 400, ["json"]),
    ("wrong type: max_tokens string", C, _json({"model": MODEL, "prompt": "hi", "max_tokens": "five"}), 400,
     ["max_tokens", "valid integer"]),
    ("wrong type: prompt object", C, _json({"model": MODEL, "prompt": {"a": 1}, "max_tokens": 5}), 400, ["prompt"]),
    ("wrong type: messages string", CH, _json({"model": MODEL, "messages": "hello", "max_tokens": 5}), 400,
     ["messages", "valid list"]),
    ("empty prompt", C, _json({"model": MODEL, "prompt": "", "max_tokens": 5}), 400, ["prompt", "non-empty"]),
    ("invalid UTF-8 bytes", C, b'{"model": "smollm2", "prompt": "\xff\xfe\xc3\x28", "max_tokens": 5}', 400,
     ["error parsing the body"]),
    ("10 MB body", C, _json({"model": MODEL, "prompt": "a" * (10 * 1024 * 1024), "max_tokens": 5}), 400,
     ["maximum context length", "10485760 characters"]),
    ("logprobs above the limit (completions)", C, _json({"model": MODEL, "prompt": "hi", "max_tokens": 5,
                                                         "logprobs": 100}), 400, ["logprobs", "max allowed: 20"]),
    ("top_logprobs above the limit (chat)", CH, _json({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 5, "logprobs": True, "top_logprobs": 100}),
     400, ["logprobs", "max allowed: 20"]),
]


def _message(r: httpx.Response) -> str:
    try:
        data = r.json()
    except ValueError:
        return r.text
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data["error"].get("message", "")
    return data.get("detail", r.text) if isinstance(data, dict) else r.text


def test_bad_requests_answered_4xx_server_stays_up(server, client, baseline):
    answered, start = [], time.monotonic()
    for name, path, raw, status, needles in BAD_REQUESTS:
        r = client.post(server.base_url + path, content=raw, headers={"content-type": "application/json"})
        msg = _message(r)
        assert r.status_code == status, f"{name}: HTTP {r.status_code} (want {status}): {msg[:500]}"
        for needle in needles:
            assert needle.lower() in msg.lower(), f"{name}: message does not name the problem ({needle!r}): {msg[:500]}"
        health = client.get(server.base_url + "/health")
        assert health.status_code == 200, f"server unhealthy after {name}"
        answered.append((name, r.status_code, msg.splitlines()[0][:110]))
    assert server.proc.poll() is None
    after = _good(client, server)
    assert after == baseline, f"good request after the bad ones: {after!r} vs before {baseline!r}"
    print(f"\n{len(answered)}/{len(BAD_REQUESTS)} bad requests answered 4xx with a message naming the problem "
          f"({time.monotonic() - start:.1f} s); server up, next greedy answer identical:")
    for name, code, msg in answered:
        print(f"  {code} {name}: {msg}")


# --------------------------------------------------------------------------------------------------
# Client disconnect mid-stream
# --------------------------------------------------------------------------------------------------
DISCONNECTS = 20


def test_client_disconnect_mid_stream(server, client, baseline):
    before = rh.wait_idle(server.base_url)  # the earlier tests' last request counted (it once was not yet)
    start = time.monotonic()
    for i in range(DISCONNECTS):
        chat = i % 2 == 0
        prompt = f"Write a long story about a dragon number {i}." if chat else f"Count from {i} to one thousand:"
        path, body = rh.completion_body(MODEL, prompt, 200, chat=chat, stream=True)
        body["ignore_eos"] = True
        chunks = 0
        with httpx.Client(timeout=rh.HTTP_TIMEOUT) as c, c.stream("POST", server.base_url + path, json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks += 1
                if chunks >= 3:
                    break  # leaving both `with` blocks closes the connection mid-stream
        assert chunks == 3
    idle = rh.wait_idle(server.base_url, timeout=60)  # nothing running or waiting, KV usage 0
    elapsed = time.monotonic() - start
    # vLLM 0.32 does not count aborted requests in vllm:request_success_total; what shows they were
    # aborted (not run to the end): none finished, and far fewer than 20 x 200 tokens were generated.
    completed = sum(rh.finished(idle, r) - rh.finished(before, r) for r in ("stop", "length"))
    generated = idle.get("vllm:generation_tokens_total", 0) - before.get("vllm:generation_tokens_total", 0)
    assert completed == 0, f"{completed:.0f} of the disconnected requests ran to completion"
    assert generated < DISCONNECTS * 200 / 2, f"{generated:.0f} tokens generated for {DISCONNECTS} cut streams"
    aborted = DISCONNECTS - completed
    assert idle["vllm:kv_cache_usage_perc"] == 0, "KV blocks not freed after the disconnects"
    assert server.proc.poll() is None
    # The next requests are correct: the greedy baseline, and a streamed completion equal to its
    # non-streamed twin.
    assert _good(client, server) == baseline
    path, body = rh.completion_body(MODEL, "The quick brown fox", 24, chat=False, stream=False)
    plain = rh.send(client, server.base_url, path, body)
    streamed = rh.send(client, server.base_url, path, {**body, "stream": True})
    assert plain["status"] == streamed["status"] == 200 and plain["text"] == streamed["text"], (plain, streamed)
    print(f"\n{DISCONNECTS} streams closed after 3 chunks: {aborted:.0f} aborted ({generated:.0f} tokens generated "
          f"in all, 0 completed), KV usage back to 0, "
          f"next requests correct ({elapsed:.1f} s)")


# --------------------------------------------------------------------------------------------------
# Bad configuration at start-up
# --------------------------------------------------------------------------------------------------
BAD_ENV = [  # variable, wrong value, the accepted values the message must name
    ("VLLM_METAL_MEMORY_FRACTION", "1.5", '"auto" or a number f with 0 < f <= 1'),
    ("VLLM_METAL_MEMORY_FRACTION", "lots", '"auto" or a number f with 0 < f <= 1'),
    ("VLLM_METAL_USE_MLX", "maybe", "1 or 0"),
    ("VLLM_MLX_DEVICE", "tpu", "gpu or cpu"),
    ("VLLM_METAL_BLOCK_SIZE", "12", "8, 16, 32, 64, 128, 256"),
    ("VLLM_METAL_DEBUG", "verbose", "1 or 0"),
]

_CONFIG_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import runtime  # noqa: F401
    from vllm import LLM
    cases, model = json.loads(sys.argv[1] if len(sys.argv) > 1 else os.environ["CASES"]), os.environ["MODEL"]
    for var, value, _ in cases:
        os.environ[var] = value
        try:
            LLM(model=model, dtype="float32", max_model_len=512, skip_tokenizer_init=True, max_num_seqs=4)
            print("@@STARTED", var, flush=True)
        except Exception as e:
            print("@@REFUSED", var, "|", str(e).replace(chr(10), " // "), flush=True)
        del os.environ[var]
""")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return rh.tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_bad_env_vars_refused_at_startup(tiny_dir, workdir):
    """Each wrong VLLM_METAL_* / VLLM_MLX_DEVICE value makes LLM(...) refuse in the platform check
    (one subprocess, one LLM(...) per case: the check runs before any engine process starts)."""
    env = vh.clean_env(CASES=json.dumps(BAD_ENV), MODEL=str(tiny_dir))
    rc, out, secs = rh.run_python(_CONFIG_SCRIPT, env, 180, workdir / "bad_env.log")
    assert rc == 0, out[-4000:]
    refused = [line for line in out.splitlines() if line.startswith("@@REFUSED")]
    assert not [line for line in out.splitlines() if line.startswith("@@STARTED")], out[-3000:]
    assert len(refused) == len(BAD_ENV), out[-3000:]
    for (var, value, accepted), line in zip(BAD_ENV, refused):
        assert f"{var}={value!r} is invalid; accepted: {accepted}" in line, line
    # VLLM_METAL_BLAS is read at `import runtime` (before vLLM): a missing library path is refused there.
    rc2, out2, _ = rh.run_python("import runtime", vh.clean_env(VLLM_METAL_BLAS="/no/such/libblas.so"), 60,
                                 workdir / "bad_blas.log")
    assert rc2 != 0 and "VLLM_METAL_BLAS" in out2 and "/no/such/libblas.so" in out2, out2[-3000:]
    blas_line = next(line for line in out2.splitlines() if "VLLM_METAL_BLAS" in line)
    print(f"\n{len(refused) + 1} bad settings refused at start-up ({secs:.1f} s):")
    for line in refused:
        print("  " + line.split("|", 1)[1].strip()[:160])
    print("  " + blas_line.strip()[:160])


_ENGINE_FAILS = textwrap.dedent("""
    import os, sys
    import runtime  # noqa: F401
    from vllm import LLM
    try:
        LLM(model=os.environ["MODEL"], dtype="float32", max_model_len=512, skip_tokenizer_init=True, max_num_seqs=4)
        print("@@STARTED", flush=True)
    except Exception as e:
        print("@@REFUSED", type(e).__name__, e, flush=True)
        sys.stderr.flush()
        os._exit(1)  # vLLM's exit handlers can wait on the dead engine's helpers: do not
    os._exit(0)
""")


def test_memory_fraction_too_small_says_how_much_is_needed(tiny_dir, workdir):
    env = vh.clean_env(MODEL=str(tiny_dir), VLLM_METAL_MEMORY_FRACTION="0.001")
    rc, out, secs = rh.run_python(_ENGINE_FAILS, env, 240, workdir / "fraction.log")
    assert rc != 0 and "@@STARTED" not in out, out[-4000:]
    line = next((x for x in out.splitlines() if "VLLM_METAL_MEMORY_FRACTION=0.001" in x), None)
    assert line is not None, out[-4000:]
    assert "the model needs" in line and " bytes (" in line and "use at least" in line, line
    print(f"\nrefused in {secs:.1f} s: {line.split('MemoryPlanError: ')[-1][:300]}")


def test_truncated_weights_refused_clearly(tiny_dir, workdir, tmp_path):
    import shutil

    broken = tmp_path / "truncated"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    env = vh.clean_env(MODEL=str(broken))
    rc, out, secs = rh.run_python(_ENGINE_FAILS, env, 240, workdir / "truncated.log")
    assert rc != 0 and "@@STARTED" not in out, out[-4000:]
    lines = [x for x in out.splitlines() if "model.safetensors" in x and ("truncated" in x.lower() or
                                                                          "incomplete" in x.lower())]
    assert lines, "no line names the truncated weights file:\n" + out[-4000:]
    print(f"\nrefused in {secs:.1f} s: {lines[0].strip()[:300]}")


def test_unsupported_architecture_refused_before_serving(workdir, tmp_path):
    """A tiny Mamba (state-space layers, no MLX lowering): the server exits during start-up naming everything
    docs/models.md lists as missing for it, before any weight loads, and never answers /health."""
    from vllm_metal_plugin import sweep

    arch = "MambaForCausalLM"
    config, _ = sweep.tiny_config(arch, sweep.registry()[arch][0])
    config.save_pretrained(tmp_path / "mamba")  # no weight files: a check after loading would fail on those
    srv = vh.Server(str(tmp_path / "mamba"), workdir / "unsupported",
                    extra=["--skip-tokenizer-init", "--max-model-len", "512"])
    start = time.monotonic()
    try:
        with pytest.raises(AssertionError, match="during start-up"):
            srv.wait_healthy(timeout=480)  # raises when the process exits before /health answers
    finally:
        srv.stop()
    log = srv.log()
    missing = sweep.missing_items(sweep.load_baseline()[arch])
    expected = f"vllm-metal: {arch} cannot run on this platform, it needs what the MLX lowering lacks: {'; '.join(missing)}"
    assert missing and expected in log, log[-5000:]
    assert "Loading weights took" not in log and "Application startup complete" not in log, log[-5000:]
    print(f"\nserver refused the model in {time.monotonic() - start:.1f} s: {expected[:300]}")


# --------------------------------------------------------------------------------------------------
# Lowering cache: two processes lowering the same model at once
# --------------------------------------------------------------------------------------------------
_LOWER_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import runtime  # noqa: F401
    import numpy as np
    from lowering import capture
    from lowering.api import lower_cached
    from lowering.compile import load_step
    from lowering.vllm_build import build_vllm_model
    from lowering.driver import Driver
    from runtime.model import CacheLayout, LoweredModel
    import mlx.core as mx

    model_dir, go, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model, config = build_vllm_model(model_dir, max_model_len=512)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    open(out + ".ready", "w").close()
    for _ in range(1200):  # both processes capture at the same moment (bounded wait, <= 120 s)
        if os.path.exists(go):
            break
        time.sleep(0.1)
    t = time.perf_counter()
    source, weights, layers, info = lower_cached({"test": "concurrent lowering", "model": model_dir},
                                                 lambda: capture.capture_vllm(model, config), state)
    layout = CacheLayout(len(layers), layers[0].num_kv_heads, layers[0].head_dim, 16, mx.float32)
    tokens = Driver(LoweredModel(load_step(source), weights, layout, 32)).generate({0: [1, 5, 9, 17, 33]}, 8)[0]
    json.dump({"cache": info["cache"], "key": info["key"], "tokens": tokens, "lower_s": time.perf_counter() - t,
               "source_len": len(source)}, open(out, "w"))
""")


def test_concurrent_lowering_does_not_corrupt_cache(tiny_dir, workdir, tmp_path):
    import os
    import subprocess

    cache = tmp_path / "metal_cache"
    go = tmp_path / "go"
    env = vh.clean_env(VLLM_METAL_CACHE=str(cache))
    outs = [tmp_path / f"lower{i}.json" for i in range(2)]
    logs = [open(workdir / f"lower{i}.log", "wb") for i in range(2)]
    procs = [subprocess.Popen([vh.PYTHON, "-c", _LOWER_SCRIPT, str(tiny_dir), str(go), str(o)], cwd=str(vh.REPO),
                              env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
             for o, f in zip(outs, logs)]
    start = time.monotonic()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(os.path.exists(str(o) + ".ready") for o in outs):
            assert all(p.poll() is None for p in procs), "a lowering process died early"
            time.sleep(0.2)
        go.touch()
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    texts = [(workdir / f"lower{i}.log").read_text(errors="replace") for i in range(2)]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(t[-3000:] for t in texts)
    results = [json.loads(o.read_text()) for o in outs]
    assert results[0]["key"] == results[1]["key"]
    assert results[0]["tokens"] == results[1]["tokens"] and len(results[0]["tokens"]) == 8
    assert results[0]["source_len"] == results[1]["source_len"]

    # The artefact left behind verifies (hashes) and loads; no half-written temp dirs remain.
    env_cache = os.environ.get("VLLM_METAL_CACHE")
    os.environ["VLLM_METAL_CACHE"] = str(cache)
    try:
        from lowering.compile import cache_dir, load_artefact

        entries = sorted(p.name for p in cache_dir().iterdir())
        hit = load_artefact(results[0]["key"])
    finally:
        if env_cache is None:
            os.environ.pop("VLLM_METAL_CACHE")
        else:
            os.environ["VLLM_METAL_CACHE"] = env_cache
    assert entries == [results[0]["key"]], f"cache dir holds {entries}"
    assert hit is not None, "the artefact left by two concurrent writers does not verify"
    print(f"\ntwo concurrent lowerings ({[r['cache'] for r in results]}, {time.monotonic() - start:.1f} s): same "
          f"tokens {results[0]['tokens']}, one verified artefact, no temp dirs")
