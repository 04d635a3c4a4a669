"""Small real weight files for the weights/ tests, written with the formats' own writers.

GGUF through `gguf.GGUFWriter` (+ `gguf.quants.quantize` where gguf has a quantizer; K-quant and IQ
blocks are random bytes with sane f16 scales, every such byte string being a valid block), MLX format
through `mx.quantize` + `mx.save_safetensors`, AWQ/GPTQ packed here from their documented layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T

# where each block keeps its f16 scale(s): (byte offset, ...) inside the block
_F16_FIELDS = {
    T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q2_K: (80, 82), T.Q3_K: (108,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.TQ2_0: (64,),
}  # fmt: skip

TINY_LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


def random_blocks(rng, rows: int, k: int, qtype: T) -> np.ndarray:
    """Random valid blocks of a type gguf cannot quantize to: uint8 [rows, bytes per row]."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows, k // block, size), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        d = rng.uniform(0.002, 0.05, size=(rows, k // block)).astype(np.float16)
        b[..., off : off + 2] = d.view(np.uint8).reshape(rows, k // block, 2)
    return b.reshape(rows, -1)


def encode(rng, w: np.ndarray, qtype: T) -> np.ndarray:
    """A float32 [N, K] weight in ggml type `qtype` (raw bytes for quantized types)."""
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype in _F16_FIELDS:
        return random_blocks(rng, w.shape[0], w.shape[1], qtype)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def write_gguf(path: Path, tensors: dict, arch: str = "llama", config: dict | None = None) -> Path:
    """`tensors`: gguf name -> (raw array as `encode` makes it, ggml type). Metadata from `config`."""
    c = {**TINY_LLAMA, **(config or {})}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(2048)
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_key_length(c["hidden_size"] // c["num_attention_heads"])
    w.add_value_length(c["hidden_size"] // c["num_attention_heads"])
    w.add_vocab_size(c["vocab_size"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, (data, qtype) in tensors.items():
        raw = None if qtype in (T.F32, T.F16) else qtype
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama_gguf(
    path: Path, rng, qtype: T = T.Q4_0, embed_type: T | None = None, tied=False, arch="llama"
) -> Path:
    """A 2-layer llama-style GGUF: linears in `qtype`, embedding in `embed_type`, norms F32; qwen2 adds
    q/k/v biases, qwen3 q/k norms."""
    c = TINY_LLAMA
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
              "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}  # fmt: skip
    t = {"token_embd.weight": (encode(rng, rng.normal(0, 0.05, (v, h)), embed_type or qtype), embed_type or qtype)}
    for i in range(c["num_hidden_layers"]):
        for part, shape in shapes.items():
            t[f"blk.{i}.{part}.weight"] = (encode(rng, rng.normal(0, 0.05, shape), qtype), qtype)
        for norm in ("attn_norm", "ffn_norm"):
            t[f"blk.{i}.{norm}.weight"] = (rng.uniform(0.5, 1.5, h).astype(np.float32), T.F32)
        if arch == "qwen2":
            for part, (n, _) in list(shapes.items())[:3]:
                t[f"blk.{i}.{part}.bias"] = (rng.normal(0, 0.1, n).astype(np.float32), T.F32)
        if arch == "qwen3":
            for norm in ("attn_q_norm", "attn_k_norm"):
                head_dim = h // c["num_attention_heads"]
                t[f"blk.{i}.{norm}.weight"] = (rng.uniform(0.5, 1.5, head_dim).astype(np.float32), T.F32)
    t["output_norm.weight"] = (rng.uniform(0.5, 1.5, h).astype(np.float32), T.F32)
    if not tied:
        t["output.weight"] = (encode(rng, rng.normal(0, 0.05, (v, h)), qtype), qtype)
    return write_gguf(path, t, arch=arch)


def write_checkpoint(directory: Path, tensors: dict[str, mx.array], config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(directory / "model.safetensors"), tensors)
    return directory


def hf_llama_config(**extra) -> dict:
    c = TINY_LLAMA
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["num_key_value_heads"],
        "vocab_size": c["vocab_size"],
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        **extra,
    }


def llama_linears() -> dict[str, tuple[int, int]]:
    """Module path -> (N, K) of every linear of the tiny llama."""
    c = TINY_LLAMA
    h, f = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out = {}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out |= {f"{p}.self_attn.q_proj": (h, h), f"{p}.self_attn.k_proj": (kv, h), f"{p}.self_attn.v_proj": (kv, h),
                f"{p}.self_attn.o_proj": (h, h), f"{p}.mlp.gate_proj": (f, h), f"{p}.mlp.up_proj": (f, h),
                f"{p}.mlp.down_proj": (h, f)}  # fmt: skip
    return out


# --- AWQ / GPTQ packing, from the formats' documented layouts ---------------------------------

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word nibble i holds column AWQ_ORDER[i] of each group of eight


def pack_along_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ qweight: uint codes [K, N] -> int32 [K*bits/32, N], code k % (32/bits) at bits * (k % (32/bits))."""
    per = 32 // bits
    k, n = q.shape
    words = np.zeros((k // per, n), dtype=np.uint32)
    for i in range(per):
        words |= q[i::per].astype(np.uint32) << np.uint32(bits * i)
    return words.view(np.int32)


def pack_along_cols(q: np.ndarray, bits: int, order=None) -> np.ndarray:
    """[R, C] codes -> int32 [R, C*bits/32]: word nibble i holds column order[i] of its group of 32/bits."""
    per = 32 // bits
    order = order or tuple(range(per))
    r, c = q.shape
    grouped = q.reshape(r, c // per, per).astype(np.uint32)
    words = np.zeros((r, c // per), dtype=np.uint32)
    for i in range(per):
        words |= grouped[..., order[i]] << np.uint32(bits * i)
    return words.view(np.int32)
