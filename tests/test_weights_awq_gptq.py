"""AWQ and GPTQ checkpoints -> MLX affine, exactly: against a float64 NumPy dequantization from the
formats' documented layouts, vLLM's own packers and reference dequantization, and mlx-lm's AWQ converter."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from weights_writers import AWQ_ORDER, hf_llama_config, pack_along_cols, pack_along_rows, write_checkpoint

import weights
from weights.awq_gptq import AWQGPTQCheckpoint

K, N = 512, 96
MODULE = "model.layers.0.mlp.down_proj"


def case(rng, bits=4, group=128, zeros="random", offset=0):
    """Codes q [K, N], f16 scales [K/g, N], integer zeros [K/g, N] (the real zero). GPTQ's original
    format stores `zero - 1` in `bits` bits, so its zeros run 1 .. 2**bits instead of 0 .. 2**bits - 1."""
    g = K if group == -1 else group
    q = rng.integers(0, 1 << bits, (K, N), dtype=np.uint8)
    s = rng.uniform(0.001, 0.02, (K // g, N)).astype(np.float16)
    if zeros == "random":
        z = rng.integers(offset, (1 << bits) + offset, (K // g, N))
    else:
        z = np.full((K // g, N), 1 << (bits - 1))
    return q, s, z.astype(np.int64)


def reference(q, s, z, group):
    """float64 `(q - z) * s`, from the spec, as [N, K] (MLX orientation)."""
    g = K if group == -1 else group
    w = (q.astype(np.float64) - np.repeat(z, g, axis=0)) * np.repeat(s.astype(np.float64), g, axis=0)
    return w.T


def write(tmp_path, tensors, qc, name="ckpt"):
    extra = {"model.norm.weight": mx.ones((K,)), "model.embed_tokens.weight": mx.ones((16, K), dtype=mx.float16)}
    return write_checkpoint(tmp_path / name, {**tensors, **extra}, hf_llama_config(quantization_config=qc))


def gptq_tensors(q, s, z, bits, group, offset=1, g_idx=None):
    t = {
        f"{MODULE}.qweight": mx.array(pack_along_rows(q, bits)),
        f"{MODULE}.qzeros": mx.array(pack_along_cols((z - offset).astype(np.uint8) & ((1 << bits) - 1), bits)),
        f"{MODULE}.scales": mx.array(s),
    }
    g = K if group == -1 else group
    t[f"{MODULE}.g_idx"] = mx.array((np.arange(K) // g if g_idx is None else g_idx).astype(np.int32))
    return t


def awq_tensors(q, s, z):
    return {
        f"{MODULE}.qweight": mx.array(pack_along_cols(q, 4, AWQ_ORDER)),
        f"{MODULE}.qzeros": mx.array(pack_along_cols(z.astype(np.uint8), 4, AWQ_ORDER)),
        f"{MODULE}.scales": mx.array(s),
    }


def load_one(path):
    loaded = weights.load(path)
    qw = loaded.tensors[f"{MODULE}.weight"]
    assert isinstance(qw, weights.QuantizedWeight)
    assert loaded.tensors["model.norm.weight"].dtype == mx.float32  # the rest passes through
    assert loaded.tensors["model.embed_tokens.weight"].dtype == mx.float16
    return loaded, qw


def assert_exact(qw, want):
    got = np.array(qw.dequantize(mx.float32))
    assert got.shape == want.shape
    err = np.abs(got.astype(np.float64) - want)
    assert err.max() == 0.0, f"max abs err {err.max()} at {np.unravel_index(err.argmax(), err.shape)}"


@pytest.mark.parametrize("group", [32, 64, 128, 256, -1])
def test_gptq_asymmetric_exact(tmp_path, group):
    rng = np.random.default_rng(group % 1000)
    q, s, z = case(rng, group=group, offset=1)
    assert z.max() == 16  # the top zero only the original format can store
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": False}
    loaded, qw = load_one(write(tmp_path, gptq_tensors(q, s, z, 4, group), qc))
    assert loaded.format == "gptq"
    assert (qw.bits, qw.shape) == (4, (N, K))
    assert qw.group_size == (128 if group in (256, -1) else group)  # longer groups: MLX 128, repeated
    assert_exact(qw, reference(q, s, z, group))


def test_gptq_v2_stores_the_zero_itself(tmp_path):
    rng = np.random.default_rng(1)
    q, s, z = case(rng)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False, "checkpoint_format": "gptq_v2"}
    _, qw = load_one(write(tmp_path, gptq_tensors(q, s, z, 4, 128, offset=0), qc))
    assert_exact(qw, reference(q, s, z, 128))


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_symmetric_uses_the_midpoint_zero(tmp_path, bits):
    rng = np.random.default_rng(bits)
    q, s, z = case(rng, bits=bits, group=64, zeros="mid")
    qc = {"quant_method": "gptq", "bits": bits, "group_size": 64, "desc_act": False, "sym": True}
    _, qw = load_one(write(tmp_path, gptq_tensors(q, s, z, bits, 64), qc))
    assert qw.bits == bits
    assert_exact(qw, reference(q, s, z, 64))


def test_gptq_matches_vllm_packing_and_reference_dequantization(tmp_path):
    """vLLM's own `gptq_quantize_weights` + `gptq_pack` make the checkpoint; its `w_ref` is the answer."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import gptq_pack, gptq_quantize_weights
    from vllm.scalar_type import scalar_types

    torch.manual_seed(0)
    w = (torch.randn(K, N) * 0.02).to(torch.float16)
    w_ref, w_q, w_s = gptq_quantize_weights(w, scalar_types.uint4b8, 128)
    packed = gptq_pack(w_q, 4, K, N).numpy()
    assert np.array_equal(packed, pack_along_rows(w_q.numpy().astype(np.uint8), 4))  # our writer agrees
    t = {
        f"{MODULE}.qweight": mx.array(packed),
        f"{MODULE}.qzeros": mx.array(pack_along_cols(np.full((K // 128, N), 7, np.uint8), 4)),
        f"{MODULE}.scales": mx.array(w_s.numpy()),
    }
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    _, qw = load_one(write(tmp_path, t, qc))
    got = np.array(qw.dequantize(mx.float32)).astype(np.float16)  # vLLM's reference is computed in f16
    assert np.array_equal(got, w_ref.numpy().T), np.abs(got.astype(np.float32) - w_ref.numpy().T).max()


def test_awq_exact_and_nibble_order(tmp_path):
    rng = np.random.default_rng(2)
    q, s, z = case(rng)
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    loaded, qw = load_one(write(tmp_path, awq_tensors(q, s, z), qc))
    assert loaded.format == "awq"
    assert_exact(qw, reference(q, s, z, 128))


def test_awq_matches_vllm_packing_and_reference_dequantization(tmp_path):
    from vllm.model_executor.layers.quantization.utils.quant_utils import awq_pack, quantize_weights
    from vllm.scalar_type import scalar_types

    torch.manual_seed(1)
    w = (torch.randn(K, N) * 0.02).to(torch.float16)
    w_ref, w_q, w_s, w_zp = quantize_weights(w, scalar_types.uint4, 64, zero_points=True)
    qweight = awq_pack(w_q, 4, K, N).numpy()
    qzeros = awq_pack(w_zp, 4, K // 64, N).numpy()
    assert np.array_equal(qweight, pack_along_cols(w_q.numpy().astype(np.uint8), 4, AWQ_ORDER))
    t = {f"{MODULE}.qweight": mx.array(qweight), f"{MODULE}.qzeros": mx.array(qzeros),
         f"{MODULE}.scales": mx.array(w_s.numpy())}  # fmt: skip
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    _, qw = load_one(write(tmp_path, t, qc))
    got = np.array(qw.dequantize(mx.float32)).astype(np.float16)
    assert np.array_equal(got, w_ref.numpy().T), np.abs(got.astype(np.float32) - w_ref.numpy().T).max()


def test_awq_matches_mlx_lm_converter(tmp_path):
    """mlx-lm's own AWQ transform gives the same codes and scales (it rounds biases to the scale dtype)."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    rng = np.random.default_rng(3)
    q, s, z = case(rng)
    tensors = awq_tensors(q, s, z)
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    _, qw = load_one(write(tmp_path, tensors, qc))
    theirs, _ = mlx_lm_utils._transform_awq_weights(dict(tensors), qc)
    assert np.array_equal(np.array(qw.wq), np.array(theirs[f"{MODULE}.weight"]))
    assert np.array_equal(np.array(qw.scales), np.array(theirs[f"{MODULE}.scales"].astype(mx.float32)))
    assert np.array_equal(np.array(qw.biases.astype(mx.float16)), np.array(theirs[f"{MODULE}.biases"]))


def test_awq_without_zero_point(tmp_path):
    rng = np.random.default_rng(4)
    q, s, z = case(rng, zeros="mid")
    t = awq_tensors(q, s, z)
    del t[f"{MODULE}.qzeros"]
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}
    _, qw = load_one(write(tmp_path, t, qc))
    assert_exact(qw, reference(q, s, z, 128))


def test_gptq_act_order_is_refused_naming_the_tensor(tmp_path):
    rng = np.random.default_rng(5)
    q, s, z = case(rng, offset=1)
    g_idx = rng.permutation(np.arange(K) // 128)  # act-order: groups scattered over the inputs
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False}
    path = write(tmp_path, gptq_tensors(q, s, z, 4, 128, g_idx=g_idx), qc)
    with pytest.raises(weights.UnsupportedQuantizationError) as e:
        weights.load(path)
    msg = str(e.value)
    assert f"{MODULE}.g_idx" in msg and "act-order" in msg and "desc_act=false" in msg and "\n" not in msg


def test_legacy_quantize_config_json(tmp_path):
    """AutoGPTQ's separate quantize_config.json (no quant_method) is read as GPTQ."""
    rng = np.random.default_rng(6)
    q, s, z = case(rng, offset=1)
    path = write(tmp_path, gptq_tensors(q, s, z, 4, 128), None)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "sym": False}))
    _, qw = load_one(path)
    assert_exact(qw, reference(q, s, z, 128))


def test_unsupported_methods_and_widths_are_refused(tmp_path):
    rng = np.random.default_rng(7)
    q, s, z = case(rng)
    with pytest.raises(weights.UnsupportedQuantizationError, match="'fp8' has no MLX conversion; supported: awq"):
        weights.load(write(tmp_path, {}, {"quant_method": "fp8"}, "fp8"))
    with pytest.raises(weights.UnsupportedQuantizationError, match="AWQ 8-bit"):
        AWQGPTQCheckpoint(write(tmp_path, awq_tensors(q, s, z), {"quant_method": "awq", "bits": 8}, "awq8"))
    with pytest.raises(weights.UnsupportedQuantizationError, match="group size 16"):
        qc = {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": False}
        q16, s16, z16 = case(rng, group=16)
        weights.load(write(tmp_path, gptq_tensors(q16, s16, z16, 4, 16), qc, "g16"))
