"""`vllm-metal-generate "PROMPT"`: answer a chat prompt with vLLM + this plugin (the README's main job).

The model defaults to the bundled SmolLM2-135M-Instruct (prepared on first use); any vLLM model
directory works with --model. Greedy by default, so the answer is reproducible.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-metal-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--model", default=None, help="checkpoint directory or bundled name (default: smollm2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--verbose", action="store_true", help="show vLLM's INFO logs")
    args = parser.parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    import runtime  # noqa: F401  (fast BLAS before mlx)
    from weights.bundled import resolve

    os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="vllm-rpc-"))
    model = resolve(args.model)
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=8)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    out = llm.chat([[{"role": "user", "content": args.prompt}]], params)
    answer = out[0].outputs[0].text.strip()
    del llm  # shut the engine down before printing, so the answer is the last thing on screen
    print(answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
