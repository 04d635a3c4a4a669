"""The GPU device path without a GPU: VLLM_MLX_DEVICE=gpu is refused where MLX has no GPU backend, and
benchmarks/gpu.py's correctness check (lowered logits vs transformers, same weights) runs on the CPU.

The same check runs on MLX's CUDA backend on a GPU machine (`python benchmarks/gpu.py check`; results in
docs/benchmarks.md, GPU section)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from runtime.config import ConfigError, RuntimeConfig, gpu_available

ROOT = Path(__file__).resolve().parent.parent


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(gpu_available(), reason="this MLX build has a GPU backend")
def test_gpu_refused_without_gpu_backend():
    with pytest.raises(ConfigError) as info:
        RuntimeConfig.from_env({"VLLM_MLX_DEVICE": "gpu"})
    message = str(info.value)
    assert "VLLM_MLX_DEVICE='gpu'" in message and "no GPU backend" in message and "cpu" in message, message
    assert "\n" not in message
    assert RuntimeConfig.from_env({"VLLM_MLX_DEVICE": "cpu"}).device == "cpu"
    assert RuntimeConfig.from_env({}).device == "cpu"  # unset: the CPU, no error


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_benchmark_check_on_cpu(dtype, monkeypatch, tmp_path):
    bench = _gpu_bench()
    monkeypatch.setattr(bench, "LOWERED", tmp_path / "none")  # capture here, not a GPU host's artefact
    monkeypatch.setenv("VLLM_MLX_DEVICE", "cpu")  # check() sets it; restored afterwards
    vllm_before = "vllm" in sys.modules
    out = bench.check("tiny", dtype, "cpu")
    assert out["ok"], out
    assert out["lowering"].startswith("captured here")
    assert out["rows_compared"] == 8 and out["max_abs_logit"] > 0
    assert out["rel_err"] <= (1e-5 if dtype == "float32" else 2e-2)
    if not vllm_before:
        assert not out["vllm_imported"]  # the HF front end never imports vLLM
