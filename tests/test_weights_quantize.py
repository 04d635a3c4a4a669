"""On-the-fly quantization: the VLLM_METAL_QUANTIZE spec, which weights it takes, and one float tensor at a time."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from weights_writers import TINY_LLAMA, tiny_llama_gguf, write_checkpoint

import weights
from weights.quantize import ACCEPTED, parse_quantize_spec, should_quantize, spec_from_env


@pytest.mark.parametrize(
    "value,bits,group",
    [("q4", 4, 64), ("q8", 8, 64), ("q4:32", 4, 32), ("Q8:128", 8, 128), (" q4:64 ", 4, 64)],
)
def test_spec_parses(value, bits, group):
    assert parse_quantize_spec(value) == weights.QuantizeSpec(bits, group)


@pytest.mark.parametrize("value", [None, "", "none"])
def test_spec_off(value):
    assert parse_quantize_spec(value) is None


@pytest.mark.parametrize("value", ["q3", "q4:16", "q4:256", "int4", "q4:", "q8:64:1", "4"])
def test_spec_refuses_with_the_accepted_list(value):
    with pytest.raises(weights.QuantizeSpecError) as e:
        parse_quantize_spec(value)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    assert msg == f"VLLM_METAL_QUANTIZE={value!r} is invalid; accepted: {ACCEPTED} (or unset/none for full precision)"
    assert "q4, q8, q4:32, q4:64, q4:128, q8:32, q8:64, q8:128" in msg


def test_spec_from_env():
    assert spec_from_env({"VLLM_METAL_QUANTIZE": "q8:32"}) == weights.QuantizeSpec(8, 32)
    assert spec_from_env({}) is None


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A real transformers checkpoint (tied embeddings, float32 safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    linears = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    return path, linears


@pytest.mark.parametrize("spec", ["q4", "q8:32"])
def test_linears_and_tied_embedding_quantized_norms_kept(hf_checkpoint, spec):
    path, _ = hf_checkpoint
    spec = parse_quantize_spec(spec)
    full = weights.load(path)
    loaded = weights.load(path, quantize=spec)
    assert loaded.format == "safetensors" and full.format == "safetensors"
    assert "lm_head.weight" not in loaded.tensors  # tied: the LM head reads the quantized embedding
    assert any(f"{len(loaded.quantized)} full-precision weights" in line for line in loaded.conversions)
    for name, t in loaded.tensors.items():
        w = full.tensors[name]
        if name.endswith("norm.weight"):
            assert isinstance(t, mx.array) and np.array_equal(np.array(t), np.array(w))
            continue
        assert isinstance(t, weights.QuantizedWeight), name
        assert (t.bits, t.group_size, t.shape) == (spec.bits, spec.group_size, tuple(w.shape))
        wq, s, b = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
        assert np.array_equal(np.array(t.wq), np.array(wq)) and np.array_equal(np.array(t.scales), np.array(s))
        assert np.array_equal(np.array(t.biases), np.array(b))
    assert len(loaded.quantized) == 1 + 7 * TINY_LLAMA["num_hidden_layers"]


def test_linear_paths_from_the_model_decide(hf_checkpoint):
    path, linears = hf_checkpoint
    spec = weights.QuantizeSpec(4, 64)
    by_name = weights.load(path, quantize=spec)
    by_module = weights.load(path, quantize=spec, linear_paths=linears)
    assert set(by_name.quantized) == set(by_module.quantized)
    only_mlp = {m for m in linears if ".mlp." in m}
    some = weights.load(path, quantize=spec, linear_paths=only_mlp)
    assert {n[: -len(".weight")] for n in some.quantized} == only_mlp


def test_should_quantize_rules():
    assert should_quantize("model.layers.0.mlp.up_proj.weight", (512, 256), 64)
    assert not should_quantize("model.layers.0.mlp.up_proj.bias", (512,), 64)
    assert not should_quantize("model.norm.weight", (256,), 64)
    assert not should_quantize("model.layers.0.self_attn.q_norm.weight", (64, 64), 64)  # 2-D, still a norm
    assert not should_quantize("model.layers.0.mlp.up_proj.weight", (512, 96), 64)  # K not a multiple
    assert not should_quantize("model.tiny.weight", (16, 64), 64)  # too small to pay
    assert should_quantize("model.tiny.weight", (16, 64), 64, linear_paths={"model.tiny"})


def test_float_gguf_tensors_quantized_on_request(tmp_path):
    rng = np.random.default_rng(0)
    path = tiny_llama_gguf(tmp_path / "f16.gguf", rng, qtype=T.F16)
    loaded = weights.load(path, quantize=weights.QuantizeSpec(8, 32))
    assert len(loaded.quantized) == 2 + 7 * TINY_LLAMA["num_hidden_layers"]
    assert all(t.bits == 8 for t in loaded.quantized.values())


def test_quantizing_never_holds_two_float_tensors(tmp_path):
    """Loading eight 8 MiB float32 weights with q4: MLX's peak beyond what the result keeps stays under
    one tensor's size (the lazily read float tensor is freed once its quantized form exists)."""
    n, k = 1024, 2048
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": mx.random.normal((n, k)) for i in range(8)}
    mx.eval(tensors)
    path = write_checkpoint(tmp_path / "big", tensors, {"model_type": "llama"})
    del tensors
    one_tensor = n * k * 4
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    loaded = weights.load(path, quantize=weights.QuantizeSpec(4, 64))
    kept = mx.get_active_memory() - base
    transient = mx.get_peak_memory() - base - kept
    assert len(loaded.quantized) == 8
    assert kept < 8 * one_tensor / 5
    assert transient <= 1.01 * one_tensor, (transient, one_tensor)
