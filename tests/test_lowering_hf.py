"""Lowering through the Hugging Face front end: numerics vs torch eager, fusion counts, one capture
for every token count, and the full list of unsupported ops in one error."""

import runtime  # noqa: F401

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lowering import capture
from lowering.api import build_model, lower
from lowering.emit import UnsupportedOpsError
from lowering.driver import Driver


def tiny_llama(dtype=torch.float32, seed=0):
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def lowered_logits_along(model_lowered, tokens: list[int], prefill: int) -> np.ndarray:
    """Logits of every position after `prefill`: one prefill step, then one decode step per token."""
    driver = Driver(model_lowered)
    driver.add(0, tokens)
    rows = [np.array(driver.step({0: prefill})[0].astype(mx.float32))]
    for _ in range(len(tokens) - prefill):
        rows.append(np.array(driver.step({0: 1})[0].astype(mx.float32)))
    return np.stack(rows)


def check_against_eager(torch_model, lowered, prompt_len, decode_steps=3, rel=1e-4, seed=1):
    vocab = torch_model.config.vocab_size
    tokens = torch.randint(0, vocab, (prompt_len + decode_steps,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = torch_model(tokens[None]).logits[0, prompt_len - 1:].float().numpy()
    got = lowered_logits_along(lowered, tokens.tolist(), prompt_len)
    err, top = np.abs(got - ref).max(), np.abs(ref).max()
    assert err <= rel * top, f"prompt {prompt_len}: max abs error {err:.3g} > {rel} x max|logit| {top:.3g}"


@pytest.fixture(scope="module")
def tiny_f32():
    model = tiny_llama()
    return model, build_model(lower(capture.capture_hf(model)), num_blocks=64, block_size=16)


@pytest.mark.parametrize("prompt_len", [1, 7, 64])
def test_tiny_llama_f32_matches_eager(tiny_f32, prompt_len):
    check_against_eager(*tiny_f32, prompt_len)


def test_tiny_llama_bf16_matches_eager():
    model = tiny_llama(torch.bfloat16)
    lowered = build_model(lower(capture.capture_hf(model)), num_blocks=64, block_size=16)
    check_against_eager(model, lowered, 7, rel=2e-2)


def test_one_capture_serves_every_token_count():
    model = tiny_llama(seed=3)
    before = capture.CAPTURES
    lowered = build_model(lower(capture.capture_hf(model)), num_blocks=64, block_size=16)
    assert capture.CAPTURES == before + 1
    for n in (1, 2, 17, 64, 300):
        check_against_eager(model, lowered, n, decode_steps=1)
    assert capture.CAPTURES == before + 1, "a new token count triggered a re-capture"


class _Weird(torch.nn.Module):
    """Ops without an MLX lowering, in two different modules."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.special.bessel_j0(self.proj(x)) + torch.fft.fft(x).real + torch.lgamma(x)


def test_unsupported_ops_are_all_listed():
    from passes.program import Program

    gm = torch.export.export(_Weird(), (torch.randn(3, 8),)).graph_module
    program = Program(gm, {}, {}, ["x"], [])
    with pytest.raises(UnsupportedOpsError) as info:
        lower(program)
    targets = {op.target for op in info.value.ops}
    assert {"aten.special_bessel_j0.default", "aten.lgamma.default"} <= targets, targets
    assert any("fft" in t for t in targets), targets
    assert all(op.source for op in info.value.ops), "each unsupported op names its source line"
    assert "test_lowering_hf.py" in str(info.value)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return model, lower(capture.capture_hf(model, name="SmolLM2-135M"))


def test_smollm2_fusion_counts(smollm2_hf):
    _, lowered = smollm2_hf
    ops = lowered.op_histogram()
    assert ops.get("mlx.rms_norm") == 1 and ops.get("mlx.add_rms_norm") == 60, ops  # 61 norms, 60 after an add
    assert ops.get("mlx.rope_paged_attention") == 30 and "mlx.rope" not in ops, ops  # 60 ropes folded in
    assert "mlx.paged_attention" not in ops, ops
    for leftover in ("pow.Tensor_Scalar", "rsqrt", "neg", "cat", "scaled_dot_product_attention"):
        assert leftover not in ops, f"{leftover} survived the passes: {ops}"
    assert not any(r.missed for r in lowered.passes), lowered.passes
    src = lowered.source
    assert src.count("= k.rms_norm(") == 1 and src.count("= k.add_rms_norm(") == 60 and "k.rope(" not in src
    assert src.count("= k.rope_paged_attention(") == 30 and "k.paged_attention(" not in src


@pytest.mark.parametrize("prompt_len", [7, 64])
def test_smollm2_matches_eager(smollm2_hf, prompt_len):
    model, lowered = smollm2_hf
    check_against_eager(model, build_model(lowered, num_blocks=32, block_size=16), prompt_len, decode_steps=2)
