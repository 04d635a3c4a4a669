"""vLLM's OpenAI-compatible server with the plugin, on 127.0.0.1, driven by the official `openai` client
(completions, chat, streaming, bad requests). Real server, no mocks.

The server is one subprocess for the module (`vllm-metal-serve`, which starts vLLM's own
`vllm.entrypoints.openai.api_server`; the module itself is the fallback), started on a free loopback
port, polled on /health (bounded), and killed with its process group at teardown, always.
"""

from __future__ import annotations

import json
import time

import pytest

import vllm_helpers as vh

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    srv = vh.Server(str(smollm2_path), tmp_path_factory.mktemp("server"), served_name=MODEL)
    try:
        start = srv.wait_healthy(timeout=600)
        print(f"\nserver healthy after {start:.1f} s: {' '.join(srv.command)}")
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, **kw)


def test_plugin_serves_and_models_lists_the_model(server, client):
    assert vh.PLATFORM_LOG_LINE in server.log()
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.text.strip(), "empty completion"
    assert r.usage.completion_tokens == 8 and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == 5
    again = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text  # greedy is deterministic across requests


def test_chat_completions_with_chat_template(client):
    r = _chat(client)
    text = r.choices[0].message.content
    assert "Paris" in text, text
    assert r.choices[0].finish_reason == "stop"
    # SmolLM2's chat template (with its default system prompt) is what the server applied.
    assert r.usage.prompt_tokens == 37


def test_streaming_chat_equals_non_streaming(client):
    full = _chat(client).choices[0].message.content
    pieces, chunks = [], 0
    deadline = time.monotonic() + 120
    for chunk in _chat(client, stream=True):
        chunks += 1
        assert chunks < 200 and time.monotonic() < deadline
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) > 1, "not streamed"
    assert "".join(pieces) == full


def _post(server, path, body: bytes | dict, timeout=60):
    import requests

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server.base_url + path, data=data, headers={"Content-Type": "application/json"},
                         timeout=timeout)


def test_bad_requests_answered_4xx_and_server_keeps_working(server, client):
    long_prompt = "hello " * 1100  # > max_model_len (1024) tokens
    cases = [
        ("max_tokens negative", "/v1/completions",
         {"model": MODEL, "prompt": "Hi", "max_tokens": -5}, ["max_tokens"]),
        ("temperature < 0", "/v1/chat/completions",
         {"model": MODEL, "messages": QUESTION, "temperature": -0.5}, ["temperature"]),
        ("unknown model", "/v1/chat/completions",
         {"model": "no-such-model", "messages": QUESTION}, ["no-such-model"]),
        ("malformed JSON", "/v1/chat/completions",
         b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}', ["json"]),
        ("prompt longer than max_model_len", "/v1/completions",
         {"model": MODEL, "prompt": long_prompt, "max_tokens": 4}, ["1024"]),
    ]
    answered = []
    for name, path, body, words in cases:
        r = _post(server, path, body)
        text = r.text
        assert 400 <= r.status_code < 500, f"{name}: HTTP {r.status_code} {text[:300]}"
        assert all(w.lower() in text.lower() for w in words), f"{name}: message does not name it: {text[:300]}"
        answered.append((name, r.status_code, _message(text)))
    for name, code, msg in answered:
        print(f"  bad request {name!r}: HTTP {code}: {msg[:160]}")
    print(f"{len(answered)}/{len(cases)} bad requests answered 4xx")
    assert server.proc.poll() is None, "server died"
    assert "Paris" in _chat(client).choices[0].message.content


def _message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text
    err = body.get("error", body)
    return err.get("message", str(err)) if isinstance(err, dict) else str(err)
