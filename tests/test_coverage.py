"""Every family in vllm_metal_plugin.coverage.FAMILIES, through both front ends and in float32, bfloat16 and float16,
matches its reference at positions past 4096 (a 4090-token prompt, then decode steps): in f32 transformers
eager for the HF front and vLLM's own torch model run eagerly for the vLLM front (transformers where vLLM
has no torch path on this platform: MoE), within 1e-4 x max |logit|; in bf16/f16 transformers in f32 on the
same rounded weights, within 1.5x transformers' own error in that dtype + 1e-3 x max |logit|. The RoPE
frequencies the rope pass read off each model equal transformers' float32 ones to 1e-6 (relative).
Families we do not cover yet are expected failures with the reason, so the day they start passing the
suite says so (strict). The engine comparison (greedy tokens through vLLM with the plugin == vLLM's CPU
platform) is slow."""

import runtime  # noqa: F401

import pytest

from vllm_metal_plugin.coverage import FAMILIES, check, engine_greedy

NOT_YET: dict = {}
FREQUENCY_TOLERANCE = 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("front", ["hf", "vllm"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_reference_at_long_positions(family, front, dtype):
    if (family, front) in NOT_YET:
        pytest.xfail(NOT_YET[(family, front)])
    result = check(family, front, dtype)
    print(result)
    if result["ok"] is None:
        pytest.skip(result["note"])
    assert result["ok"], result
    assert not result["missed"], f"passes that should have matched did not: {result['missed']}"
    if result["rope_freq_err"] is not None:
        assert result["rope_freq_err"] <= FREQUENCY_TOLERANCE, result
    if dtype == "float32":
        assert result["greedy_match"], result
        if front == "vllm" and family != "mixtral-moe":
            assert result["reference"] == "vLLM eager", result


@pytest.mark.slow
def test_engine_greedy_matches_vllm_cpu_platform(tmp_path):
    """The real engine (vllm.LLM, f32) with the plugin generates exactly the greedy tokens of vLLM's
    built-in CPU platform, for every family (4 batched prompts, 16 tokens)."""
    results = engine_greedy(list(FAMILIES), tmp_path)
    report = {f: {k: r.get(k) for k in ("identical", "first_difference", "gap_at_difference", "max_logprob_diff",
                                        "error")} for f, r in results.items()}
    print(report)
    bad = {f: r for f, r in report.items() if not r["identical"]}
    assert not bad, f"greedy tokens differ from vLLM's CPU platform: {bad}"
    assert all(r["max_logprob_diff"] < 1e-4 for r in report.values()), report
