"""What vLLM users rely on works through the plugin as on vLLM's built-in CPU platform: structured output
(every installed backend), speculative decoding with vLLM's n-gram proposer, prompt logprobs, n > 1,
stop strings and stop tokens, max_tokens, seeds, and pooling (refused on the MLX step with the reason;
through `VLLM_METAL_USE_MLX=0` the same vectors as the CPU platform).

Real engines on a tiny random Llama with SmolLM2's tokenizer and chat template (tests/vllm_features.py):
one subprocess per platform, each building its engines in-process one after the other. The plugin's
and the CPU platform's results are compared token by token. The slow tests add the guidance and outlines
backends and n-gram speculation on SmolLM2 itself.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest

from vllm_features import CHOICES, CODE_REGEX, run_platform, platform_env, tiny_chat_llama

# JSON without free whitespace: a random model fills every place the grammar allows whitespace with it.
# Only xgrammar and guidance can be told so; outlines is tried on the real SmolLM2, whose JSON is compact.
COMPACT = {"disable_any_whitespace": True}
BASE = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 8, "seed": 0, "disable_log_stats": False,
        "structured_outputs_config": {**COMPACT, "backend": "xgrammar"}}
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
POOLING = {"runner": "pooling", "convert": "embed"}
PLUGIN_ENGINES = [
    {"name": "plugin", "llm": BASE, "tasks": ["features", "structured", "greedy"]},
    {"name": "pooling_mlx", "llm": {**BASE, **POOLING}, "tasks": ["embed"]},
    {"name": "pooling_torch", "llm": {**BASE, **POOLING}, "env": {"VLLM_METAL_USE_MLX": "0"}, "tasks": ["embed"]},
    # Last: after an engine with speculative decoding, vLLM cannot build another in the same process
    # (its Triton-kernel override registry fails on the second rebind).
    {"name": "ngram", "llm": {**BASE, "speculative_config": NGRAM}, "tasks": ["greedy", "structured"]},
]
# The slow part: the other structured-output backends, and n-gram speculation on the real SmolLM2.
SMOLLM2 = {**BASE, "structured_outputs_config": {"backend": "xgrammar"}}
SLOW_ENGINES = [
    {"name": "guidance", "llm": {**BASE, "structured_outputs_config": {**COMPACT, "backend": "guidance"}},
     "tasks": ["structured"]},
    {"name": "outlines", "model": "smollm2", "llm": {**SMOLLM2, "structured_outputs_config": {"backend": "outlines"}},
     "tasks": ["structured"]},
    {"name": "smollm2", "model": "smollm2", "llm": SMOLLM2, "tasks": ["greedy"]},
    {"name": "smollm2_ngram", "model": "smollm2", "llm": {**SMOLLM2, "speculative_config": NGRAM}, "tasks": ["greedy"]},
]
CPU_ENGINES = [
    {"name": "cpu", "llm": {**BASE, "enforce_eager": True}, "tasks": ["features", "structured"]},
    {"name": "cpu_pooling", "llm": {**BASE, **POOLING, "enforce_eager": True}, "tasks": ["embed"]},
]
LOGPROB_TOL = 1e-4  # f32, chosen and runner-up tokens of every prompt position


def _run(workdir, smollm2_path, platforms: dict) -> dict:
    """{platform: engines} -> {platform: results}, the platforms' subprocesses side by side."""
    model = str(tiny_chat_llama(workdir / "tiny_chat_llama", str(smollm2_path)))
    results = {}

    def run(platform, engines):
        engines = [{**e, "model": str(smollm2_path)} if e.get("model") == "smollm2" else e for e in engines]
        results[platform] = run_platform(platform, engines, model, workdir, platform_env(platform), timeout=900)

    threads = [threading.Thread(target=run, args=a) for a in platforms.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\n[vllm features] seconds per engine: " + json.dumps(
        {p: {n: round(e["total_s"], 1) for n, e in r.items() if n != "_log"} for p, r in results.items()}))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_path):
    return _run(tmp_path_factory.mktemp("vllm_features"), smollm2_path, {"plugin": PLUGIN_ENGINES, "cpu": CPU_ENGINES})


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory, smollm2_path):
    return _run(tmp_path_factory.mktemp("vllm_features_slow"), smollm2_path, {"plugin": SLOW_ENGINES})


def engine(runs, platform: str, name: str) -> dict:
    entry = runs[platform].get(name)
    assert entry is not None, f"{platform} run never reached engine {name!r}; log tail:\n{runs[platform]['_log'][-4000:]}"
    return entry


def task(runs, platform: str, name: str, what: str) -> dict:
    entry = engine(runs, platform, name)
    assert "error" not in entry, f"engine {name!r} ({platform}) did not start: {entry['error']}"
    result = entry.get(what)
    assert result is not None and "error" not in result, f"{name}.{what} ({platform}): {result and result['error']}"
    return result


def check_structured(out: dict, name: str) -> None:
    from vllm_features import CAT_SCHEMA

    doc = json.loads(out["json"]["text"])  # raises on invalid JSON
    assert set(doc) == set(CAT_SCHEMA["required"]) and isinstance(doc["name"], str), (name, doc)
    assert isinstance(doc["age"], int) and 0 <= doc["age"] <= 99 and len(doc["name"]) <= 12, (name, doc)
    assert re.fullmatch(CODE_REGEX, out["regex"]["text"]), (name, out["regex"])
    assert out["choice"]["text"] in CHOICES, (name, out["choice"])


def test_structured_output_is_valid_and_as_on_cpu_platform(runs):
    for name in ("plugin", "ngram"):  # xgrammar; with n-gram speculation too
        check_structured(task(runs, "plugin", name, "structured"), name)
    # Same backend, greedy: the same text as vLLM's CPU platform.
    assert task(runs, "plugin", "plugin", "structured") == task(runs, "cpu", "cpu", "structured")


@pytest.mark.slow
def test_structured_output_is_valid_with_guidance_and_outlines(slow_runs):
    for name in ("guidance", "outlines"):
        check_structured(task(slow_runs, "plugin", name, "structured"), name)


@pytest.mark.slow
def test_ngram_speculative_decoding_keeps_smollm2_greedy_output(slow_runs):
    plain, spec = task(slow_runs, "plugin", "smollm2", "greedy"), task(slow_runs, "plugin", "smollm2_ngram", "greedy")
    assert spec["alone"] == plain["alone"] and spec["together"] == plain["together"]
    counters = spec["spec"]
    print(f"\n[vllm features] n-gram speculation (SmolLM2): {counters.get('vllm:spec_decode_num_accepted_tokens')} of "
          f"{counters.get('vllm:spec_decode_num_draft_tokens')} draft tokens accepted")
    assert counters.get("vllm:spec_decode_num_accepted_tokens", 0) > 0, counters


def test_prompt_logprobs_match_cpu_platform(runs):
    ours, theirs = (task(runs, p, n, "features") for p, n in (("plugin", "plugin"), ("cpu", "cpu")))
    assert ours["prompt_ids"] == theirs["prompt_ids"]
    worst, compared = 0.0, 0
    for prompt, a, b in zip(ours["prompt_ids"], ours["prompt_logprobs"], theirs["prompt_logprobs"]):
        assert len(a) == len(b) == len(prompt) and a[0] is None and b[0] is None  # no logprob for the first token
        for i, (x, y) in enumerate(zip(a[1:], b[1:]), start=1):
            assert str(prompt[i]) in x, f"the prompt token itself is missing at position {i}: {x}"
            for token in set(x) & set(y):
                worst, compared = max(worst, abs(x[token] - y[token])), compared + 1
            assert set(x) == set(y), f"position {i}: top tokens differ {sorted(x)} vs {sorted(y)}"
    print(f"\n[vllm features] prompt logprobs: {compared} compared, max abs difference {worst:.2e}")
    assert worst <= LOGPROB_TOL, f"prompt logprobs differ by {worst:.2e} (limit {LOGPROB_TOL:g})"


def test_n_greater_than_one_matches_cpu_platform(runs):
    ours, theirs = (task(runs, p, n, "features")["n3"] for p, n in (("plugin", "plugin"), ("cpu", "cpu")))
    for completions in ours:
        assert len(completions) == 3 and all(len(c["token_ids"]) == 12 for c in completions)
        assert len({tuple(c["token_ids"]) for c in completions}) > 1, "n=3 sampled three identical completions"
    assert ours == theirs


def test_stop_strings_stop_tokens_and_max_tokens_match_cpu_platform(runs):
    ours, theirs = (task(runs, p, n, "features") for p, n in (("plugin", "plugin"), ("cpu", "cpu")))
    for key in ("greedy", "stop", "stop_included", "stop_token", "max_tokens"):
        assert ours[key] == theirs[key], key
    for greedy, stop, cut, kept, tid, tcut, short in zip(
            ours["greedy"], ours["stop_strings"], ours["stop"], ours["stop_included"], ours["stop_token_ids"],
            ours["stop_token"], ours["max_tokens"]):
        text = greedy[0]["text"]
        assert cut[0]["finish_reason"] == "stop" and cut[0]["stop_reason"] == stop, cut
        assert cut[0]["text"] == text[:text.index(stop)], (stop, cut[0]["text"], text)
        assert kept[0]["text"] == text[:text.index(stop) + len(stop)], (stop, kept[0]["text"])
        first = greedy[0]["token_ids"].index(tid)
        assert tcut[0]["token_ids"] == greedy[0]["token_ids"][:first + 1] and tcut[0]["stop_reason"] == tid, tcut
        assert len(short[0]["token_ids"]) == 5 and short[0]["finish_reason"] == "length", short
        assert short[0]["token_ids"] == greedy[0]["token_ids"][:5]


def test_seeds_match_cpu_platform(runs):
    ours, theirs = (task(runs, p, n, "features")["seeds"] for p, n in (("plugin", "plugin"), ("cpu", "cpu")))
    same_a, same_b, other = ours
    assert same_a == same_b, "the same seed gave different tokens"
    assert same_a != other, "seeds 1234 and 99 gave the same tokens"
    assert ours == theirs, "seeded sampling differs from vLLM's CPU platform"


def test_ngram_speculative_decoding_keeps_greedy_output(runs):
    plain, spec = task(runs, "plugin", "plugin", "greedy"), task(runs, "plugin", "ngram", "greedy")
    assert spec["alone"] == plain["alone"], "n-gram speculation changed greedy tokens (one request at a time)"
    assert spec["together"] == plain["together"], "n-gram speculation changed greedy tokens (batched)"
    counters = spec["spec"]
    drafted, accepted = counters.get("vllm:spec_decode_num_draft_tokens", 0), counters.get(
        "vllm:spec_decode_num_accepted_tokens", 0)
    print(f"\n[vllm features] n-gram speculation (tiny model): {accepted} of {drafted} draft tokens accepted; "
          f"greedy {plain['alone_s'] + plain['together_s']:.1f} s plain, {spec['alone_s'] + spec['together_s']:.1f} s "
          "speculating")
    assert drafted > 0 and accepted > 0, f"the verification path never ran: {counters}"


def test_pooling_on_mlx_refused_at_start_with_the_reason(runs):
    entry = engine(runs, "plugin", "pooling_mlx")
    assert "embed" not in entry, "a pooling engine started on the MLX step"
    assert entry.get("one_line") and "VLLM_METAL_USE_MLX=0" in entry["one_line"], entry


def test_pooling_through_torch_model_matches_cpu_platform(runs):
    ours = np.array(task(runs, "plugin", "pooling_torch", "embed")["vectors"])
    theirs = np.array(task(runs, "cpu", "cpu_pooling", "embed")["vectors"])
    assert ours.shape == theirs.shape and ours.shape[1] == 64
    err = float(np.abs(ours - theirs).max())
    print(f"\n[vllm features] embeddings: max abs difference {err:.2e}")
    assert err <= 1e-4, f"embeddings differ by {err:.2e}"
