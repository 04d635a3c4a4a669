"""Sibling projections -> one linear + slices (passes/merge_projections.py): the harness on small
functions (merges, bias handling, what must not merge), then a tiny HF Llama through the whole
pipeline (counts, weights, numerics vs transformers), the on-disk cache, and the vLLM front."""

import runtime  # noqa: F401

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowering import capture
from lowering.api import build_model, lower
from passes.merge_projections import PASS
from test_lowering_hf import lowered_logits_along, tiny_llama

ALL = (torch.float32, torch.bfloat16, torch.float16)


class Block(torch.nn.Module):
    """q/k/v of one input, gate/up of another (as in a Llama layer): two merges."""

    def __init__(self, d=32, kv=16, inter=48, bias=False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(d, n, bias=bias) for n in (d, kv, kv))
        self.gate_proj, self.up_proj = (torch.nn.Linear(d, inter, bias=False) for _ in range(2))

    def forward(self, x, h):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q.view(*q.shape[:-1], 4, -1) * 2, k, v + 1, F.silu(self.gate_proj(h)) * self.up_proj(h)


def _inputs(dtype, n):
    return torch.randn(n, 32, dtype=dtype), torch.randn(n, 32, dtype=dtype)


def _cast(module, dtype):
    return module.to(dtype).eval()


@pytest.mark.parametrize("dtype", ALL)
def test_qkv_and_gate_up_merge(check_pass, pass_strategies, dtype):
    torch.manual_seed(0)
    report = check_pass(PASS, _cast(Block(), dtype), _inputs, expect_matched=2, ops_before={"linear"},
                        ops_after={"linear", "slice.Tensor"}, dtypes=(dtype,),
                        sizes=pass_strategies.sizes(1, 40), max_examples=4)
    after = report.after[dtype]
    assert after.count("= linear(") == 2 and after.count("= slice.Tensor(") == 5, after
    assert '"q_proj+k_proj+v_proj.weight" : ' in after and '"gate_proj+up_proj.weight"' in after
    assert '"q_proj.weight"' not in after and '"up_proj.weight"' not in after, "the separate weights are dropped"


def test_biases_merge_too(check_pass):
    torch.manual_seed(1)
    report = check_pass(PASS, Block(bias=True).eval(), _inputs, expect_matched=2, sizes=(1, 7, 33))
    assert '"q_proj+k_proj+v_proj.bias" : f32[64]' in report.after[torch.float32]


def test_mixed_bias_merges_only_like_with_like(check_pass):
    """q with a bias, k and v without: k+v merge, q stays on its own."""
    torch.manual_seed(2)
    block = Block().eval()
    block.q_proj = torch.nn.Linear(32, 32, bias=True)
    report = check_pass(PASS, block, _inputs, expect_matched=2, sizes=(1, 9))
    after = report.after[torch.float32]
    assert '"k_proj+v_proj.weight"' in after and '"q_proj.weight"' in after and '"q_proj.bias"' in after
    assert after.count("= linear(") == 3


def test_different_inputs_do_not_merge(check_pass):
    class Separate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(32, 16, bias=False)

        def forward(self, x, h):
            return self.a(x), self.b(h)

    report = check_pass(PASS, Separate().eval(), _inputs, expect_matched=0, sizes=(3,))
    assert report.after[torch.float32].count("= linear(") == 2
    assert not report.results[torch.float32].missed


def test_weights_that_are_not_weight_placeholders_do_not_merge(check_pass):
    """Weights passed in at run time (graph inputs), or a weight something else reads too (tied)."""
    def runtime_weights(x, w1, w2):
        return F.linear(x, w1), F.linear(x, w2)

    check_pass(PASS, runtime_weights, lambda dt, n: (torch.randn(n, 32, dtype=dt), torch.randn(16, 32, dtype=dt),
                                                     torch.randn(8, 32, dtype=dt)),
               expect_matched=0, ops_after={"linear"}, sizes=(2,))

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 32)
            self.other = torch.nn.Linear(32, 8, bias=False)

        def forward(self, x, ids):
            return F.linear(x, self.emb.weight), self.other(x), self.emb(ids)

    report = check_pass(PASS, Tied().eval(), lambda dt, n: (torch.randn(n, 32, dtype=dt), torch.randint(0, 16, (n,))),
                        expect_matched=0, sizes=(4,))
    assert report.after[torch.float32].count("= linear(") == 2


def _weights(program):
    return len(program.weights), sum(t.numel() * t.element_size() for t in program.weights.values())


@pytest.fixture(scope="module")
def tiny_hf():
    """Tiny HF Llama (2 layers) lowered with and without the pass."""
    from passes import default_passes
    from passes.manager import PassManager

    model = tiny_llama()
    without = lower(capture.capture_hf(model), PassManager([p for p in default_passes() if p.name != PASS.name]))
    return model, without, lower(capture.capture_hf(model))


def test_tiny_llama_counts_and_weights(tiny_hf):
    _, without, lowered = tiny_hf
    (result,) = [r for r in lowered.passes if r.name == "merge_projections"]
    assert (result.matched, result.expected) == (4, 4), result  # 2 layers x (qkv, gate_up)
    ops, ops_without = lowered.op_histogram(), without.op_histogram()
    print(f"\nlinear {ops_without['linear']} -> {ops['linear']}, nodes {without.program.node_count()} -> "
          f"{lowered.program.node_count()}, weights (count, bytes) {_weights(without.program)} -> {_weights(lowered.program)}")
    assert (ops_without["linear"], ops["linear"]) == (15, 9) and ops["slice.Tensor"] == 10
    for fused in ("mlx.rms_norm", "mlx.add_rms_norm", "mlx.rope_paged_attention", "mlx.silu_mul"):
        assert ops[fused] == ops_without[fused], fused  # fusions matched as before
    count, size = _weights(lowered.program)
    assert count == _weights(without.program)[0] - 6 and size == _weights(without.program)[1], "no weight copies kept"
    assert "self_attn.q_proj+k_proj+v_proj.weight" in lowered.source and "mlp.gate_proj+up_proj.weight" in lowered.source


@pytest.mark.parametrize("prompt_len", [1, 7, 40])
def test_tiny_llama_matches_transformers(tiny_hf, prompt_len):
    model, without, lowered = tiny_hf
    tokens = torch.randint(0, 256, (prompt_len + 3,), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        ref = model(tokens[None]).logits[0, prompt_len - 1:].numpy()
    got = lowered_logits_along(build_model(lowered, num_blocks=16), tokens.tolist(), prompt_len)
    base = lowered_logits_along(build_model(without, num_blocks=16), tokens.tolist(), prompt_len)
    err, top = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    print(f"\nprompt {prompt_len}: max|logit| {top:.3g}, max abs err merged {err:.3g}, "
          f"unmerged {float(np.abs(base - ref).max()):.3g}, merged vs unmerged {float(np.abs(got - base).max()):.3g}")
    assert err <= 1e-4 * top


def test_cached_artefact_rebuilds_merged_weights(tiny_hf, tmp_path, monkeypatch):
    """lower_cached stores the recipe, not a copy: constants.safetensors holds no merged weight, and a
    hit rebuilds the same arrays from the model's state."""
    from lowering.api import lower_cached
    from lowering.compile import CONSTANTS

    monkeypatch.setenv("VLLM_METAL_CACHE", str(tmp_path))
    model = tiny_hf[0]
    state = dict(model.named_parameters(remove_duplicate=False))
    identity = {"test": "merge_projections cache", "model": "tiny llama"}
    _, miss, _, info = lower_cached(identity, lambda: capture.capture_hf(model), state)
    _, hit, _, info2 = lower_cached(identity, lambda: pytest.fail("captured again"), state)
    assert (info["cache"], info2["cache"]) == ("miss", "hit") and set(hit) == set(miss)
    merged = [p for p in miss if "+" in p]
    assert len(merged) == 4 and all(mx.array_equal(hit[p], miss[p]).item() for p in miss)
    stored = mx.load(str(next(tmp_path.rglob(CONSTANTS))))
    assert not any("+" in p for p in stored), sorted(stored)


def test_vllm_front_has_nothing_to_merge(tmp_path):
    """vLLM's Llama already has qkv_proj and gate_up_proj: the pass matches nothing, expects nothing."""
    from lowering.vllm_build import build_vllm_model
    from test_lowering_vllm import tiny_llama_dir

    model, config = build_vllm_model(str(tiny_llama_dir(tmp_path)), max_model_len=512)
    lowered = lower(capture.capture_vllm(model, config))
    (result,) = [r for r in lowered.passes if r.name == "merge_projections"]
    assert (result.matched, result.expected, result.nodes_before, result.nodes_after) == (0, 0, result.nodes_before,
                                                                                         result.nodes_before)
    assert lowered.op_histogram()["linear"] == 2 * 4 + 1 and not lowered.program.derived


def test_quantized_projections_merge_and_cache(tmp_path, monkeypatch):
    """Quantized at load (4-bit, groups of 32): q/k/v and gate/up merge as quantized linears (codes, scales and
    biases concatenated by rows), the step matches transformers holding the dequantized weights, and a cache
    hit rebuilds the merged parts from the quantized sources instead of storing them."""
    from lowering.api import lower_cached
    from lowering.compile import CONSTANTS, load_step
    from runtime.model import CacheLayout, LoweredModel
    from weights.quantize import QuantizeSpec, quantize_weight

    monkeypatch.setenv("VLLM_METAL_CACHE", str(tmp_path))
    model, spec = tiny_llama(seed=3), QuantizeSpec(4, 32)
    state = dict(model.named_parameters(remove_duplicate=False))
    identity = {"test": "merge_projections quantized cache", "model": "tiny llama"}
    source, miss, layers, info = lower_cached(identity, lambda: capture.capture_hf(model), state, quantize=spec)
    _, hit, _, info2 = lower_cached(identity, lambda: pytest.fail("captured again"), state, quantize=spec)
    assert (info["cache"], info2["cache"]) == ("miss", "hit") and set(hit) == set(miss)
    (result,) = [r for r in info["passes"] if r.name == "merge_projections"]
    assert result.matched == 4 and source.count("k.quantized_linear(") == 2 * 4 + 1, source
    merged = sorted(p for p in miss if "+" in p)
    assert len(merged) == 4 * 3 and miss["model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"].dtype == mx.uint32
    assert not any(p.endswith((".q_proj.scales", ".up_proj.weight")) for p in miss), "the parts are merged away"
    assert all(mx.array_equal(hit[p], miss[p]).item() for p in miss)
    assert not any("+" in p for p in mx.load(str(next(tmp_path.rglob(CONSTANTS)))))

    with torch.no_grad():  # the reference holds each weight as the step reads it: quantized, then dequantized
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                q = quantize_weight(mx.array(module.weight.detach().numpy()), spec)
                w = mx.dequantize(q.wq, q.scales, q.biases, group_size=32, bits=4)
                module.weight.copy_(torch.from_numpy(np.array(w)))
    layout = CacheLayout(len(layers), layers[0].num_kv_heads, layers[0].head_dim, 16, mx.float32)
    tokens = torch.randint(0, 256, (43,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(tokens[None]).logits[0, 39:].numpy()
    got = lowered_logits_along(LoweredModel(load_step(source), hit, layout, num_blocks=8), tokens.tolist(), 40)
    err, top = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    assert err <= 1e-4 * top, f"max abs error {err:.3g} > 1e-4 x max|logit| {top:.3g}"
