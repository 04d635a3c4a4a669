"""`vllm-metal-serve` and `vllm-metal-generate`: vLLM's own argument parsing, and bad input answered in
one line.

The parser tests build vLLM's `vllm serve` parser exactly as vLLM's `vllm` command does and compare
what it makes of each command line with ours. The bad-input cases run in one subprocess under
`python -O` (tests/entrypoint_cases.py), so a check that lived in an `assert` would show. Serving and
generating for real (with and without a model, `--flag=value` forms, the OpenAI client) are the
commands of docs/cli.md, run by tests/test_docs_commands.py.
"""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest

from vllm_helpers import PYTHON, REPO, clean_env

PRODUCT_PACKAGES = ("lowering", "passes", "runtime", "vllm_metal_plugin", "weights")


def vllm_serve_parser():
    """The parser of `vllm serve`, built as vllm/entrypoints/cli/main.py builds it."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    command = ServeSubcommand()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    return parser


@pytest.fixture(scope="module")
def config_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_configs")
    (d / "limits.yaml").write_text("max-model-len: 777\ndtype: float16\nport: 9001\n")
    (d / "with_model.yaml").write_text("model: /models/from-config\nmax_num_seqs: 3\n")
    return d


COMMAND_LINES = [
    ["/models/m", "--dtype=bfloat16", "--max-model-len=4096"],
    ["--model=/models/m", "--port=8001", "--served-model-name=m"],
    ["--model", "/models/m", "--dtype", "float16", "--max_model_len", "1k"],
    ["--max-model-len=123", "--port", "8080", "/models/m"],
    ["/models/m", "--config", "{d}/limits.yaml", "--max-model-len=100"],
    ["--config", "{d}/with_model.yaml", "--max-num-seqs=5"],
    ["/models/m", "--speculative-config.method", "ngram", "--speculative-config.num_speculative_tokens=3"],
    ["/models/m", "--structured-outputs-config", '{"backend": "guidance"}', "-O0"],
]


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=lambda a: " ".join(a)[:60])
def test_serve_parses_every_form_as_vllm_serve(argv, config_files):
    from vllm_metal_plugin.serve import parse

    argv = [a.replace("{d}", str(config_files)) for a in argv]
    ours, theirs = vars(parse(list(argv))[0]), vars(vllm_serve_parser().parse_args(["serve", *argv]))
    for args in (ours, theirs):  # what `vllm serve` does first: the positional model wins
        if args["model_tag"] is not None:
            args["model"] = args["model_tag"]
    assert ours == theirs


def test_serve_defaults_are_vllms_except_the_bundled_model(config_files):
    from vllm_metal_plugin.serve import parse

    theirs = vars(vllm_serve_parser().parse_args(["serve"]))
    for argv in ([], ["--served-model-name", "m"], ["--config", str(config_files / "limits.yaml")]):
        ours = vars(parse(list(argv))[0])
        reference = vars(vllm_serve_parser().parse_args(["serve", "smollm2", *argv]))
        assert ours["model"] == "smollm2" and ours["model_tag"] in (None, "smollm2"), argv
        # where vLLM itself accepts the command line, the rest is vLLM's; where it would refuse for lack of
        # a model (served name, config file without one) it is the same as naming the bundled model
        ours.pop("model_tag"), reference.pop("model_tag")
        assert ours == {**reference, "model": "smollm2"}, argv
    no_model = vars(parse([])[0])
    assert {k: v for k, v in no_model.items() if k != "model"} == {k: v for k, v in theirs.items() if k != "model"}
    assert theirs["model"] != "smollm2"  # vLLM's own default is a Hub model; ours is the bundled one


def test_serve_options_are_vllms():
    from vllm_metal_plugin.serve import build_parser

    def options(parser):
        serve = parser._subparsers._group_actions[0].choices["serve"]
        return sorted(s for action in serve._actions for s in action.option_strings)

    ours, theirs = options(build_parser()[0]), options(vllm_serve_parser())
    assert ours == theirs and len(ours) > 200


def test_help_is_vllms():
    """The installed commands' --help (a subprocess each: vLLM reads option help texts only when
    `--help` is on the process's command line)."""
    runs = {flag: subprocess.Popen(command(prog) + [flag], cwd=str(REPO), env=clean_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            for prog, flag in (("vllm-metal-serve", "--help"), ("vllm-metal-serve", "--help=ModelConfig"),
                               ("vllm-metal-generate", "--help=all"))}
    out = {}
    for flag, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{flag}: exit {proc.returncode}\n{stderr[-3000:]}"
        out[flag] = stdout
    serve = out["--help"]
    assert serve.startswith("usage: vllm-metal-serve [model_tag] [options]") and "Config Groups" in serve, serve[:2000]
    assert "vllm-metal-serve --help=all" in serve and "vllm serve --help" not in serve, serve[-1000:]
    model = out["--help=ModelConfig"]
    assert "--max-model-len" in model and "Name or path of the Hugging Face model" in model, model[:3000]
    assert "(default: smollm2)" in " ".join(model.split()), model[:3000]
    generate = " ".join(out["--help=all"].split())
    assert generate.startswith("usage: vllm-metal-generate") and "--speculative-config" in generate, generate[:2000]
    assert "--max-tokens MAX_TOKENS most tokens in the answer (default: 64)" in generate, generate[:3000]


def command(prog: str) -> list[str]:
    """The installed console script, or `python -m` of its module where the venv has none."""
    script = Path(PYTHON).parent / prog
    module = {"vllm-metal-serve": "vllm_metal_plugin.serve", "vllm-metal-generate": "vllm_metal_plugin.generate"}
    return [str(script)] if script.exists() else [PYTHON, "-m", module[prog]]


def test_generate_takes_vllms_engine_arguments():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_metal_plugin.generate import build_parser

    args = vars(build_parser().parse_args(["--dtype=bfloat16", "--max_model_len=4k", "--model=/m",
                                           "--speculative-config.method=ngram", "Hello?"]))
    assert (args["dtype"], args["max_model_len"], args["model"], args["prompt"]) == ("bfloat16", 4000, "/m", "Hello?")
    assert args["speculative_config"] == {"method": "ngram"}
    defaults = vars(build_parser().parse_args([]))
    assert (defaults["model"], defaults["max_model_len"], defaults["max_num_seqs"]) == ("smollm2", 2048, 8)
    assert defaults["dtype"] == EngineArgs.dtype == "auto"


def test_bad_input_is_one_line_without_traceback_under_python_O(tmp_path, smollm2_path):
    out = tmp_path / "cases.json"
    proc = subprocess.run([PYTHON, "-O", str(REPO / "tests" / "entrypoint_cases.py"), str(tmp_path), str(out),
                           str(smollm2_path)], cwd=str(REPO), env=clean_env(), capture_output=True, text=True,
                          timeout=900)
    assert out.exists(), f"the case runner exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["optimize"] == 1
    failures = []
    for case in result["cases"]:
        prog = "vllm-metal-" + case["command"].rsplit(".", 1)[1]
        errors = [line for line in case["stderr"].splitlines() if line.startswith(f"{prog}: error: ")]
        ok = (case["got_status"] == case.get("status", 1) and len(errors) == 1 and case["expect"] in errors[0]
              and "Traceback" not in case["stderr"])
        if not ok:
            failures.append(f"{case['name']}: status {case['got_status']!r}, stderr:\n{case['stderr'][-2500:]}")
    print(f"\n[entrypoints] {len(result['cases'])} bad inputs, e.g.\n  " + "\n  ".join(
        next(l for l in c["stderr"].splitlines() if ": error: " in l) for c in result["cases"][:3]))
    assert not failures, "\n\n".join(failures)


def test_no_assert_statements_in_product_code():
    """Checks of input and invariants must hold under `python -O`, which drops every `assert`."""
    found = []
    for package in PRODUCT_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            found += [f"{path.relative_to(REPO)}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert not found, "assert statements in product code (gone under python -O): " + ", ".join(found)


def test_generate_with_a_model_argument(tmp_path, smollm2_path):
    """`vllm-metal-generate --model=DIR` in vLLM's --flag=value forms, end to end on a tiny chat model
    (the bundled model's run is the README's command, in tests/test_docs_commands.py). In-process engine
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, vLLM's own switch): seconds instead of a second process start."""
    from vllm_features import tiny_chat_llama

    model = tiny_chat_llama(tmp_path / "tiny_chat_llama", str(smollm2_path))
    proc = subprocess.run(command("vllm-metal-generate") + [f"--model={model}", "--dtype=float32", "--max-model-len=256",
                                                            "--max-tokens=6", "--seed=3", "Name a colour."],
                          cwd=str(REPO), env=clean_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.endswith("\n") and "Traceback" not in proc.stderr, (proc.stdout[-2000:], proc.stderr[-3000:])


def test_a_torchvision_that_cannot_load_is_one_line():
    """PyPI's torchvision is built for CUDA torch; beside the CPU torch its operators are missing and
    transformers (imported by vLLM) fails. The real error torch raises, turned into one line with the fix."""
    import torch

    from vllm_metal_plugin.startup import one_line_error

    with pytest.raises(RuntimeError) as raised:
        torch.library.register_fake("torchvision::no_such_operator")(lambda x: x)
    message = one_line_error(raised.value)
    assert message is not None and "\n" not in message, (raised.value, message)
    assert "pip uninstall torchvision torchaudio torchcodec" in message and "download.pytorch.org/whl/cpu" in message
