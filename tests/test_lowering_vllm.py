"""Lowering through the vLLM front end: vLLM builds its own model class with real weights in this
process (world size 1); the lowered MLX step must match the same checkpoint run eagerly in torch
(transformers), and hold exactly the fused ops the passes promise."""

import runtime  # noqa: F401

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lowering import capture
from lowering.api import build_model, lower
from lowering.vllm_build import build_vllm_model
from test_lowering_hf import check_against_eager


def tiny_llama_dir(path, dtype=torch.float32, seed=0, layers=2):
    """A tiny random Llama checkpoint directory (head_dim 32: vLLM's attention needs >= 32)."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(cfg).to(dtype)
    for p in model.parameters():  # norms at 1 +- noise, so the test sees their weights
        if p.dim() == 1:
            p.data = 1 + 0.1 * torch.randn_like(p)
    cfg.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_tiny_llama_matches_eager(tiny_dir, dtype, rel):
    model, config = build_vllm_model(str(tiny_dir), dtype=dtype, max_model_len=512)
    lowered = lower(capture.capture_vllm(model, config))
    assert not any(r.missed for r in lowered.passes), lowered.passes
    runtime_model = build_model(lowered, num_blocks=64, block_size=16)
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=getattr(torch, dtype)).eval()
    for n in (1, 7, 64):
        check_against_eager(reference, runtime_model, n, rel=rel)


@pytest.fixture(scope="module")
def smollm2_vllm(smollm2_path):
    model, config = build_vllm_model(str(smollm2_path), max_model_len=1024)
    return lower(capture.capture_vllm(model, config, name="SmolLM2-135M"))


def test_smollm2_fusions(smollm2_vllm):
    ops = smollm2_vllm.op_histogram()
    assert ops.get("mlx.rms_norm") == 1 and ops.get("mlx.add_rms_norm") == 60, ops  # vLLM's fused_add_rms_norm too
    assert ops.get("mlx.rope_paged_attention") == 30 and "mlx.rope" not in ops, ops  # 60 ropes folded in
    for leftover in ("pow.Tensor_Scalar", "rsqrt", "neg", "unified_attention_with_output", "empty.memory_format"):
        assert not any(leftover in op for op in ops), f"{leftover} survived: {ops}"
    assert [r.name for r in smollm2_vllm.passes if r.missed] == []
    src = smollm2_vllm.source
    assert src.count("= k.rms_norm(") == 1 and src.count("= k.add_rms_norm(") == 60 and "k.rope(" not in src
    assert src.count("= k.rope_paged_attention(") == 30 and "k.paged_attention(" not in src
    assert "w[\"model.layers.29.mlp.down_proj.weight.T\"]" in src


def test_step_reads_what_its_weights_table_lists(smollm2_vllm):
    """The emitted WEIGHTS table lists exactly the keys the step reads; `prepare` makes that dict once,
    each linear's matrix as its transposed view, and leaves out weights the step never reads."""
    import re

    import mlx.core as mx

    from lowering.api import mlx_weights
    from lowering.compile import load_step

    body, table = smollm2_vllm.source.split("\nWEIGHTS = {")
    step = load_step(smollm2_vllm.source, jit=False)
    read = set(re.findall(r'w\["([^"]+)"\]', body))
    assert read == set(step.weights) and re.findall(r'w\["[^"]+"\]\.T', body) == []
    path = "model.layers.29.mlp.down_proj.weight"
    assert step.weights[path + ".T"] == (path, True) and path not in step.weights
    weights = mlx_weights(smollm2_vllm.program)
    prepared = step.prepare(weights)
    assert set(prepared) == read and path in weights
    assert prepared[path + ".T"].shape == weights[path].shape[::-1]
    assert mx.array_equal(prepared[path + ".T"], weights[path].T).item()
    del weights[path], weights["model.norm.weight"]
    with pytest.raises(KeyError, match=r"reads 2 weight\(s\).*: model\.layers\.29\.mlp\.down_proj\.weight, model\.norm\.weight"):
        step.prepare(weights)


@pytest.mark.parametrize("prompt_len", [1, 7, 64])
def test_smollm2_matches_eager(smollm2_vllm, smollm2_path, prompt_len):
    reference = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    check_against_eager(reference, build_model(smollm2_vllm, num_blocks=32, block_size=16), prompt_len, decode_steps=2)


def test_lowering_cache_roundtrip(tiny_dir, tmp_path, monkeypatch):
    """A second start loads the verified artefact without capturing; a damaged one is rebuilt."""
    from lowering.api import lower_cached
    from lowering.compile import cache_dir, cache_key

    monkeypatch.setenv("VLLM_METAL_CACHE", str(tmp_path))
    model, config = build_vllm_model(str(tiny_dir), max_model_len=512)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    captures = []

    def counting_capture():
        captures.append(1)
        return capture.capture_vllm(model, config)

    identity = {"test": "cache roundtrip", "model": str(tiny_dir)}
    source, weights, layers, info = lower_cached(identity, counting_capture, state)
    assert info["cache"] == "miss" and len(captures) == 1 and len(layers) == 2
    source2, weights2, _, info2 = lower_cached(identity, counting_capture, state)
    assert info2["cache"] == "hit" and len(captures) == 1 and source2 == source and set(weights2) == set(weights)

    folder = cache_dir() / cache_key(identity)
    step = folder / "step.py"
    step.write_text(step.read_text().replace("k.rms_norm", "k.silu_mul", 1))  # altered
    _, _, _, info3 = lower_cached(identity, counting_capture, state)
    assert info3["cache"] == "miss" and len(captures) == 2, "an altered artefact must be rebuilt, not run"
    (folder / "constants.safetensors").write_bytes(b"truncated")
    _, _, _, info4 = lower_cached(identity, counting_capture, state)
    assert info4["cache"] == "miss" and len(captures) == 3, "a truncated artefact must be rebuilt"
