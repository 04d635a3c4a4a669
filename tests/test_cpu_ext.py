"""The compiled CPU kernels (runtime/kernels/cpu_ext.py, csrc/) against float64 NumPy references.

Every weight layout (4/8 bits, groups 32/64/128, float32/bfloat16/float16 scales) and dtype, odd
sizes, rows 1..65, every thread count up to the CPUs, every kernel set this CPU runs, NaN/inf,
inside mx.compile, strided inputs and bad arguments. The reference unpacks MLX's packed words itself,
so the layout is checked too, not only agreement with mx.dequantize.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from runtime.kernels import cpu_ext

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# (atol, rtol) of the result's dtype, as vLLM's tests use them.
TOL = {mx.float32: (1e-5, 1.3e-6), mx.float16: (1e-3, 1e-3), mx.bfloat16: (1e-3, 1.6e-2)}
EPS32 = 2.0**-24


@pytest.fixture(autouse=True)
def _restore_defaults():
    isa = cpu_ext.isa()
    yield
    cpu_ext.set_num_threads(None)
    cpu_ext.set_isa(isa)


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def ref_weights(wq: mx.array, scales: mx.array, biases: mx.array, group: int, bits: int) -> np.ndarray:
    """float64 [N, K] from MLX's packing: value j of each uint32 word in bits j*bits..(j+1)*bits-1."""
    words = np.array(wq).astype(np.uint64)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint64) * bits)[None, None, :]
    q = ((words[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1).astype(np.float64)
    s = np.repeat(f64(scales), group, axis=1)
    b = np.repeat(f64(biases), group, axis=1)
    return s * q + b


def check(out: mx.array, x: mx.array, w64: np.ndarray, what: str) -> None:
    """out vs x @ w.T in float64: within the dtype's (atol, rtol) plus float32 accumulation's error
    bound (a small multiple of eps32 * sum |x| |w|)."""
    x64 = f64(x).reshape(-1, x.shape[-1])
    ref = x64 @ w64.T
    mag = np.abs(x64) @ np.abs(w64).T
    got = f64(out).reshape(ref.shape)
    atol, rtol = TOL[out.dtype]
    err = np.abs(got - ref)
    bound = atol + rtol * np.abs(ref) + 16 * EPS32 * mag
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: max error {err.max():.3g} (at {worst}: got {got[worst]:.6g}, want {ref[worst]:.6g}, "
        f"allowed {bound[worst]:.3g})"
    )


def quantized(n: int, k: int, group: int, bits: int, dtype=mx.float32, seed: int = 0):
    w = mx.random.normal((n, k), key=mx.random.key(seed)).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    mx.eval(wq, scales, biases)
    return wq, scales, biases


def rand(shape, dtype=mx.float32, seed: int = 1) -> mx.array:
    x = mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)
    mx.eval(x)
    return x


# ---------------------------------------------------------------- quantized matmul


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sdtype", ["float32", "bfloat16", "float16"])
def test_quantized_layouts(bits, group, sdtype):
    # K an odd multiple of the group (a partial vector block for the wider kernels), N odd.
    n, k = 37, group * 3
    wq, scales, biases = quantized(n, k, group, bits, DTYPES[sdtype])
    w64 = ref_weights(wq, scales, biases, group, bits)
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        for m in (1, 2, 5, 13):
            for xdtype in DTYPES.values():
                x = rand((m, k), xdtype, seed=m)
                out = cpu_ext.quantized_matmul(x, wq, scales, biases, group, bits)
                assert out.dtype == mx.quantized_matmul(x, wq, scales, biases, group_size=group, bits=bits).dtype
                assert out.shape == (m, n)
                check(out, x, w64, f"{isa} q{bits} g{group} scales {sdtype} x {xdtype} M={m}")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_long_rows(bits):
    # K over several GEMM chunks and blocks, the last one partial; groups of 32 across vector blocks.
    n, k = 53, 32 * 131
    wq, scales, biases = quantized(n, k, 32, bits, mx.bfloat16, seed=3)
    w64 = ref_weights(wq, scales, biases, 32, bits)
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        for m in (1, 7, 64):
            x = rand((m, k), mx.float32, seed=m)
            check(cpu_ext.quantized_matmul(x, wq, scales, biases, 32, bits), x, w64, f"{isa} q{bits} K={k} M={m}")


def test_quantized_rows_1_to_65():
    n, k = 19, 192
    wq, scales, biases = quantized(n, k, 64, 4)
    w64 = ref_weights(wq, scales, biases, 64, 4)
    x_all = rand((65, k), mx.float32, seed=5)
    for m in range(1, 66):
        x = x_all[:m]
        check(cpu_ext.quantized_matmul(x, wq, scales, biases, 64, 4), x, w64, f"q4 M={m}")


def test_quantized_tiled_path_matches_kernel(monkeypatch):
    # Above GEMM_MAX_M rows the wrapper multiplies dequantized tiles; with small tiles it crosses several.
    n, k, m = 45, 128, cpu_ext.GEMM_MAX_M + 3
    wq, scales, biases = quantized(n, k, 64, 8, mx.float16)
    monkeypatch.setattr(cpu_ext, "TILE_ROWS", 16)
    x = rand((m, k), mx.bfloat16)
    out = cpu_ext.quantized_matmul(x, wq, scales, biases, 64, 8)
    assert out.dtype == mx.float32 and out.shape == (m, n)  # bfloat16 x float16 promotes to float32
    check(out, x, ref_weights(wq, scales, biases, 64, 8), "tiled q8")


def test_batch_dims_and_strided_x():
    n, k = 21, 256
    wq, scales, biases = quantized(n, k, 64, 4)
    w64 = ref_weights(wq, scales, biases, 64, 4)
    x = rand((2, 3, k))
    out = cpu_ext.quantized_matmul(x, wq, scales, biases, 64, 4)
    assert out.shape == (2, 3, n)
    check(out, x, w64, "batch dims")
    wide = rand((5, 2 * k), seed=7)
    for view in (wide[:, ::2], wide[:, k:], mx.transpose(rand((k, 3), seed=8))):
        check(cpu_ext.quantized_matmul(view, wq, scales, biases, 64, 4), view, w64, f"strided x {view.shape}")
        check(cpu_ext.quantized_matmul(view[:1], wq, scales, biases, 64, 4), view[:1], w64, "strided GEMV")


def test_dequantize():
    for bits in (4, 8):
        for group in (32, 64, 128):
            wq, scales, biases = quantized(33, group * 5, group, bits, mx.bfloat16)
            got = np.array(cpu_ext.dequantize(wq, scales, biases, group, bits)).astype(np.float64)
            want = ref_weights(wq, scales, biases, group, bits)
            err = np.abs(got - want).max()
            assert err <= 4 * EPS32 * np.abs(want).max(), f"q{bits} g{group}: max error {err:.3g}"


# ---------------------------------------------------------------- dense weights


@pytest.mark.parametrize("wdtype", ["float32", "bfloat16", "float16"])
def test_linear_dtypes(wdtype):
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        for n, k in ((29, 77), (3, 1), (40, 512), (17, 1000)):
            w = rand((n, k), DTYPES[wdtype], seed=n)
            w64 = f64(w)
            for m in (1, 3, 8, 13):
                for xdtype in DTYPES.values():
                    x = rand((m, k), xdtype, seed=m)
                    out = cpu_ext.linear(x, w)
                    assert out.dtype == (x @ w.T).dtype and out.shape == (m, n)
                    check(out, x, w64, f"{isa} w {wdtype} x {xdtype} N={n} K={k} M={m}")


def test_linear_rows_1_to_65_and_strided_weights():
    n, k = 23, 131
    w = rand((n, k), mx.bfloat16)
    x_all = rand((65, k), mx.bfloat16, seed=4)
    for m in range(1, 66):
        check(cpu_ext.linear(x_all[:m], w), x_all[:m], f64(w), f"bf16 M={m}")
    wt = rand((k, n), mx.float16, seed=9)  # w as a transposed view: columns contiguous
    check(cpu_ext.linear(x_all[:4], wt.T), x_all[:4], f64(wt).T, "transposed w")


# ---------------------------------------------------------------- threads, compile, special values


def test_every_thread_count():
    n, k = 1001, 320
    wq, scales, biases = quantized(n, k, 64, 4, mx.bfloat16)
    w64 = ref_weights(wq, scales, biases, 64, 4)
    wd = rand((n, k), mx.bfloat16, seed=11)
    x = rand((9, k), seed=12)
    assert cpu_ext.num_threads() == cpu_ext.default_num_threads() >= 1
    for threads in range(1, cpu_ext.default_num_threads() + 2):  # one more than the CPUs too
        cpu_ext.set_num_threads(threads)
        assert cpu_ext.num_threads() == threads
        for m in (1, 9):
            check(cpu_ext.quantized_matmul(x[:m], wq, scales, biases, 64, 4), x[:m], w64, f"{threads} threads M={m}")
            check(cpu_ext.linear(x[:m], wd), x[:m], f64(wd), f"{threads} threads bf16 M={m}")
    cpu_ext.set_num_threads(None)
    assert cpu_ext.num_threads() == cpu_ext.default_num_threads()


def test_inside_mx_compile():
    n, k = 24, 128
    wq, scales, biases = quantized(n, k, 32, 4)
    wd = rand((k, n), mx.bfloat16, seed=2)

    def step(x):
        h = cpu_ext.quantized_matmul(x, wq, scales, biases, 32, 4)
        return cpu_ext.linear(mx.maximum(h, 0.0) * 2.0, wd) + 1.0

    def reference(x):
        h = f64(x) @ ref_weights(wq, scales, biases, 32, 4).T
        return (np.maximum(h, 0.0) * 2.0) @ f64(wd).T + 1.0

    compiled = mx.compile(step)
    shapeless = mx.compile(step, shapeless=True)
    for m in (1, 3, 8):
        x = rand((m, k), seed=m)
        for fn in (compiled, shapeless):
            got, want = f64(fn(x)), reference(x)
            assert got.shape == (m, k)
            err = np.abs(got - want).max()
            assert err <= 1e-3 * max(1.0, np.abs(want).max()), f"compiled M={m}: max error {err:.3g}"
        assert np.array_equal(np.array(compiled(x)), np.array(step(x)))


@pytest.mark.parametrize("kind", ["q4", "q8", "bf16", "f32"])
def test_nan_and_inf(kind):
    n, k = 12, 128
    if kind in ("q4", "q8"):
        bits = 4 if kind == "q4" else 8
        wq, scales, biases = quantized(n, k, 64, bits)
        w64 = ref_weights(wq, scales, biases, 64, bits)
        op = lambda x: cpu_ext.quantized_matmul(x, wq, scales, biases, 64, bits)  # noqa: E731
    else:
        w = rand((n, k), mx.bfloat16 if kind == "bf16" else mx.float32, seed=6)
        w64 = f64(w)
        op = lambda x: cpu_ext.linear(x, w)  # noqa: E731
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        for m in (1, 4):
            for bad, col in ((np.nan, 5), (np.inf, 70), (-np.inf, 127)):
                x_np = np.array(rand((m, k), seed=m))
                x_np[m - 1, col] = bad
                got = np.array(op(mx.array(x_np))).astype(np.float64)
                with np.errstate(invalid="ignore"):
                    want = x_np.astype(np.float64) @ w64.T
                what = f"{isa} {kind} M={m} x[{m - 1}, {col}] = {bad}"
                # A weight within rounding of 0 may be 0 (inf * 0 = NaN) or not: either is right there.
                clear = np.abs(w64[:, col]) > 1e-5
                got, want = got[:, clear], want[:, clear]
                assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: want {want}, got {got}"
                inf = np.isinf(want)
                assert np.array_equal(got[inf], want[inf]), f"{what}: want {want}, got {got}"
                fin = np.isfinite(want)
                assert np.allclose(got[fin], want[fin], rtol=1e-4, atol=1e-4), f"{what}: want {want}, got {got}"
    if kind in ("q4", "q8"):  # a NaN scale poisons its output column only
        bad_scales = np.array(scales)
        bad_scales[3, 1] = np.nan
        out = np.array(cpu_ext.quantized_matmul(rand((2, k)), wq, mx.array(bad_scales), biases, 64, bits))
        assert np.isnan(out[:, 3]).all() and not np.isnan(np.delete(out, 3, axis=1)).any()


def test_empty_rows():
    wq, scales, biases = quantized(8, 64, 64, 4)
    assert cpu_ext.quantized_matmul(mx.zeros((0, 64)), wq, scales, biases, 64, 4).shape == (0, 8)
    assert cpu_ext.linear(mx.zeros((0, 5)), mx.ones((3, 5))).shape == (0, 3)


# ---------------------------------------------------------------- bad arguments


def test_bad_arguments_name_the_problem():
    wq, scales, biases = quantized(8, 128, 64, 4)
    x = mx.ones((2, 128))
    cases = [
        (lambda: cpu_ext.quantized_matmul(x, wq, scales, biases, 64, 3), ValueError, "bits must be one of 4, 8"),
        (lambda: cpu_ext.quantized_matmul(x, wq, scales, biases, 16, 4), ValueError, "group_size must be one of"),
        (lambda: cpu_ext.quantized_matmul(x, wq, scales, biases, 32, 4), ValueError, "scales must have shape (8, 4)"),
        (lambda: cpu_ext.quantized_matmul(mx.ones((2, 96)), wq, scales, biases, 64, 4), ValueError,
         "x's last dimension is 96 but w holds rows of K = 128"),
        (lambda: cpu_ext.quantized_matmul(x, wq.astype(mx.float32), scales, biases, 64, 4), ValueError,
         "w must be the uint32"),
        (lambda: cpu_ext.quantized_matmul(x, wq, scales, biases.astype(mx.float16), 64, 4), ValueError,
         "scales and biases must have one dtype"),
        (lambda: cpu_ext.quantized_matmul(x.astype(mx.int32), wq, scales, biases, 64, 4), ValueError,
         "x must be float32, bfloat16 or float16"),
        (lambda: cpu_ext.quantized_matmul(np.ones((2, 128)), wq, scales, biases, 64, 4), TypeError,
         "x must be an mlx.core.array"),
        (lambda: cpu_ext.linear(mx.ones((2, 5)), mx.ones((3, 4))), ValueError, "x's last dimension is 5 but w (3, 4)"),
        (lambda: cpu_ext.linear(mx.ones((2, 4)), mx.ones((3, 4), dtype=mx.int32)), ValueError,
         "w must be a float32, bfloat16 or float16 matrix"),
        (lambda: cpu_ext.linear(mx.array(1.0), mx.ones((3, 4))), ValueError, "x must have at least one dimension"),
        (lambda: cpu_ext.set_num_threads(0), ValueError, "n must be a positive int or None"),
        (lambda: cpu_ext.set_isa("sse9"), ValueError, "unknown kernel set sse9"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc) as info:
            mx.eval(call())
        assert words in str(info.value), f"{words!r} not in {str(info.value)!r}"
        assert "\n" not in str(info.value).strip()
    # K that MLX's layout cannot hold: mx.quantize refuses a partial group, and so do we.
    with pytest.raises(ValueError, match="needs to be divisible"):
        mx.quantize(mx.ones((4, 80)), group_size=32, bits=4)
    odd = mx.zeros((4, 3), dtype=mx.uint32)  # 24 values a row: no whole group of 32
    with pytest.raises(ValueError, match="not a multiple of group_size 32"):
        cpu_ext.quantized_matmul(mx.ones((1, 24)), odd, mx.ones((4, 1)), mx.ones((4, 1)), 32, 4)
