"""Every family in lowering.coverage.FAMILIES, through both front ends, matches transformers eager
(f32, prefill + decode). Families we do not cover yet are expected failures with the reason, so the
day they start passing the suite says so (strict)."""

import runtime  # noqa: F401

import pytest

from lowering.coverage import FAMILIES, check

NOT_YET = {
}



@pytest.mark.parametrize("front", ["hf", "vllm"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_eager(family, front):
    if (family, front) in NOT_YET:
        pytest.xfail(NOT_YET[(family, front)])
    result = check(family, front)
    assert result["ok"], result
    assert result["greedy_match"], result
    assert not result["missed"], f"passes that should have matched did not: {result['missed']}"
