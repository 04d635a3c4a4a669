"""The benchmark code: docs/benchmarks.md's generated sections are what its results files render to, every
A/B variant names kernel switches the runtime knows, and the suites' command lines parse."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmarks import their siblings by name
    return importlib.import_module


def test_cpu_section_is_the_results_rendered(bench):
    common, cpu_report = bench("common"), bench("cpu_report")
    res = json.loads((RESULTS / "cpu-x86-2core.json").read_text())
    want = cpu_report.render(res, Path("benchmarks/results/cpu-x86-2core.json")).strip("\n")
    got = common.doc_section("cpu", (ROOT / "docs" / "benchmarks.md").read_text())
    assert got == want, "docs/benchmarks.md's CPU section differs from its results: run benchmarks/run.py --from-json"


def test_gpu_section_is_the_results_rendered(bench):
    common, gpu_report = bench("common"), bench("gpu_report")
    want = gpu_report.report(str(RESULTS / "gpu-h100.json")).strip("\n")
    got = common.doc_section("gpu", (ROOT / "docs" / "benchmarks.md").read_text())
    assert got == want, "docs/benchmarks.md's GPU tables differ from their results: run gpu.py report ... --write"


def test_results_files_are_one_per_machine_class():
    files = sorted(p.name for p in RESULTS.iterdir())
    assert files == ["cpu-x86-2core.json", "gpu-h100.json"], files


def test_variants_turn_off_known_kernels(bench):
    from runtime.config import KERNEL_SWITCHES

    variants = bench("gpu_variants").VARIANTS
    for name, off in variants.items():
        assert off and off <= set(KERNEL_SWITCHES), (name, sorted(off - set(KERNEL_SWITCHES)))
    with pytest.raises(SystemExit, match="unknown variant"):
        bench("gpu_variants").parse("ours_rope_apart,ours_nonsense")


@pytest.mark.parametrize("args", [["--help"], *([cmd, "--help"] for cmd in
                                                ("lower", "check", "ab", "profile", "kernel", "bandwidth", "torch", "report"))])
def test_gpu_cli_parses(bench, args, capsys):
    with pytest.raises(SystemExit) as info:
        bench("gpu").main(args)
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["run.py", *(pytest.param(s, marks=pytest.mark.slow) for s in (  # ~20 s of imports each
    "cpu_compiler.py", "cpu_overheads.py", "cpu_bandwidth.py", "cpu_profile.py", "vllm_e2e.py", "memory_report.py",
    "sgemm.py"))])
def test_cpu_scripts_parse(script):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]


def test_cpu_profile_groups_symbols(bench):
    """cpu_profile.py's grouping of perf samples: each kind of our kernels apart, MLX's evaluation machinery apart
    from its op kernels (JIT-fused elementwise libraries included), allocation and the OS apart."""
    group_of = bench("cpu_profile").group_of
    ext = "_cpu_ext.cpython-311-x86_64-linux-gnu.so"
    assert group_of(ext, "cpu_ext::(anonymous namespace)::gemv_q4_rows<32, 4>").startswith("4-bit GEMV")
    assert group_of(ext, "cpu_ext::(anonymous namespace)::gemv_q8_rows<32, 4>").startswith("8-bit GEMV")
    assert group_of(ext, "cpu_ext::(anonymous namespace)::gemv_dense<0>").startswith("dense GEMV")
    assert group_of(ext, "cpu_ext::(anonymous namespace)::heads_scores").startswith("paged attention")
    assert group_of(ext, "cpu_ext::parallel_for").startswith("pool threads")
    assert group_of("libmlx.so", "mlx::core::eval_impl").startswith("MLX graph evaluation")
    assert group_of("libmlx.so", "mlx::core::scatter<float, int, mlx::core::None>").startswith("MLX op kernels")
    assert group_of("libFf4IBroadcastCGf4IMultiply_strided_1.so", "Ff4IBroadcast").startswith("MLX op kernels")
    assert group_of("libc.so.6", "_int_malloc").startswith("memory allocation")
    assert group_of("[kernel.kallsyms]", "finish_task_switch.isra.0").startswith("OS")
