"""MLX-format checkpoints (mlx-lm's layout) read as stored, per-module overrides included."""

import json

import mlx.core as mx
import numpy as np
import pytest
from weights_writers import hf_llama_config, llama_linears, write_checkpoint

import weights


def quantized_checkpoint(tmp_path, overrides=None, bits=4, group=64, mode=None):
    """Linears quantized with mx.quantize (bits/group, or a per-module override), norms full precision."""
    rng = np.random.default_rng(0)
    overrides = overrides or {}
    tensors, expect = {}, {}
    for module, shape in llama_linears().items():
        w = mx.array(rng.normal(0, 0.05, shape).astype(np.float32)).astype(mx.float16)
        p = overrides.get(module, {"bits": bits, "group_size": group})
        if p is False:
            tensors[f"{module}.weight"] = w
            continue
        wq, s, b = mx.quantize(w, group_size=p["group_size"], bits=p["bits"])
        tensors |= {f"{module}.weight": wq, f"{module}.scales": s, f"{module}.biases": b}
        expect[module] = (wq, s, b, p)
    tensors["model.norm.weight"] = mx.ones((256,), dtype=mx.float16)
    quant = {"group_size": group, "bits": bits, **({"mode": mode} if mode else {})}
    quant |= {m: v for m, v in overrides.items() if v is not False}
    cfg = hf_llama_config(quantization=quant, quantization_config=quant)
    return write_checkpoint(tmp_path / "mlx", tensors, cfg), expect


def test_read_as_stored(tmp_path):
    path, expect = quantized_checkpoint(tmp_path)
    loaded = weights.load(path)
    assert loaded.format == "mlx"
    assert loaded.config["num_hidden_layers"] == 2
    for module, (wq, s, b, p) in expect.items():
        qw = loaded.tensors[f"{module}.weight"]
        assert (qw.bits, qw.group_size) == (p["bits"], p["group_size"])
        for got, want in ((qw.wq, wq), (qw.scales, s), (qw.biases, b)):
            assert got.dtype == want.dtype and np.array_equal(np.array(got), np.array(want))
    assert loaded.tensors["model.norm.weight"].dtype == mx.float16


def test_per_module_overrides(tmp_path):
    down = "model.layers.0.mlp.down_proj"
    up = "model.layers.1.mlp.up_proj"
    overrides = {down: {"group_size": 32, "bits": 8}, up: False}
    path, expect = quantized_checkpoint(tmp_path, overrides)
    loaded = weights.load(path)
    assert (loaded.tensors[f"{down}.weight"].bits, loaded.tensors[f"{down}.weight"].group_size) == (8, 32)
    assert isinstance(loaded.tensors[f"{up}.weight"], mx.array)  # left in full precision
    assert len(loaded.quantized) == len(expect)


def test_mlx_lm_written_checkpoint(tmp_path):
    """mlx-lm's own quantize_model + save_model + save_config, with a mixed-precision predicate."""
    from mlx.utils import tree_flatten

    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_lm.models import llama

    cfg = hf_llama_config()
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())

    def predicate(path, module):
        if path.endswith("down_proj"):
            return {"group_size": 32, "bits": 8}
        return not path.endswith("v_proj")

    model, qcfg = mlx_lm_utils.quantize_model(model, cfg, group_size=64, bits=4, quant_predicate=predicate)
    out = tmp_path / "mlxlm"
    mlx_lm_utils.save_model(out, model)
    mlx_lm_utils.save_config(qcfg, out / "config.json")
    loaded = weights.load(out)
    params = dict(tree_flatten(model.parameters()))
    for name, t in loaded.tensors.items():
        if isinstance(t, weights.QuantizedWeight):
            module = name[: -len(".weight")]
            assert np.array_equal(np.array(t.wq), np.array(params[f"{module}.weight"]))
            assert np.array_equal(np.array(t.scales), np.array(params[f"{module}.scales"]))
            m = dict(model.named_modules())[module]
            assert (t.bits, t.group_size) == (m.bits, m.group_size)
            if hasattr(m, "weight") and hasattr(m, "scales") and module.endswith("_proj"):
                x = mx.random.normal((2, t.shape[1]))
                np.testing.assert_allclose(np.array(x @ t.dequantize().T), np.array(m(x)), atol=1e-5, rtol=1e-5)
        else:
            assert np.array_equal(np.array(t), np.array(params[name]))
    assert loaded.tensors["model.layers.0.mlp.down_proj.weight"].bits == 8
    assert isinstance(loaded.tensors["model.layers.0.self_attn.v_proj.weight"], mx.array)
    assert set(loaded.tensors) == set(params) - {n for n in params if n.endswith((".scales", ".biases"))}


def test_non_affine_mode_is_refused(tmp_path):
    path, _ = quantized_checkpoint(tmp_path, mode="mxfp4")
    with pytest.raises(weights.UnsupportedQuantizationError, match="mode 'mxfp4'; supported: affine"):
        weights.load(path)


def test_config_that_disagrees_with_the_shapes_is_named(tmp_path):
    path, _ = quantized_checkpoint(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization"]["bits"] = 8  # the tensors hold 4-bit codes
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.WeightsError, match="model.layers.0.mlp.down_proj: wq"):
        weights.load(path)


def test_truncated_safetensors_is_named(tmp_path):
    path, _ = quantized_checkpoint(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(weights.DamagedFileError, match=str(f)):
        weights.load(path)
