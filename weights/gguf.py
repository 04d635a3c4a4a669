"""GGUF files (llama.cpp) -> Hugging Face module paths -> MLX arrays and QuantizedWeight, one tensor at a time.

The file is memory-mapped (`gguf.GGUFReader`); each tensor is converted from its mapped bytes and
handed out before the next is touched. How each ggml type arrives (docs/weights.md has the table):
- exact (`gguf_blocks.EXACT`): Q4_0, Q4_1, Q8_0, Q4_K at 4/8 bits and Q5_0, Q5_1, Q5_K at 5 bits
  become MLX affine groups of 32 whose dequantized values equal `gguf.quants.dequantize` bit for bit;
- re-quantized (`REQUANTIZED`): the other types gguf can dequantize (Q2_K, Q3_K, Q6_K, the IQ and
  TQ types, MXFP4, NVFP4), and exact types whose bit width the caller's kernels lack, are dequantized
  a slab of rows at a time and quantized round-to-nearest over each group's [min, max] (group 32,
  float32 scales: every value moves by at most half a step) to the narrowest allowed width at least
  as wide as the source's; this is lossy and logged;
- F32, F16 and BF16 pass through; any other type is refused, naming the tensor.
The config is read from the GGUF metadata the way transformers reads it; llama's q/k rows are put
back in Hugging Face order (llama.cpp permutes them for its RoPE; a row permutation keeps every
quantization group intact).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T

from weights import gguf_blocks
from weights.errors import DamagedFileError, UnsupportedQuantizationError, WeightsError
from weights.quantize import quantize_minmax
from weights.quantized import QuantizedWeight, from_numpy

PASSTHROUGH = (T.F32, T.F16, T.BF16)
# ggml type -> its nominal bits per weight (what "nearest MLX width" is measured against)
REQUANTIZED = {
    T.Q2_K: 2, T.Q3_K: 3, T.Q6_K: 6,
    T.IQ1_S: 1, T.IQ1_M: 1, T.IQ2_XXS: 2, T.IQ2_XS: 2, T.IQ2_S: 2, T.IQ3_XXS: 3, T.IQ3_S: 3,
    T.IQ4_NL: 4, T.IQ4_XS: 4, T.TQ1_0: 2, T.TQ2_0: 2, T.MXFP4: 4, T.NVFP4: 4,
}  # fmt: skip
REQUANT_GROUP = 32
SUPPORTED = (*PASSTHROUGH, *gguf_blocks.EXACT, *REQUANTIZED)
SLAB_BYTES = 16 << 20  # float32 bytes of one dequantized slab while re-quantizing

# llama.cpp tensor names -> Hugging Face module paths (the llama-style decoder layout)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_NAME = re.compile(r"(\w+)\.(weight|bias)")
_ROPE_PERMUTED = ("llama",)  # llama.cpp's convert_hf_to_gguf permutes q/k rows for these


def module_path(name: str) -> str | None:
    """The Hugging Face parameter path of a GGUF tensor name (None if the layout has none)."""
    if m := _BLOCK_NAME.fullmatch(name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_BLOCK[part]}.{kind}" if part in _BLOCK else None
    if m := _TOP_NAME.fullmatch(name):
        part, kind = m.groups()
        return f"{_TOP[part]}.{kind}" if part in _TOP else None
    return None


def open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """A memory-mapped reader, or a one-line error naming the file when it is not a whole GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as exc:
        raise DamagedFileError(
            f"{path}: not a readable GGUF file, it is truncated or damaged ({exc}); download or copy it again"
        ) from None


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_from_metadata(reader: gguf.GGUFReader, path: str | os.PathLike = "") -> dict:
    """A Hugging Face config.json dict read from the GGUF metadata (llama, qwen2, qwen3)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise WeightsError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = get("attention.head_count")
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
    }
    head_dim = get("attention.key_length", get("rope.dimension_count") if arch == "llama" else None)
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    vocab = get("vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    cfg["vocab_size"] = vocab
    names = {t.name for t in reader.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[hf] = value
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": get("rope.scaling.factor")}
        if (orig := get("rope.scaling.original_context_length")) is not None:
            cfg["rope_scaling"]["original_max_position_embeddings"] = orig
    missing = [k for k, v in cfg.items() if v is None]
    if missing:
        raise WeightsError(f"{path}: GGUF metadata lacks {', '.join(missing)} for architecture {arch}")
    return cfg


def _rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: hf[i] = gguf[index[i]] (as transformers does)."""
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(n_rows)


def target_bits(source_bits: int, allowed: tuple[int, ...]) -> int:
    """The narrowest allowed width holding `source_bits` (the widest allowed one if none does)."""
    wide = [b for b in sorted(allowed) if b >= source_bits]
    return wide[0] if wide else max(allowed)


def plan(qtype: T, allowed: tuple[int, ...]) -> tuple[str, int]:
    """How a ggml type arrives: ("exact" | "requantized" | "passthrough", MLX bits or 0)."""
    if qtype in PASSTHROUGH:
        return "passthrough", 0
    if qtype in gguf_blocks.EXACT:
        bits = gguf_blocks.EXACT[qtype][1]
        if bits in allowed:
            return "exact", bits
        return "requantized", target_bits(bits, allowed)
    if qtype in REQUANTIZED:
        return "requantized", target_bits(REQUANTIZED[qtype], allowed)
    raise KeyError(qtype)


class GGUFFile:
    """One GGUF checkpoint: `config` (Hugging Face dict) and `tensors()` (module path, tensor) pairs."""

    def __init__(self, path: str | os.PathLike, bits: tuple[int, ...] = (4, 8), slab_bytes: int = SLAB_BYTES):
        """`bits`: the MLX widths exact types may keep (others are re-quantized to one of them);
        `slab_bytes`: float32 bytes dequantized at a time while re-quantizing."""
        self.path = Path(path)
        self.bits = tuple(bits)
        self.slab_bytes = slab_bytes
        self.reader = open_reader(self.path)
        self.config = config_from_metadata(self.reader, self.path)
        self.arch = self.config["model_type"]
        self._check()
        self.conversions = self._describe()

    def _check(self) -> None:
        supported = ", ".join(t.name for t in SUPPORTED)
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.tensor_type not in SUPPORTED:
                raise UnsupportedQuantizationError(
                    f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which has no MLX conversion; "
                    f"supported: {supported}"
                )
            if module_path(t.name) is None:
                raise WeightsError(
                    f"{self.path}: tensor {t.name!r} has no Hugging Face module path in the {self.arch} layout "
                    f"(known: {', '.join([*_TOP, *('blk.N.' + k for k in _BLOCK)])})"
                )
            if t.data_offset + t.n_bytes > size:
                raise DamagedFileError(f"{self.path}: truncated, tensor {t.name!r} ends past the end of the file")

    def _describe(self) -> list[str]:
        """One line per ggml type present: how its tensors arrive (logged at load)."""
        lines = []
        for qtype, n in sorted(Counter(t.tensor_type for t in self.reader.tensors).items()):
            how, bits = plan(qtype, self.bits)
            if how == "exact":
                lines.append(f"{qtype.name}: {n} tensors mapped exactly onto MLX affine {bits}-bit group 32")
            elif how == "requantized":
                lines.append(
                    f"{qtype.name}: {n} tensors dequantized and re-quantized to MLX affine {bits}-bit group "
                    f"{REQUANT_GROUP} (not exact)"
                )
            else:
                lines.append(f"{qtype.name}: {n} tensors kept in {qtype.name}")
        return lines

    def tensors(self) -> Iterator[tuple[str, mx.array | QuantizedWeight]]:
        """(module path, tensor) for every tensor, each converted (and evaluated) before the next is read."""
        for t in self.reader.tensors:
            out = self._convert(t)
            mx.eval(*((out.wq, out.scales, out.biases) if isinstance(out, QuantizedWeight) else (out,)))
            yield module_path(t.name), out

    def _rope_heads(self, name: str) -> int | None:
        """The head count whose q/k row permutation llama.cpp applied to this tensor, or None."""
        if self.arch not in _ROPE_PERMUTED:
            return None
        part = name.split(".")[2] if name.startswith("blk.") else ""
        if part == "attn_q":
            return self.config["num_attention_heads"]
        if part == "attn_k":
            return self.config["num_key_value_heads"]
        return None

    def _convert(self, t) -> mx.array | QuantizedWeight:
        data = t.data  # memory-mapped: nothing is read until used
        n_head = self._rope_heads(t.name)
        how, bits = plan(t.tensor_type, self.bits)
        if how == "passthrough":
            if t.tensor_type == T.BF16:
                arr = mx.array(np.ascontiguousarray(data).view(np.uint16)).view(mx.bfloat16)
            else:
                arr = mx.array(np.ascontiguousarray(data))
            if n_head is not None:
                arr = arr[mx.array(_rope_rows(arr.shape[0], n_head))]
            return arr
        if how == "exact":
            q, scales, biases = gguf_blocks.decode(data, t.tensor_type)
            out = from_numpy(q, scales, biases, bits, gguf_blocks.GROUP)
        else:
            out = self._requantize(t, bits)
        if n_head is not None:
            out = out.take_rows(_rope_rows(out.shape[-2], n_head))
        return out

    def _requantize(self, t, bits: int) -> QuantizedWeight:
        """Dequantize a slab of rows at a time and quantize it: never a float copy of the whole tensor."""
        rows = t.data.reshape(-1, t.data.shape[-1])
        k = int(t.shape[0])
        step = max(1, self.slab_bytes // (4 * k))
        parts = []
        for r in range(0, rows.shape[0], step):
            w = gguf.quants.dequantize(np.asarray(rows[r : r + step]), t.tensor_type)
            parts.append(quantize_minmax(mx.array(w), bits, REQUANT_GROUP))
            del w
            mx.eval(parts[-1].wq, parts[-1].scales, parts[-1].biases)
        lead = tuple(int(d) for d in reversed(t.shape[1:]))
        wq, scales, biases = (
            mx.concatenate([getattr(p, a) for p in parts]).reshape(*lead, -1) for a in ("wq", "scales", "biases")
        )
        return QuantizedWeight(wq, scales, biases, bits, REQUANT_GROUP)


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
