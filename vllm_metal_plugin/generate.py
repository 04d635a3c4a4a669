"""`vllm-metal-generate ["PROMPT"] [options]`: answer one chat prompt with vLLM + this plugin (the
README's main job).

Every vLLM engine option (`--model`, `--dtype`, `--max-model-len`, `--speculative-config`, ...) is
accepted in vLLM's own forms (`--x=y`, `--x y`, `--config file.yaml`): the parser is vLLM's
`FlexibleArgumentParser` with `EngineArgs.add_cli_args`, the pattern of vLLM's offline examples, and
the options go to `vllm.LLM`. The model defaults to the bundled SmolLM2-135M-Instruct (prepared on first
use); bundled names (`smollm2`) work as `--model`. Greedy by default, so the answer is reproducible.
"""

from __future__ import annotations

import os
import sys

import runtime  # noqa: F401  (the fast BLAS before anything imports mlx)
from weights.bundled import DEFAULT_MODEL

PROG = "vllm-metal-generate"
# Our defaults where vLLM's suit a server more than one prompt: a 2048-token context and 8 sequences
# keep the KV cache small (vLLM's defaults are the model's full context and 256 sequences).
DEFAULTS = {"model": DEFAULT_MODEL, "max_model_len": 2048, "max_num_seqs": 8}


def build_parser():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?",
                        help="the user message of the chat")
    sampling = parser.add_argument_group("Sampling", "Sampling parameters of the answer.")
    sampling.add_argument("--max-tokens", type=int, default=64, help="most tokens in the answer")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    sampling.add_argument("--verbose", action="store_true", help="show vLLM's INFO logs")
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(**DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vllm_metal_plugin.startup import check_environment, one_line_error, resolve_model

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" not in argv:  # before vLLM's logger is configured (at its import)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    args = {}
    try:
        args = vars(build_parser().parse_args(argv))
        prompt, max_tokens, temperature = args.pop("prompt"), args.pop("max_tokens"), args.pop("temperature")
        args.pop("verbose")
        check_environment()
        args["model"], _ = resolve_model(args["model"])
        from vllm import LLM, SamplingParams

        llm = LLM(**args)
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        out = llm.chat([[{"role": "user", "content": prompt}]], params, use_tqdm=False)
        answer = out[0].outputs[0].text.strip()
        del llm  # shut the engine down before printing, so the answer is the last thing on screen
    except Exception as exc:
        message = one_line_error(exc, args.get("model"))
        if message is None:
            raise
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 1
    print(answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
