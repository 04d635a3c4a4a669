"""The commands the docs show, run for real: the docs show nothing that fails.

Commands are taken from the fenced ```bash blocks of the documents below (a heredoc stays with its
command) and from `$ ` lines of their other fenced blocks (transcripts). Placeholders become real things:
`path/to/config.json` the tiny Llama config of tests/test_cli.py, `/tmp/tiny` a directory of the test's
own, `path/to/model` the bundled SmolLM2 checkpoint, `.venv/bin/` the venv of the tests, port 8000 a free
port. A `vllm-metal-serve` command is started, asked through the OpenAI client (the models list, a chat
answer, structured output) and stopped; every other command runs to completion and must exit 0. Commands
that make files the next ones read (`mkdir`, `cat > file <<EOF`) run first, in order. The commands that cannot run inside the
suite (the installer, the test suite itself) are listed in NOT_RUN with the reason; every other command
of the docs runs. Those that load SmolLM2 (`lower-model` on it, every server or generation) are slow tests:
the default suite already starts the bundled model's server once (tests/test_server.py) and runs
`vllm-metal-generate --model=...` on a tiny model (tests/test_entrypoints.py); it runs the rest here.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_helpers import PYTHON, REPO, clean_env, free_port, kill_group

DOCS = ["README.md", "docs/cli.md", "docs/plugin.md", "docs/configuration.md", "docs/writing-a-pass.md"]
NOT_RUN = {
    "./setup.sh": "the installer (minutes; CI runs it before the suite)",
    ".venv/bin/python -m pytest": "tests of this suite (the suite runs them)",
}
CITY_QUESTION = "What is the capital of France?"


def doc_commands() -> list[tuple[str, str]]:
    """(document, command) for every command the docs show, in order, without duplicates."""
    found = []
    for doc in DOCS:
        lang, block, heredoc = None, None, None
        for line in (REPO / doc).read_text().splitlines():
            if heredoc is not None:  # inside a heredoc: the line belongs to the command above
                found[-1] = (doc, found[-1][1] + "\n" + line)
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            fence = re.match(r"^```(\S*)", line)
            if fence:
                lang, block = (fence.group(1), []) if block is None else (None, None)
                continue
            if block is None:
                continue
            text = line.strip()
            if lang == "bash" and text and not text.startswith("#"):
                found += [(doc, part.strip()) for part in text.split("&&")]
            elif lang != "bash" and text.startswith("$ "):
                found.append((doc, text[2:].strip()))
            else:
                continue
            marker = re.search(r"<<-?\s*'?(\w+)'?", text)
            heredoc = marker.group(1) if marker else None
    seen, unique = set(), []
    for doc, command in found:  # the same command twice (README and docs/cli.md) runs once
        key = re.sub(r"\s+#[^'\"\n]*$", "", command.replace(".venv/bin/", "")).split()
        key = tuple(key)
        if key not in seen:
            seen.add(key)
            unique.append((doc, command))
    return unique


def _not_run(command: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)


def _setup(command: str) -> bool:
    return command.startswith(("mkdir ", "cat >"))


def _slow(command: str) -> bool:
    """Loads SmolLM2: lower-model on it, or a server / generation (the bundled model or `path/to/model`)."""
    words = command.split()
    program = Path(words[0]).name if words else ""
    if program == "lower-model":
        return not any("config.json" in w for w in words[1:])
    return program in ("vllm-metal-serve", "vllm-metal-generate") and "--help" not in command


COMMANDS = doc_commands()


@pytest.fixture(scope="module")
def places(tmp_path_factory, smollm2_path):
    from test_cli import TINY

    root = tmp_path_factory.mktemp("docs_commands")
    (root / "tiny").mkdir()
    (root / "tiny" / "config.json").write_text(json.dumps(TINY))
    return {"root": root, "config": root / "tiny" / "config.json", "tmp_tiny": root / "doc-tiny",
            "model": Path(smollm2_path)}


def concrete(command: str, places: dict, port: int) -> str:
    bin_dir = str(Path(PYTHON).parent) + "/"
    command = command.replace("path/to/config.json", str(places["config"])).replace("/tmp/tiny", str(places["tmp_tiny"]))
    command = command.replace("path/to/model", str(places["model"])).replace(".venv/bin/", bin_dir)
    command = re.sub(r"--port[= ]8000\b", f"--port={port}", command)
    first = command.split()[0]
    if not first.startswith("/") and (Path(PYTHON).parent / first).exists():
        command = bin_dir + command  # the venv's console scripts, as an activated venv would find them
    return command


def run_command(command: str, places: dict) -> dict:
    port = free_port()
    line = concrete(command, places, port)
    workdir = places["root"] / f"run-{abs(hash(command))}"
    workdir.mkdir(exist_ok=True)
    env = clean_env()
    start = time.monotonic()
    if re.search(r"\bvllm-metal-serve\b", line) and "--help" not in line:
        return {"line": line, **_serve(line, port, workdir, env), "seconds": time.monotonic() - start}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=str(workdir), env=env, capture_output=True,
                          text=True, timeout=900)
    return {"line": line, "status": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
            "seconds": time.monotonic() - start}


def _serve(line: str, port: int, workdir: Path, env: dict) -> dict:
    """Start the server, ask it through the OpenAI client, stop it."""
    import openai

    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", "exec " + line], cwd=str(workdir), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
        deadline = time.monotonic() + 900
        while True:  # bounded by the deadline
            if proc.poll() is not None:
                return {"status": proc.returncode, "stderr": log_path.read_text(errors="replace")[-6000:]}
            try:
                models = [m.id for m in client.models.list().data]
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    return {"status": "not healthy in 900 s", "stderr": log_path.read_text(errors="replace")[-6000:]}
                time.sleep(1)
        chat = client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": CITY_QUESTION}],
                                              max_tokens=16, temperature=0.0)
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                  "required": ["city"], "additionalProperties": False}
        structured = client.chat.completions.create(
            model=models[0], max_tokens=40, temperature=0.0,
            messages=[{"role": "user", "content": CITY_QUESTION + " Answer in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        choice = client.chat.completions.create(
            model=models[0], max_tokens=4, temperature=0.0, messages=[{"role": "user", "content": "Is Paris in France?"}],
            extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
        return {"status": 0, "models": models, "chat": chat.choices[0].message.content,
                "json": structured.choices[0].message.content, "choice": choice.choices[0].message.content,
                "stderr": ""}
    finally:
        kill_group(proc.pid)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def results(places, request):
    """The commands of the selected tests: setup commands first, then two at a time (a server or an engine
    start is mostly one core). Returns command -> result, filled as they finish."""
    selected = [item.callspec.params["command"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    runnable = [c for c in selected if not _not_run(c)]
    done = {c: run_command(c, places) for c in runnable if _setup(c)}
    rest = [c for c in runnable if not _setup(c)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done.update(zip(rest, pool.map(lambda c: run_command(c, places), rest)))
    print("\n[docs commands] seconds: " + json.dumps({c[:60]: round(r["seconds"], 1) for c, r in done.items()}))
    return done


def test_the_docs_show_commands():
    docs = {doc for doc, _ in COMMANDS}
    assert {"README.md", "docs/cli.md", "docs/writing-a-pass.md"} <= docs, docs
    assert any("vllm-metal-serve" in c and "--model=" in c for _, c in COMMANDS)
    assert any("vllm-metal-serve" in c and "--model" not in c and "--help" not in c for _, c in COMMANDS)
    assert any("vllm-metal-generate" in c and "--model=" in c for _, c in COMMANDS)
    assert any("vllm-metal-generate" in c and "--model" not in c for _, c in COMMANDS)


def _param(doc: str, command: str):
    return pytest.param(doc, command, marks=[pytest.mark.slow] if _slow(command) else [],
                        id=f"{doc}: {command[:50]}")


@pytest.mark.parametrize("doc, command", [_param(d, c) for d, c in COMMANDS])
def test_doc_command_works(doc, command, results):
    why = _not_run(command)
    if why:
        pytest.skip(f"not run inside the suite: {why}")
    r = results[command]
    assert r["status"] == 0, f"{doc}: `{r['line']}` exited {r['status']}\nstdout:\n{r.get('stdout', '')[-3000:]}\n" \
                             f"stderr:\n{r['stderr'][-3000:]}"
    if "models" in r:  # a server: the OpenAI client's answers
        assert "Paris" in r["chat"], r
        assert "city" in json.loads(r["json"]), r
        assert r["choice"] in ("yes", "no"), r
    elif "vllm-metal-generate" in command and CITY_QUESTION in command:
        assert "Paris" in r["stdout"].strip().splitlines()[-1], r["stdout"][-2000:]
