"""The shape of the code, checked: imports run one way (vllm_metal_plugin -> lowering -> passes, with runtime
below all of them and weights between lowering and runtime), only the device modules ask which device MLX
runs on, and every fused op has a kernel in the generic table that every backend inherits."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import runtime  # noqa: F401  (fast BLAS before mlx)
from lowering.ops.fused import is_tensor_argument
from passes import FUSED
from runtime import kernels

ROOT = Path(__file__).resolve().parent.parent
# package -> the packages of ours it may import
ALLOWED = {
    "runtime": set(),
    "passes": set(),
    "weights": {"runtime"},
    "lowering": {"passes", "runtime", "weights"},
    "vllm_metal_plugin": {"lowering", "passes", "runtime", "weights"},
}
# the only files that may ask which device MLX runs on
DEVICE_FILES = {"runtime/config.py", "runtime/device.py"} | {
    str(p.relative_to(ROOT)) for p in (ROOT / "runtime" / "kernels").glob("*.py")}
_DEVICE_QUESTIONS = re.compile(r"default_device\(\)|mx\.(cuda|metal)\b|is_available\(\)|\bon_(cpu|cuda)\(")


def _sources(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", list(ALLOWED))
def test_imports_run_one_way(package):
    """Every import of one of our packages (at the top or inside a function) goes down the layers, never up."""
    ours = set(ALLOWED)
    upward = [f"{path.relative_to(ROOT)}:{line} imports {name}"
              for path in _sources(package) for name, line in _imported_packages(path)
              if name in ours and name != package and name not in ALLOWED[package]]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_passes_never_import_mlx():
    found = [f"{path.relative_to(ROOT)}:{line}" for path in _sources("passes")
             for name, line in _imported_packages(path) if name == "mlx"]
    assert not found, found


def test_only_the_device_modules_ask_for_the_device():
    asking = []
    for package in ALLOWED:
        for path in _sources(package):
            rel = str(path.relative_to(ROOT))
            if rel in DEVICE_FILES:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if _DEVICE_QUESTIONS.search(code):
                    asking.append(f"{rel}:{number}: {line.strip()}")
    assert not asking, "device tests outside runtime/kernels, runtime/device.py and runtime/config.py:\n" + \
        "\n".join(asking)


def test_the_emitted_step_imports_only_mlx_and_runtime():
    template = (ROOT / "lowering" / "templates" / "step.py.j2").read_text()
    imported = {m.split(".")[0] for m in re.findall(r"^(?:from|import)\s+(\S+)", template, re.MULTILINE)}
    assert imported <= {"mlx", "runtime"}, imported


@pytest.mark.parametrize("name", sorted(FUSED))
def test_every_fused_op_has_a_generic_kernel_with_its_signature(name):
    """`k.<name>(tensors..., scalar=...)`: the generic table takes the op's tensor arguments positionally (a cache
    op's `layer` becomes its cache and the batch) and every other argument by its schema name."""
    fused = FUSED[name]
    kernel = getattr(kernels.Generic, name, None)
    assert kernel is not None, f"runtime/kernels/generic.py has no `{name}`"
    params = inspect.signature(kernel).parameters
    keywords = {p for p, v in params.items() if v.kind == v.KEYWORD_ONLY}
    schema = fused.op._schema.arguments
    scalars = {a.name for a in schema if not is_tensor_argument(a) and a.name != "layer"}
    assert scalars <= keywords, f"{name}: schema scalars {sorted(scalars - keywords)} are not keyword arguments"
    for backend in kernels.BACKENDS.values():
        assert issubclass(backend, kernels.Generic)


def test_no_model_type_branches_in_the_compiler():
    """A family's quirks are patterns and op lowerings, never `if model_type == ...` in passes/ or lowering/."""
    names = r"llama|mistral|qwen\d?|gemma\d?|phi\d?|gpt_?neox|gpt2|opt|mixtral|deepseek|falcon|olmo|granite|cohere"
    branch = re.compile(rf"""(model_type|architectures?)\b.*[=!]=\s*["']({names})""", re.IGNORECASE)
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for package in ("passes", "lowering")
             for path in _sources(package) for n, line in enumerate(path.read_text().splitlines(), 1)
             if branch.search(line)]
    assert not found, found
