"""Shared fixtures. Imported by pytest before any test module.

`import runtime` comes first: it loads the optimized BLAS before anything imports mlx.core
(the venv's .pth hook does the same; this keeps the tests right even without it).
"""

import runtime  # noqa: F401  (must precede every mlx import)

import pytest

import weights.bundled


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Point the files vLLM and torch leave behind (compile caches, ZMQ sockets) at a temp dir."""
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CACHE_ROOT", str(root / "vllm"))
        mp.setenv("VLLM_RPC_BASE_PATH", str(root / "rpc"))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
        (root / "rpc").mkdir()
        yield root


@pytest.fixture(scope="session")
def smollm2_path():
    """The verified SmolLM2-135M-Instruct checkpoint directory (converted on first use, ~35 s)."""
    return weights.bundled.prepare("smollm2")


# The pass-developer harness: `check_pass` / `pass_strategies` fixtures and its failure report.
from pass_harness import check_pass, pass_strategies, pytest_runtest_makereport  # noqa: E402,F401
