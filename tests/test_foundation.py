"""The foundation: the fast BLAS is really in use, the bundled model works, its cache heals itself.

Real torch, MLX and transformers throughout. The BLAS checks run in fresh interpreters of this venv,
because which BLAS MLX binds to is decided once, when mlx.core is loaded.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import runtime.blas
import weights.bundled as bundled

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reference-BLAS trap is Linux-only")


def _python(code: str, **env: str) -> str:
    """Run `code` in a fresh interpreter of this venv; return its stdout."""
    # Not inherited from this process: the BLAS choice, and what the runtime set here (runtime/device.py).
    full_env = {k: v for k, v in os.environ.items() if k not in ("VLLM_METAL_BLAS", "MLX_ENABLE_TF32")}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


_REPORT = "import json, runtime.blas; print(json.dumps(runtime.blas.report()))"


@linux_only
def test_mlx_sgemm_is_not_the_reference_blas():
    report = json.loads(_python("import runtime\nimport mlx.core\n" + _REPORT))
    assert not report["reference_blas"], report
    assert "cblas_sgemm" in report["patched"], report
    chosen = runtime.blas._find_openblas()  # a system OpenBLAS, else the scipy-openblas32 dependency's
    assert report["loaded"] == chosen and report["sgemm_library"] == os.path.realpath(chosen), report
    wheel = chosen == runtime.blas.wheel_openblas()
    # An OpenBLAS on its generic kernels is ~10x slower: Debian's mis-detects newer CPUs (we tell it).
    expected = runtime.blas._cpu_coretype()
    if expected and report["openblas_core"] is not None:
        assert report["openblas_core"] == expected if not wheel else report["openblas_core"] != "Prescott", report


@linux_only
@pytest.mark.skipif(not os.path.exists(runtime.blas._CANDIDATES[0]), reason="no system OpenBLAS here")
def test_a_system_openblas_is_used_when_named():
    # The fallback path, and a library without the wheel's scipy_ symbol prefix.
    path = runtime.blas._CANDIDATES[0]
    report = json.loads(_python("import runtime\nimport mlx.core\n" + _REPORT, VLLM_METAL_BLAS=path))
    assert report["loaded"] == path and not report["reference_blas"], report
    assert "libopenblas" in report["sgemm_library"] and "cblas_sgemm" in report["patched"], report


@linux_only
def test_venv_hook_makes_it_automatic():
    # mlx.core first, runtime never imported before it: only the package's .pth hook can have set it up.
    report = json.loads(_python("import mlx.core\n" + _REPORT))
    assert not report["reference_blas"], f"the package's .pth hook is missing or broken: {report}"
    # The hook leaves the environment alone (MLX_ENABLE_TF32 is the runtime's business, runtime/device.py).
    env = json.loads(_python("import json, os\nprint(json.dumps(os.environ.get('MLX_ENABLE_TF32')))"))
    assert env is None, env


@linux_only
def test_report_detects_the_reference_blas_and_late_fix_works():
    # The check above must be able to fail: switched off, MLX keeps the reference BLAS it bundles.
    report = json.loads(_python("import runtime\nimport mlx.core\n" + _REPORT, VLLM_METAL_BLAS="none"))
    assert report["reference_blas"] and not report["patched"], report
    # The fix does not depend on import order: applied after mlx.core is loaded, it still takes effect.
    late = "import mlx.core, os, runtime.blas\nos.environ.pop('VLLM_METAL_BLAS')\nruntime.blas.preload()\n"
    report = json.loads(_python(late + _REPORT, VLLM_METAL_BLAS="none"))
    assert not report["reference_blas"], report


@linux_only
def test_torch_keeps_its_own_blas():
    # A globally loaded OpenBLAS would also capture torch's MKL sgemm_ (3-4x slower here): it must not.
    report = json.loads(_python("import runtime, mlx.core, torch\n" + _REPORT))
    assert os.path.basename(report["torch_sgemm_library"]).startswith("libtorch_cpu"), report
    assert not report["reference_blas"], report


def test_mlx_matmul_matches_numpy():
    code = """
import runtime, mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((512, 512), dtype=np.float32)
b = rng.standard_normal((512, 512), dtype=np.float32)
errors = []
for x, y in ((a, b), (a, b.T), (a.T, b)):  # the transposed cases take other BLAS code paths
    got = np.array(mx.matmul(mx.array(x), mx.array(y)))
    want = x.astype(np.float64) @ y.astype(np.float64)
    errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
print(max(errors))
"""
    assert float(_python(code)) < 1e-4


def test_smollm2_answers_paris(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_damaged_checkpoint_is_detected_and_rebuilt(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_METAL_CACHE", str(tmp_path))
    copy = tmp_path / "models" / smollm2_path.name
    shutil.copytree(smollm2_path, copy)
    weights = copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    tok = copy / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, different content: only the hash can tell
    tok.write_bytes(bytes(data))

    problems = bundled.verify(copy)
    assert len(problems) == 2, problems
    assert any(p.startswith("model.safetensors ") and "bytes" in p for p in problems), problems
    assert any(p.startswith("tokenizer.json ") and "sha256" in p for p in problems), problems
    cli = subprocess.run([sys.executable, "-m", "weights.bundled", "verify"], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 1 and "model.safetensors" in cli.stdout and "tokenizer.json" in cli.stdout

    rebuilt = bundled.prepare("smollm2")  # never hands out the damaged copy: converts again (~35 s)
    assert rebuilt == copy
    assert bundled.verify(rebuilt) == []
    assert stat.S_IMODE(rebuilt.stat().st_mode) == 0o755
    # The conversion is deterministic: the rebuilt files are byte-identical to the original ones.
    original = json.loads((smollm2_path / bundled.MANIFEST).read_text())
    assert json.loads((rebuilt / bundled.MANIFEST).read_text()) == original
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".prepare-")]  # no leftovers
