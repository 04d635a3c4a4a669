"""Quantized weights through the compiler and the plugin's loading path, one tiny Llama per source: GGUF (Q4_0,
Q4_1, Q8_0), an MLX-format checkpoint, AWQ, GPTQ, and a full-precision checkpoint quantized on the fly.

Each goes the serving path: vLLM's torch model built under this platform (dummy weights: the platform sees a
quantized checkpoint), the checkpoint loaded into MLX by the model's parameter paths
(vllm_metal_plugin.checkpoints.checkpoint_sources), captured, lowered with the quantize pass, and run. The
reference is transformers in float32 holding the same weights dequantized: logits of a prefill and decode
steps within 1e-4 x max |logit|, greedy tokens identical on 8 prompts."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from transformers import LlamaConfig, LlamaForCausalLM
from weights_writers import AWQ_ORDER, TINY_LLAMA, pack_along_cols, pack_along_rows, tiny_llama_gguf

from lowering.api import cache_layout, lower_cached
from lowering.capture import capture_vllm
from lowering.compile import load_step
from lowering.driver import Driver
from lowering.vllm_build import build_vllm_model
from runtime.config import QuantizeSpec
from runtime.model import LoweredModel
from vllm_metal_plugin.checkpoints import checkpoint_sources
from weights import load
from weights.model_dir import gguf_model_dir

REL = 1e-4
GROUP = 128
PROMPTS = [[(7 * i + 13 * j) % TINY_LLAMA["vocab_size"] for j in range(5 + 3 * i)] for i in range(8)]


def _config(**extra) -> dict:
    c = TINY_LLAMA
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c["hidden_size"],
            "intermediate_size": c["intermediate_size"], "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"],
            "vocab_size": c["vocab_size"], "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "max_position_embeddings": 2048, "rope_theta": 10000.0, "dtype": "float32", **extra}


def _random_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_config())).eval()
    for name, p in model.named_parameters():
        p.data = (1 + 0.1 * torch.randn_like(p)) if "norm" in name else 0.05 * torch.randn_like(p)
    return model


def _linears(model) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _reference(state: dict[str, np.ndarray]) -> LlamaForCausalLM:
    """transformers in float32 holding `state` (Hugging Face paths -> float arrays)."""
    model = LlamaForCausalLM(LlamaConfig(**_config())).eval()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=True)
    return model


def _write(directory, tensors: dict[str, mx.array], config: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(directory / "model.safetensors"), tensors)
    return directory


# -- the sources: (model directory, dequantized Hugging Face state) ------------------------------------------
def gguf_source(tmp_path, smollm2_path, qtype):
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", np.random.default_rng(1), qtype=qtype)
    state = {k: np.array(v.dequantize(mx.float32) if hasattr(v, "dequantize") else v.astype(mx.float32))
             for k, v in load(path).tensors.items()}
    return gguf_model_dir(path, tokenizer=smollm2_path), state


def mlx_source(tmp_path, bits):
    model = _random_model()
    tensors, state = {}, {}
    for name, p in model.state_dict().items():
        if name in _linears(model):
            wq, s, b = mx.quantize(mx.array(p.numpy()), group_size=GROUP, bits=bits)
            base = name.removesuffix(".weight")
            tensors |= {name: wq, f"{base}.scales": s, f"{base}.biases": b}
            state[name] = np.array(mx.dequantize(wq, s, b, group_size=GROUP, bits=bits))
        else:
            tensors[name], state[name] = mx.array(p.numpy()), p.numpy()
    return _write(tmp_path / "mlx", tensors, _config(quantization={"group_size": GROUP, "bits": bits})), state


def _codes(rng, n, k, zero_offset=0):
    """Random 4-bit codes [K, N], float16 scales and integer zeros [K / GROUP, N] (GPTQ's original format stores
    zero - 1 in 4 bits: its zeros run 1..16)."""
    q = rng.integers(0, 16, (k, n), dtype=np.uint8)
    s = rng.uniform(0.002, 0.01, (k // GROUP, n)).astype(np.float16)
    z = rng.integers(zero_offset, 16 + zero_offset, (k // GROUP, n))
    w = (q.astype(np.float64) - np.repeat(z, GROUP, axis=0)) * np.repeat(s.astype(np.float64), GROUP, axis=0)
    return q, s, z, w.T.astype(np.float32)  # w as [N, K]


def awq_gptq_source(tmp_path, method):
    rng = np.random.default_rng(2)
    model = _random_model()
    tensors, state = {}, {}
    for name, p in model.state_dict().items():
        if name not in _linears(model):
            tensors[name], state[name] = mx.array(p.numpy()), p.numpy()
            continue
        base = name.removesuffix(".weight")
        q, s, z, w = _codes(rng, *p.shape, zero_offset=int(method == "gptq"))
        state[name] = w
        if method == "awq":
            tensors |= {f"{base}.qweight": mx.array(pack_along_cols(q, 4, AWQ_ORDER)),
                        f"{base}.qzeros": mx.array(pack_along_cols(z.astype(np.uint8), 4, AWQ_ORDER)),
                        f"{base}.scales": mx.array(s)}
        else:  # GPTQ (v1): zeros stored as zero - 1
            tensors |= {f"{base}.qweight": mx.array(pack_along_rows(q, 4)),
                        f"{base}.qzeros": mx.array(pack_along_cols(((z - 1) & 15).astype(np.uint8), 4)),
                        f"{base}.scales": mx.array(s),
                        f"{base}.g_idx": mx.array((np.arange(p.shape[1]) // GROUP).astype(np.int32))}
    qc = {"quant_method": method, "bits": 4, "group_size": GROUP}
    qc |= {"zero_point": True, "version": "gemm"} if method == "awq" else {"sym": False, "desc_act": False}
    return _write(tmp_path / method, tensors, _config(quantization_config=qc)), state


def on_the_fly_source(tmp_path, bits):
    model = _random_model()
    state = {}
    for name, p in model.state_dict().items():
        state[name] = p.numpy()
        if name in _linears(model) or name == "model.embed_tokens.weight":
            wq, s, b = mx.quantize(mx.array(p.numpy()), group_size=64, bits=bits)
            state[name] = np.array(mx.dequantize(wq, s, b, group_size=64, bits=bits))
    tensors = {k: mx.array(v.numpy()) for k, v in model.state_dict().items()}
    return _write(tmp_path / "full", tensors, _config()), state


# -- the serving path --------------------------------------------------------------------------------------
def _lowered(model_dir, tmp_path, quantize=None) -> tuple[LoweredModel, dict]:
    model, config = build_vllm_model(str(model_dir), dtype="float32", max_model_len=256)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    sources, fmt = checkpoint_sources(model, str(model_dir))
    assert (fmt is None) == (quantize is not None), fmt
    source, weights, layers, info = lower_cached({"test": str(model_dir), "quantize": str(quantize)},
                                                 lambda: capture_vllm(model, config), state, sources=sources,
                                                 quantize=quantize)
    program_passes = {r.name: r for r in info["passes"]}
    assert program_passes["quantize"].matched > 0 and not program_passes["quantize"].missed, program_passes["quantize"]
    kv = [layer for layer in layers][0]
    layout = cache_layout.__globals__["CacheLayout"](len(layers), kv.num_kv_heads, kv.head_dim, 16, mx.float32)
    return LoweredModel(load_step(source), weights, layout, num_blocks=64), {"source": source, "format": fmt}


def _check(model_dir, state, tmp_path, quantize=None):
    lowered, info = _lowered(model_dir, tmp_path, quantize)
    assert "k.quantized_linear(" in info["source"]
    reference = _reference(state)
    tokens = PROMPTS[-1] + [3, 1, 4, 1]
    with torch.no_grad():
        want = reference(torch.tensor([tokens])).logits[0, len(PROMPTS[-1]) - 1:].numpy()
    driver = Driver(lowered)
    driver.add(0, tokens)
    got = np.stack([np.array(driver.step({0: len(PROMPTS[-1])})[0])] +
                   [np.array(driver.step({0: 1})[0]) for _ in range(4)])
    driver.release(0)
    err, top = float(np.abs(got - want).max()), float(np.abs(want).max())
    assert err <= REL * top, f"{info['format'] or quantize}: max abs error {err:.3g} > {REL} x max |logit| {top:.3g}"
    greedy = driver.generate({i: p for i, p in enumerate(PROMPTS)}, max_new=6)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
            assert greedy[i] == out, f"prompt {i}: ours {greedy[i]}, transformers {out}"


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_gguf(tmp_path, smollm2_path, qtype):
    _check(*gguf_source(tmp_path, smollm2_path, qtype), tmp_path)


def test_mlx_format(tmp_path):
    _check(*mlx_source(tmp_path, 4), tmp_path)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_awq_gptq(tmp_path, method):
    _check(*awq_gptq_source(tmp_path, method), tmp_path)


@pytest.mark.parametrize("bits", [4, 8])
def test_on_the_fly(tmp_path, bits):
    _check(*on_the_fly_source(tmp_path, bits), tmp_path, quantize=QuantizeSpec(bits, 64))
