"""lowering/stamp.py: a stack of identical decoder layers exported with two layers and stamped to N
gives the same program as exporting all N (same emitted MLX source, same weights), for every family."""

import pytest
import torch

from lowering import capture
from lowering.api import lower
from vllm_metal_plugin.coverage import FAMILIES, tiny_model

LAYERS = 4


def _deep(family: str, **overrides):
    model = tiny_model(family)
    settings = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}  # re-derived for 4 layers
    config = model.config.__class__.from_dict({**settings, "num_hidden_layers": LAYERS, **overrides})
    torch.manual_seed(1)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _both(model, monkeypatch):
    stamped = capture.capture_hf(model)
    monkeypatch.setattr(capture, "STAMP", False)
    whole = capture.capture_hf(model)
    return stamped, whole


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stamped_capture_is_the_whole_export(family, monkeypatch):
    model = _deep(family)
    stamped, whole = _both(model, monkeypatch)
    alternating = len(set(getattr(model.config, "layer_types", None) or [None])) > 1
    assert stamped.meta["stamped"] is not alternating, "uniform stacks are stamped, alternating ones exported whole"
    assert stamped.node_count() == whole.node_count()
    assert sorted(stamped.weight_paths.values()) == sorted(whole.weight_paths.values())
    by_path = {p: whole.weights[n] for n, p in whole.weight_paths.items()}
    assert all(torch.equal(stamped.weights[n], by_path[p]) for n, p in stamped.weight_paths.items())
    a, b = lower(stamped), lower(whole)
    assert a.source == b.source


def test_a_layer_that_differs_is_not_stamped(monkeypatch):
    model = _deep("llama")
    layer = model.model.layers[2].mlp
    layer.down_proj = torch.nn.Linear(layer.down_proj.in_features, layer.down_proj.out_features, bias=True)
    stamped, whole = _both(model, monkeypatch)
    assert not stamped.meta["stamped"]
    assert lower(stamped).source == lower(whole).source
    assert any("layers.2.mlp.down_proj.bias" in p for p in stamped.weight_paths.values())


def test_vllm_front_is_stamped_too(tmp_path, monkeypatch):
    """vLLM's layers differ only in strings naming themselves (the attention's `layer_name`, which its op
    carries): they stamp, and each copy's attention op names its own layer."""
    from lowering.vllm_build import build_vllm_model
    from test_lowering_vllm import tiny_llama_dir

    model, config = build_vllm_model(str(tiny_llama_dir(tmp_path, layers=LAYERS)), max_model_len=512)
    stamped = capture.capture_vllm(model, config)
    monkeypatch.setattr(capture, "STAMP", False)
    whole = capture.capture_vllm(model, config)
    assert stamped.meta["stamped"] and not whole.meta["stamped"]
    names = [getattr(a, "value", a) for n in stamped.graph.nodes if "unified_attention" in str(n.target)
             for a in n.args if isinstance(getattr(a, "value", a), str)]  # vLLM wraps it: LayerName(value)
    assert names == [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)], names
    assert sorted(stamped.weight_paths.values()) == sorted(whole.weight_paths.values())
    a, b = lower(stamped), lower(whole)
    assert a.source == b.source
