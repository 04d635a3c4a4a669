"""The vLLM plugin end to end, with the real engine (no mocks).

Every engine configuration runs in its own subprocess (tests/vllm_helpers.py is the runner) and
answers several checks per start, because a start costs ~30-50 s on this 2-core machine. The four
runs are queued at the beginning of this module and run two at a time (engine start-up is mostly
single-threaded Python, so two overlap well); the one that lowers the model goes first, the second MLX
run starts once the lowered step is in the on-disk cache.

  metal      plugin, no env var, prefix caching on, stats on: platform, greedy 8x48 (+logprobs),
             shared-system-prompt prefix hits, seeded sampling
  metal_npc  plugin, enable_prefix_caching=False: 32 mixed prompts together vs alone, the prefix
             prompts without caching
  torch      plugin with VLLM_METAL_USE_MLX=0 (vLLM's torch model, eager): greedy 8x48 + logprobs
  metal_q4   plugin serving the bundled model at 4 bits from its own GGUF file (`smollm2-q4`): greedy 8x48
  reference  VLLM_PLUGINS=none (vLLM's built-in CPU platform, enforce_eager): platform, greedy 8x48
  transformers  no engine: transformers `generate` on the same prompts (greedy, f32)

Greedy token ids must be identical. A divergence is accepted only where transformers shows a near-tie
(top-2 logits within 1e-4) at the first differing step; then the tokens are compared up to that
step and the test says so (a warning in the summary).
"""

from __future__ import annotations

import json
import re
import time
import warnings

import pytest

import vllm_helpers as vh

import weights.bundled as bundled

NEAR_TIE = 1e-4
LOGPROB_TOL = 1e-3
ENGINE_TIMEOUT = 900  # s, per subprocess: generous, the machine may be shared (unloaded: 50-150 s each)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm_engines")


@pytest.fixture(scope="module")
def engines(smollm2_path, workdir):
    model = str(smollm2_path)
    base = {"model": model, "greedy_tokens": 48, "logprobs": 5}
    llm = {"dtype": "float32", "max_model_len": 1024}
    pool = vh.EnginePool(workdir, parallel=2, deadline_s=1800)
    pool.submit("metal", {**base, "llm": {**llm, "disable_log_stats": False}, "stats": True,
                          "tasks": ["platform", "greedy", "prefix", "sampling"]}, timeout=ENGINE_TIMEOUT)
    # The second MLX engine starts once the first has lowered (or loaded) the step: two processes
    # lowering the same model at once is tests/test_reliability.py's business, not this test's.
    pool.submit("metal_npc", {**base, "llm": {**llm, "enable_prefix_caching": False},
                              "tasks": ["platform", "mixed", "prefix"]}, timeout=ENGINE_TIMEOUT,
                after=lambda p: p.runs["metal"].proc.poll() is not None
                or p.runs["metal"].log_contains("vllm-metal: lowered"))
    pool.submit("reference", {**base, "llm": {**llm, "enforce_eager": True}, "tasks": ["platform", "greedy"]},
                env=vh.clean_env(VLLM_PLUGINS="none", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0"),
                timeout=ENGINE_TIMEOUT)
    # transformers in a process of its own (after a vLLM engine in the same process it crawled).
    pool.submit("transformers", {**base, "tasks": ["hf"]}, timeout=ENGINE_TIMEOUT)
    pool.submit("torch", {**base, "llm": llm, "tasks": ["platform", "greedy"]},
                env=vh.clean_env(VLLM_METAL_USE_MLX="0"), timeout=ENGINE_TIMEOUT)
    pool.submit("metal_q4", {**base, "model": bundled.resolve("smollm2-q4"), "llm": llm, "tasks": ["platform", "greedy"]},
                timeout=ENGINE_TIMEOUT)
    started = time.monotonic()
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()
        timings = {name: {**run._result["timings"], "wall_s": run._result["wall_s"]}
                   for name, run in pool.runs.items() if run._result is not None}
        timings["all_engines_wall_s"] = time.monotonic() - started
        (workdir / "timings.json").write_text(json.dumps(timings, indent=1))
        print("\nengine timings (s):", json.dumps(timings, indent=1))


def _near_tie_check(pairs, model, workdir, label):
    """pairs: [(prompt_ids, ours, theirs)]. Returns per-prompt compared length; fails on real divergences."""
    diverged = []
    compared = []
    for i, (prompt, ours, theirs) in enumerate(pairs):
        k = vh.first_difference(ours, theirs)
        if k is None:
            compared.append(len(ours))
            continue
        assert k < min(len(ours), len(theirs)), f"{label} prompt {i}: lengths differ {len(ours)} vs {len(theirs)}"
        diverged.append((i, k, prompt + ours[:k], ours[k], theirs[k]))
        compared.append(k)
    if diverged:
        gaps = vh.near_tie_gaps(model, [d[2] for d in diverged], workdir)
        for (i, k, _, a, b), g in zip(diverged, gaps):
            msg = (f"{label} prompt {i}: first difference at step {k} (ours {a}, theirs {b}); transformers top-2 "
                   f"{g['top2_ids']} logits {g['top2_logits']} gap {g['gap']:.3g}")
            assert g["gap"] <= NEAR_TIE and {a, b} <= set(g["top2_ids"]), "not a near-tie: " + msg
            warnings.warn(f"near-tie accepted, compared up to step {k}: " + msg)
    return compared


def _greedy_ids(run_result):
    return [o["token_ids"] for o in run_result["greedy"]["outputs"]]


# --------------------------------------------------------------------------------------------------
def test_plugin_active_without_env_vars(engines):
    r = engines.get("metal")
    assert vh.PLATFORM_LOG_LINE in r["log"], "the plugin's platform line is missing from the engine log"
    assert r["platform"]["main_process"] == vh.METAL_PLATFORM
    (worker,) = r["platform"]["workers"]
    assert worker["platform"] == vh.METAL_PLATFORM
    assert worker["worker"] == "vllm_metal_plugin.worker.MetalWorker"
    assert worker["model_runner"] == "vllm_metal_plugin.model_runner.MetalModelRunner"
    assert worker["mlx_step_built"], "the model step is not the lowered MLX step"
    assert "vllm-metal: lowered" in r["log"]


def test_vllm_plugins_none_gives_builtin_cpu_platform(engines):
    r = engines.get("reference")
    assert r["platform"]["main_process"] == vh.CPU_PLATFORM
    assert [w["platform"] for w in r["platform"]["workers"]] == [vh.CPU_PLATFORM]
    assert vh.PLATFORM_LOG_LINE not in r["log"]


def test_use_mlx_0_runs_torch_model_through_plugin(engines):
    r = engines.get("torch")
    (worker,) = r["platform"]["workers"]
    assert worker["platform"] == vh.METAL_PLATFORM and not worker["mlx_step_built"]
    assert "use_mlx=False" in r["log"]


def test_greedy_matches_builtin_cpu_platform(engines, smollm2_path, workdir):
    ours, ref = engines.get("metal"), engines.get("reference")
    prompts = _prompts(smollm2_path)["greedy"]
    assert len(prompts) == 8
    assert all(len(t) == 48 for t in _greedy_ids(ours))
    compared = _near_tie_check(list(zip(prompts, _greedy_ids(ours), _greedy_ids(ref))), str(smollm2_path), workdir,
                               "MLX vs vLLM CPU platform")
    print(f"MLX vs vLLM CPU platform: {sum(compared)}/{8 * 48} tokens compared, identical")


def test_bundled_model_at_4_bits(engines, smollm2_path, workdir):
    """The bundled model served from its own 4-bit GGUF file: its weights are those the float32 checkpoint was
    dequantized from, so the greedy tokens equal the float32 checkpoint's (up to near-ties), from a fifth of
    the weight memory."""
    q4, f32 = engines.get("metal_q4"), engines.get("metal")
    (worker,) = q4["platform"]["workers"]
    assert worker["mlx_step_built"] and "gguf checkpoint" in q4["log"], "the GGUF was not served by the plugin"
    prompts = _prompts(smollm2_path)["greedy"]
    compared = _near_tie_check(list(zip(prompts, _greedy_ids(q4), _greedy_ids(f32))), str(smollm2_path), workdir,
                               "4-bit GGUF vs float32 checkpoint")
    print(f"4-bit GGUF vs float32 checkpoint: {sum(compared)}/{8 * 48} tokens compared, identical")
    sizes = [_weights_bytes(run["log"]) for run in (q4, f32)]
    assert sizes[0] < 0.25 * sizes[1], f"weights: {sizes[0]} bytes at 4 bits vs {sizes[1]} in float32"


def _weights_bytes(log: str) -> int:
    plans = re.findall(r'KV cache plan (\{.*\})', log)
    assert plans, "no KV cache plan in the engine log"
    return json.loads(plans[-1])["weights_bytes"]


def test_greedy_matches_transformers_generate(engines, smollm2_path, workdir):
    ours = engines.get("metal")
    prompts = _prompts(smollm2_path)["greedy"]
    hf = engines.get("transformers")["hf"]["outputs"]
    assert all(len(t) == 48 for t in hf)
    compared = _near_tie_check(list(zip(prompts, _greedy_ids(ours), hf)), str(smollm2_path), workdir,
                               "MLX vs transformers")
    print(f"MLX vs transformers generate: {sum(compared)}/{8 * 48} tokens compared, identical")
    # The chat prompt answers like the model should.
    assert "Paris" in ours["greedy"]["outputs"][0]["text"]


def test_mixed_batch_equals_each_prompt_alone(engines):
    r = engines.get("metal_npc")["mixed"]
    assert len(r["together"]) == vh.NUM_MIXED == len(r["alone"])
    for i, (t, a) in enumerate(zip(r["together"], r["alone"])):
        assert t["token_ids"] == a["token_ids"], f"mixed prompt {i}: batched {t['token_ids']} vs alone {a['token_ids']}"
    print(f"32 mixed prompts: together {r['together_s']:.1f} s, one by one {r['alone_s']:.1f} s, identical")


def test_shared_system_prompt_hits_prefix_cache_outputs_unchanged(engines):
    r = engines.get("metal")["prefix"]
    npc = engines.get("metal_npc")["prefix"]
    n = vh.NUM_PREFIX_REQUESTS
    assert len(r["outputs"]) == n == len(npc["outputs"])
    # The warm-up request is the first sight of the system prompt; then every request reuses it.
    assert r["warm"][0]["num_cached_tokens"] == 0
    full_blocks = vh.SYSTEM_PROMPT_TOKENS // 16 * 16  # tokens in full 16-token blocks of the shared prompt
    cached = [o["num_cached_tokens"] for o in r["outputs"]]
    assert all(c >= full_blocks for c in cached), f"num_cached_tokens {cached} (want >= {full_blocks} each)"
    hits = r["metrics_after"].get("vllm:prefix_cache_hits", 0) - r["metrics_mid"].get("vllm:prefix_cache_hits", 0)
    queries = (r["metrics_after"].get("vllm:prefix_cache_queries", 0)
               - r["metrics_mid"].get("vllm:prefix_cache_queries", 0))
    assert hits >= n * full_blocks, f"engine prefix-cache stats: {hits} hits of {queries} queried tokens"
    assert all(o["num_cached_tokens"] == 0 for o in npc["outputs"])  # the no-caching engine computed it all
    for i, (a, b) in enumerate(zip(r["outputs"], npc["outputs"])):
        assert a["token_ids"] == b["token_ids"], f"prefix request {i}: cached {a['token_ids']} vs uncached {b['token_ids']}"
    assert r["warm"][0]["token_ids"] == npc["outputs"][0]["token_ids"]
    print(f"prefix cache: {hits} hit tokens of {queries} queried over {n} requests; num_cached_tokens {cached}")


def test_seeded_sampling_is_reproducible(engines):
    r = engines.get("metal")["sampling"]
    n = r["n"]
    assert r["call1"] == r["call2"], "same seeds, different samples"
    assert all(len(t) == 12 for t in r["call1"])
    assert r["call1"][:n] != r["call1"][n:], "seed 1234 and seed 99 sampled identical continuations"


def test_logprobs_returned_and_match_torch_baseline(engines, smollm2_path, workdir):
    ours, base = engines.get("metal"), engines.get("torch")
    prompts = _prompts(smollm2_path)["greedy"]
    compared = _near_tie_check(list(zip(prompts, _greedy_ids(ours), _greedy_ids(base))), str(smollm2_path),
                               workdir, "MLX vs VLLM_METAL_USE_MLX=0")
    worst = 0.0
    worst_any = 0.0
    for o, b, k in zip(ours["greedy"]["outputs"], base["greedy"]["outputs"], compared):
        assert len(o["logprobs"]) == 48
        for step in range(k):
            lo, lb = o["logprobs"][step], b["logprobs"][step]
            assert len(lo) >= 5, f"{len(lo)} logprobs returned, asked for 5"
            tok = str(o["token_ids"][step])
            assert lo[tok][1] == 1, "the greedy token is not rank 1"
            worst = max(worst, abs(lo[tok][0] - lb[tok][0]))
            for t in set(lo) & set(lb):
                worst_any = max(worst_any, abs(lo[t][0] - lb[t][0]))
    assert worst <= LOGPROB_TOL, f"chosen-token logprob differs by {worst:.2e} from the torch baseline"
    print(f"logprobs vs VLLM_METAL_USE_MLX=0: max |diff| chosen {worst:.2e}, any top-5 {worst_any:.2e}")


_PROMPTS = {}


def _prompts(path):
    if "p" not in _PROMPTS:
        from transformers import AutoTokenizer

        _PROMPTS["p"] = vh.build_prompts(AutoTokenizer.from_pretrained(str(path)))
    return _PROMPTS["p"]
