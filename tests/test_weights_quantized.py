"""The QuantizedWeight representation: packing as mx.quantize packs, checks, and the bytes report."""

import mlx.core as mx
import numpy as np
import pytest

import weights
from weights.quantized import BITS, QuantizedWeight, concat_rows, from_numpy, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", BITS)
def test_pack_codes_is_mlx_packing(bits):
    """Codes packed by pack_codes dequantize (scale 1, bias 0) to themselves, and round-trip."""
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (6, 256), dtype=np.uint8)
    wq = pack_codes(q, bits)
    assert wq.dtype == np.uint32 and wq.shape == (6, 256 * bits // 32)
    ones, zeros = mx.ones((6, 256 // 32)), mx.zeros((6, 256 // 32))
    got = mx.dequantize(mx.array(wq), ones, zeros, group_size=32, bits=bits)
    assert np.array_equal(np.array(got).astype(np.uint8), q)
    assert np.array_equal(unpack_codes(wq, bits), q)


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32), (5, 128), (3, 32)])
def test_matches_mx_quantize(bits, group):
    w = mx.random.normal((40, 512), key=mx.random.key(bits))
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    qw = QuantizedWeight(wq, s, b, bits, group)
    assert qw.shape == (40, 512)
    assert qw.nbytes == wq.nbytes + s.nbytes + b.nbytes
    assert np.array_equal(np.array(qw.dequantize()), np.array(mx.dequantize(wq, s, b, group_size=group, bits=bits)))
    q = unpack_codes(np.array(wq), bits)
    rebuilt = from_numpy(q, np.array(s), np.array(b), bits, group)
    assert np.array_equal(np.array(rebuilt.wq), np.array(wq))


def test_take_rows_reorders_exactly():
    w = mx.random.normal((16, 128), key=mx.random.key(0))
    qw = QuantizedWeight(*mx.quantize(w, group_size=32, bits=4), bits=4, group_size=32)
    idx = np.random.default_rng(0).permutation(16)
    assert np.array_equal(np.array(qw.take_rows(idx).dequantize()), np.array(qw.dequantize())[idx])


def test_concat_rows_merges_projections_exactly():
    q, k = (mx.random.normal((n, 128), key=mx.random.key(n)) for n in (32, 16))
    parts = [QuantizedWeight(*mx.quantize(w, group_size=64, bits=4), bits=4, group_size=64) for w in (q, k)]
    merged = concat_rows(parts)
    assert merged.shape == (48, 128)
    want = np.concatenate([np.array(p.dequantize()) for p in parts])
    assert np.array_equal(np.array(merged.dequantize()), want)
    other = QuantizedWeight(*mx.quantize(k, group_size=32, bits=8), bits=8, group_size=32)
    with pytest.raises(ValueError, match=r"different layouts \(bits, group size, K\): \(4, 64, 128\), \(8, 32, 128\)"):
        concat_rows([parts[0], other])


def test_stacked_leading_axes():
    w = mx.random.normal((3, 16, 64), key=mx.random.key(1))
    qw = QuantizedWeight(*mx.quantize(w, group_size=32, bits=8), bits=8, group_size=32)
    assert qw.shape == (3, 16, 64)


def test_inconsistent_triples_are_refused():
    wq, s, b = mx.quantize(mx.zeros((8, 128)), group_size=64, bits=4)
    with pytest.raises(ValueError, match="group sizes"):
        QuantizedWeight(wq, s, b, 4, 16)
    with pytest.raises(ValueError, match="scales and biases must be"):
        QuantizedWeight(wq, s, b, 4, 32)
    with pytest.raises(ValueError, match="uint32"):
        QuantizedWeight(wq.astype(mx.int32), s, b, 4, 64)


def test_weight_bytes():
    wq, s, b = mx.quantize(mx.zeros((256, 512)), group_size=64, bits=4)
    tensors = {"a.weight": QuantizedWeight(wq, s, b, 4, 64), "norm.weight": mx.ones((512,), dtype=mx.float16)}
    r = weights.weight_bytes(tensors, "bfloat16")
    assert r.full_precision == (256 * 512 + 512) * 2
    assert r.quantized == 256 * 512 // 2 + 2 * 256 * 8 * 4 + 512 * 2  # codes, f32 scales/biases, bf16 norm
    assert (r.tensors, r.quantized_tensors, r.dtype) == (2, 1, "bfloat16")
    assert r.as_dict()["quantized"] == r.quantized
    assert "0.3" in str(r) and "1 of 2 tensors" in str(r)
    assert weights.weight_bytes(tensors, "torch.float32").full_precision == (256 * 512 + 512) * 4
    with pytest.raises(ValueError, match="model dtype 'int8'"):
        weights.weight_bytes(tensors, "int8")
