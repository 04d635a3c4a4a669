"""The commands the docs show, run for real: the docs show nothing that fails.

Commands are taken from the fenced ```bash blocks of the documents below and from `$ ` lines of their
other fenced blocks (transcripts). Placeholders become real things: `path/to/config.json` the tiny
Llama config of tests/test_cli.py, `path/to/model` the bundled SmolLM2 checkpoint, `.venv/bin/` the
venv of the tests, port 8000 a free port. A `vllm-metal-serve` command is started, asked through the
OpenAI client (the models list, a chat answer, structured output) and stopped. Every other command runs
to completion and must exit 0. The few commands that cannot run inside the suite (the installer, the
test suite itself) are listed in NOT_RUN with the reason; any other command of the docs runs.

This is also where `vllm-metal-serve` and `vllm-metal-generate` run end to end: with and without a
model, and in vLLM's `--flag=value` form (docs/cli.md shows both).
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
    ".venv/bin/python -m pytest": "the test suite itself",
}
CITY_QUESTION = "What is the capital of France?"


def doc_commands() -> list[tuple[str, str]]:
    """(document, command) for every command the docs show, in order, without duplicates."""
    found = []
    for doc in DOCS:
        lang, block = None, None
        for line in (REPO / doc).read_text().splitlines():
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
    seen, unique = set(), []
    for doc, command in found:  # the same command twice (README and docs/cli.md) runs once
        key = tuple(shlex.split(command.replace(".venv/bin/", ""), comments=True))
        if key not in seen:
            seen.add(key)
            unique.append((doc, command))
    return unique


def _not_run(command: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)


COMMANDS = doc_commands()


@pytest.fixture(scope="module")
def places(tmp_path_factory, smollm2_path):
    from test_cli import TINY

    root = tmp_path_factory.mktemp("docs_commands")
    (root / "tiny").mkdir()
    (root / "tiny" / "config.json").write_text(json.dumps(TINY))
    return {"root": root, "config": root / "tiny" / "config.json", "model": Path(smollm2_path)}


def concrete(command: str, places: dict, port: int) -> str:
    bin_dir = str(Path(PYTHON).parent) + "/"
    command = command.replace("path/to/config.json", str(places["config"]))
    command = command.replace("path/to/model", str(places["model"])).replace(".venv/bin/", bin_dir)
    command = re.sub(r"--port[= ]8000\b", f"--port={port}", command)
    first = shlex.split(command)[0]
    if not first.startswith("/") and (Path(PYTHON).parent / first).exists():
        command = bin_dir + command  # the venv's console scripts, as an activated venv would find them
    return command


def run_command(command: str, places: dict) -> dict:
    port = free_port()
    line = concrete(command, places, port)
    workdir = places["root"] / f"run-{abs(hash(command))}"
    workdir.mkdir()
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
def results(places):
    """Every runnable command, two at a time (a server start or an engine start is mostly one core)."""
    runnable = [c for _, c in COMMANDS if not _not_run(c)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(runnable, pool.map(lambda c: run_command(c, places), runnable)))
    print("\n[docs commands] seconds: " + json.dumps({c[:60]: round(r["seconds"], 1) for c, r in done.items()}))
    return done


def test_the_docs_show_commands():
    docs = {doc for doc, _ in COMMANDS}
    assert {"README.md", "docs/cli.md", "docs/writing-a-pass.md"} <= docs, docs
    assert any("vllm-metal-serve" in c and "--model=" in c for _, c in COMMANDS)
    assert any("vllm-metal-serve" in c and "--model" not in c and "--help" not in c for _, c in COMMANDS)
    assert any("vllm-metal-generate" in c and "--model=" in c for _, c in COMMANDS)
    assert any("vllm-metal-generate" in c and "--model" not in c for _, c in COMMANDS)


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}: {c[:50]}" for d, c in COMMANDS])
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
