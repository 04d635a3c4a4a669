"""Issue 8, the slow half (`pytest -m slow`): load, KV-cache pressure, the NaN/Inf guard.

  load      128 concurrent greedy requests (streaming and not, completions and chat, prompts of
            1..1000 tokens, max_tokens 1..128) on one server: zero errors, and a deterministic subset
            of 24 sent again one at a time gives identical text.
  pressure  a second server whose KV cache holds ~4 long sequences (--num-gpu-blocks-override) takes
            32 long requests at once: all finish, vLLM preempts, outputs equal the unpressured server's,
            and /metrics shows the cache empty again when idle.
  nan       VLLM_METAL_DEBUG=1 on a tiny Llama with a NaN weight in layer 1: the runner reports the
            non-finite logits and names layer 1 and the value that first went non-finite.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import textwrap
import time

import httpx
import pytest

import reliability_helpers as rh
import vllm_helpers as vh

pytestmark = pytest.mark.slow
MODEL = "smollm2"
N_LOAD, N_ALONE = 128, 24
N_PRESSURE, PRESSURE_PROMPT, PRESSURE_TOKENS = 32, 400, 96
BLOCK = 16
PRESSURE_BLOCKS = 4 * -(-(PRESSURE_PROMPT + PRESSURE_TOKENS) // BLOCK) + 4  # ~4 sequences of 496 tokens


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability_slow")


@pytest.fixture(scope="module")
def corpus(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    text = (vh._FILLER + " ".join(vh.GREEDY_RAW + vh.GREEDY_CHAT) + " ") * 12
    ids = tok(text).input_ids
    assert len(ids) > 2200
    return tok, ids


@pytest.fixture(scope="module")
def server(smollm2_path, workdir):
    srv = vh.Server(str(smollm2_path), workdir / "server", extra=["--max-model-len", "2048", "--max-num-seqs", "128"])
    try:
        srv.wait_healthy(timeout=480)
        yield srv
    finally:
        srv.stop()


def _load_requests(corpus) -> list[tuple[str, dict]]:
    tok, ids = corpus
    reqs = []
    for i in range(N_LOAD):
        n = 1 + (i * 389) % 1000  # 1..1000 tokens, spread
        if i == 0:
            n = 1
        elif i == 1:
            n = 1000
        max_tokens = 1 + (i * 53) % 128
        chat, stream = i % 2 == 1, (i // 2) % 2 == 1
        start = (i * 97) % 1000
        prompt_ids = ids[start:start + n]
        if chat:  # the chat template adds ~20 tokens around the text
            prompt = tok.decode(prompt_ids) + f"\nSummarise the text above (request {i})."
        else:
            prompt = prompt_ids
        reqs.append(rh.completion_body(MODEL, prompt, max_tokens, chat=chat, stream=stream))
    return reqs


def _fire(base_url: str, reqs: list[tuple[str, dict]], workers: int) -> tuple[list[dict], float]:
    start = time.monotonic()
    with httpx.Client(timeout=rh.HTTP_TIMEOUT, limits=httpx.Limits(max_connections=workers)) as client, \
            cf.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(rh.send, client, base_url, path, body) for path, body in reqs]
        results = []
        for f in futures:
            try:
                results.append(f.result(timeout=900))
            except Exception as e:  # noqa: BLE001  counted as an error below
                results.append({"status": None, "error": f"{type(e).__name__}: {e}", "text": None})
    return results, time.monotonic() - start


def test_128_concurrent_requests_zero_errors_identical_to_alone(server, corpus):
    reqs = _load_requests(corpus)
    results, secs = _fire(server.base_url, reqs, workers=N_LOAD)
    errors = [(i, r) for i, r in enumerate(results) if r["status"] != 200 or r["error"]]
    kinds = {(("chat" if "messages" in b else "completion"), b["stream"]) for _, b in reqs}
    assert not errors, f"{len(errors)} errors, first: {errors[:3]}"
    assert len(kinds) == 4
    subset = list(range(0, N_LOAD, N_LOAD // N_ALONE))[:N_ALONE]
    alone_start = time.monotonic()
    with httpx.Client(timeout=rh.HTTP_TIMEOUT) as client:
        alone = {i: rh.send(client, server.base_url, *reqs[i]) for i in subset}
    alone_s = time.monotonic() - alone_start
    mismatches = [i for i in subset if alone[i]["text"] != results[i]["text"]]
    assert not mismatches, "concurrent != alone for requests " + ", ".join(
        f"{i}: {results[i]['text']!r} vs {alone[i]['text']!r}" for i in mismatches[:3])
    idle = rh.wait_idle(server.base_url)
    lengths = [len(b["prompt"]) if "prompt" in b else None for _, b in reqs]
    print(f"\nload: {N_LOAD} concurrent requests in {secs:.1f} s, 0 errors "
          f"(token prompts {min(x for x in lengths if x)}..{max(x for x in lengths if x)} tokens, "
          f"max_tokens 1..128); {N_ALONE} sent alone again in {alone_s:.1f} s: identical; "
          f"KV usage idle {idle['vllm:kv_cache_usage_perc']}")


def _pressure_requests(corpus) -> list[tuple[str, dict]]:
    _, ids = corpus
    reqs = []
    for i in range(N_PRESSURE):
        start = (i * 61) % 1500
        path, body = rh.completion_body(MODEL, ids[start:start + PRESSURE_PROMPT], PRESSURE_TOKENS, chat=False,
                                        stream=i % 2 == 1)
        body["ignore_eos"] = True  # every request really holds ~496 tokens of cache
        reqs.append((path, body))
    return reqs


def test_kv_cache_pressure_all_finish_identical_blocks_return(server, smollm2_path, corpus, workdir):
    reqs = _pressure_requests(corpus)
    reference, ref_s = _fire(server.base_url, reqs, workers=N_PRESSURE)  # roomy cache: no pressure
    assert all(r["status"] == 200 and not r["error"] for r in reference)
    small = vh.Server(str(smollm2_path), workdir / "pressure",
                      extra=["--num-gpu-blocks-override", str(PRESSURE_BLOCKS), "--max-model-len", "1024",
                             "--no-enable-prefix-caching"])
    try:
        small.wait_healthy(timeout=480)
        before = rh.metrics(small.base_url)
        assert before["vllm:kv_cache_usage_perc"] == 0
        results, secs = _fire(small.base_url, reqs, workers=N_PRESSURE)
        idle = rh.wait_idle(small.base_url)
        assert small.proc.poll() is None, "the pressured server died"
    finally:
        small.stop()
    errors = [(i, r) for i, r in enumerate(results) if r["status"] != 200 or r["error"]]
    assert not errors, f"{len(errors)} errors under pressure, first: {errors[:2]}"
    assert all(r["finish_reason"] == "length" for r in results)
    mismatches = [i for i, (a, b) in enumerate(zip(results, reference)) if a["text"] != b["text"]]
    assert not mismatches, f"pressured outputs differ for requests {mismatches}"
    preempted = idle.get("vllm:num_preemptions_total", 0) - before.get("vllm:num_preemptions_total", 0)
    assert idle["vllm:kv_cache_usage_perc"] == 0, "blocks not returned when idle"
    print(f"\nKV pressure: {PRESSURE_BLOCKS} blocks (~4 x {PRESSURE_PROMPT + PRESSURE_TOKENS} tokens), {N_PRESSURE} "
          f"requests in {secs:.1f} s (unpressured {ref_s:.1f} s): 0 errors, {preempted:.0f} preemptions, outputs "
          f"identical, KV usage back to 0")
    assert preempted > 0, "the small cache never preempted: no pressure was applied"


_NAN_SCRIPT = textwrap.dedent("""
    import os
    import runtime  # noqa: F401
    from vllm import LLM, SamplingParams
    llm = LLM(model=os.environ["MODEL"], dtype="float32", max_model_len=256, skip_tokenizer_init=True, max_num_seqs=2)
    out = llm.generate([{"prompt_token_ids": [1, 5, 9, 17]}], SamplingParams(max_tokens=2, temperature=0.0,
                                                                              detokenize=False), use_tqdm=False)
    print("@@GENERATED", list(out[0].outputs[0].token_ids), flush=True)
    os._exit(0)
""")


def test_nan_guard_names_the_layer(workdir, tmp_path):
    model = rh.tiny_llama(tmp_path / "tiny_nan", nan_in="model.layers.1.mlp.down_proj.weight")
    env = vh.clean_env(MODEL=str(model), VLLM_METAL_DEBUG="1", VLLM_METAL_DEBUG_DIR=str(tmp_path / "debug"),
                       VLLM_METAL_CACHE=str(tmp_path / "cache"))
    rc, out, secs = rh.run_python(_NAN_SCRIPT, env, 300, workdir / "nan.log")
    lines = [x for x in out.splitlines() if "non-finite logits" in x]
    assert lines, out[-5000:]
    line = lines[0]
    assert "layer 1" in line and "layers_1_mlp_down_proj" in line and "model.layers.1.mlp.down_proj.weight" in line, line
    print(f"\nNaN guard ({secs:.1f} s): {line.split('non-finite logits')[1][:300]}")
    # Without debug mode the guard costs nothing and says nothing.
    env["VLLM_METAL_DEBUG"] = "0"
    rc2, out2, _ = rh.run_python(_NAN_SCRIPT, env, 300, workdir / "nan_nodebug.log")
    assert "non-finite logits" not in out2
