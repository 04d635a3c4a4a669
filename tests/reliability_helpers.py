"""Helpers for tests/test_reliability.py and tests/test_reliability_slow.py.

Servers and engines come from tests/vllm_helpers.py; this adds the HTTP side (127.0.0.1 only,
every call with a timeout), the /metrics reader, tiny checkpoints of architectures we do and do
not lower, and a bounded "run this python in a subprocess" helper for start-up failures.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
from safetensors.torch import save_file

import vllm_helpers as vh

HTTP_TIMEOUT = httpx.Timeout(300.0, connect=5.0)


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------
def completion_body(model: str, prompt, max_tokens: int, chat: bool, stream: bool,
                    top_logprobs: int = 0) -> tuple[str, dict]:
    """(path, body) of a greedy request; `prompt` is a list of token ids (completions) or text (chat).

    `top_logprobs` > 0 asks for that many logprobs per generated token, tokens named by id
    (vLLM's `return_tokens_as_token_ids`): `send` then returns the token ids and their top-k, which
    is what `divergence` needs to tell a near-tie from a real difference."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    if top_logprobs:
        body["return_tokens_as_token_ids"] = True
    if chat:
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    if top_logprobs:
        body["logprobs"] = top_logprobs
    return "/v1/completions", {**body, "prompt": prompt}


def _token_id(name: str) -> int:
    return int(name.removeprefix("token_id:"))


def _logprob_steps(logprobs: dict | None) -> list[tuple[int, dict[int, float]]]:
    """[(token id, {id: logprob of the top-k})] from a completions or chat `logprobs` object."""
    if not logprobs:
        return []
    if "content" in logprobs:  # chat
        return [(_token_id(c["token"]), {_token_id(t["token"]): t["logprob"] for t in c.get("top_logprobs") or []})
                for c in logprobs["content"] or []]
    return [(_token_id(t), {_token_id(k): v for k, v in (top or {}).items()})
            for t, top in zip(logprobs.get("tokens") or [], logprobs.get("top_logprobs") or [])]


def send(client: httpx.Client, base_url: str, path: str, body: dict) -> dict:
    """One request, streaming or not; returns {status, text, finish_reason, error, chunks, tokens, seconds}.

    `tokens` is [(token id, {id: logprob})] per generated token when the body asks for logprobs."""
    url = base_url + path
    start = time.monotonic()
    if not body.get("stream"):
        r = client.post(url, json=body)
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.text, "text": None, "finish_reason": None, "chunks": 0,
                    "tokens": [], "seconds": time.monotonic() - start}
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return {"status": 200, "text": text, "finish_reason": choice["finish_reason"], "error": None, "chunks": 1,
                "tokens": _logprob_steps(choice.get("logprobs")), "seconds": time.monotonic() - start}
    parts, finish, chunks, tokens = [], None, 0, []
    with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.read().decode(errors="replace"), "text": None,
                    "finish_reason": None, "chunks": 0, "tokens": [], "seconds": time.monotonic() - start}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data.strip() == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return {"status": 200, "error": data, "text": None, "finish_reason": None, "chunks": chunks,
                        "tokens": tokens, "seconds": time.monotonic() - start}
            chunks += 1
            for choice in event.get("choices", []):
                delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                parts.append(delta or "")
                tokens.extend(_logprob_steps(choice.get("logprobs")))
                finish = choice.get("finish_reason") or finish
    return {"status": 200, "text": "".join(parts), "finish_reason": finish, "error": None, "chunks": chunks,
            "tokens": tokens, "seconds": time.monotonic() - start}


NEAR_TIE = 1e-4  # top-2 logprob gap (= logit gap) below which f32 batching may flip greedy (tests/test_plugin.py)


def divergence(a: dict, b: dict, near_tie: float = NEAR_TIE) -> dict | None:
    """None when two greedy answers (from `send`, with logprobs) are identical; else where and how they differ.

    At the first differing token k both runs saw the same prefix; it is a near-tie when each run's
    top-k holds both chosen tokens and their logprobs differ by at most `near_tie` in both runs."""
    ids_a, ids_b = [t for t, _ in a["tokens"]], [t for t, _ in b["tokens"]]
    if ids_a == ids_b and a["text"] == b["text"]:
        return None
    k = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
    out = {"step": k, "tokens": len(ids_a), "tokens_other": len(ids_b), "near_tie": False,
           "same_tokens_other_text": ids_a == ids_b}
    if k < len(ids_a) and k < len(ids_b):
        x, y = ids_a[k], ids_b[k]
        top_a, top_b = a["tokens"][k][1], b["tokens"][k][1]
        gaps = [abs(top[x] - top[y]) if x in top and y in top else None for top in (top_a, top_b)]
        out.update(chosen=(x, y), gap=gaps[0], gap_other=gaps[1],
                   near_tie=all(g is not None and g <= near_tie for g in gaps))
    return out


def metrics(base_url: str) -> dict[str, float]:
    """Prometheus text from /metrics as {name{labels}: value} (and bare names summed over labels)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        m = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name + labels] = value
        out[name] = out.get(name, 0.0) + value if labels else value
    return out


def finished(m: dict[str, float], reason: str) -> float:
    return sum(v for k, v in m.items() if k.startswith("vllm:request_success_total{") and
               f'finished_reason="{reason}"' in k)


def wait_idle(base_url: str, timeout: float = 60) -> dict[str, float]:
    """Poll /metrics (bounded) until nothing runs or waits, the KV cache is empty and the counters have settled
    (two idle reads 0.5 s apart agree: vLLM counts a finished request after its response has gone out, so a
    read right after a response may miss it); returns the last read."""
    deadline = time.monotonic() + timeout
    m, settled = {}, None
    counters = ("vllm:request_success_total", "vllm:generation_tokens_total", "vllm:prompt_tokens_total")
    while time.monotonic() < deadline:
        m = metrics(base_url)
        idle = (m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0
                and m.get("vllm:kv_cache_usage_perc", 0) == 0)
        now = tuple(m.get(c, 0) for c in counters) if idle else None
        if now is not None and now == settled:
            return m
        settled = now
        time.sleep(0.5)
    raise AssertionError(f"server not idle after {timeout:.0f} s: running {m.get('vllm:num_requests_running')}, "
                         f"waiting {m.get('vllm:num_requests_waiting')}, kv usage {m.get('vllm:kv_cache_usage_perc')}")


# --------------------------------------------------------------------------------------------------
# Tiny checkpoints
# --------------------------------------------------------------------------------------------------
def tiny_llama(path: Path, nan_in: str | None = None) -> Path:
    """tests/test_lowering_vllm.py's tiny Llama; `nan_in` names a weight whose first row becomes NaN."""
    from test_lowering_vllm import tiny_llama_dir

    path.mkdir(parents=True, exist_ok=True)
    tiny_llama_dir(path)
    if nan_in is not None:
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
        state[nan_in] = state[nan_in].clone()
        state[nan_in][0] = float("nan")
        save_file(state, str(path / "model.safetensors"))
    return path


# --------------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------------
def run_python(code: str, env: dict, timeout: float, log: Path) -> tuple[int, str, float]:
    """Run `code` with the venv's python (bounded); returns (exit code, stdout+stderr, seconds)."""
    start = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen([vh.PYTHON, "-c", code], cwd=str(vh.REPO), env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            vh.kill_group(proc.pid)
            proc.wait(timeout=30)
            raise AssertionError(f"subprocess exceeded {timeout:.0f} s; output tail:\n"
                                 + log.read_text(errors="replace")[-4000:])
        finally:
            vh.kill_group(proc.pid)  # what it left behind: a script that ends in os._exit orphans vLLM's EngineCore
    return rc, log.read_text(errors="replace"), time.monotonic() - start
