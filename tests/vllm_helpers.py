"""Helpers shared by tests/test_plugin.py and tests/test_server.py: real vLLM engines and servers,
each in its own subprocess, bounded in time.

Two halves:
- The test side (`start_engine`, `EngineRun`, `start_server`, `Server`, `free_port`, `clean_env`):
  launches `python tests/vllm_helpers.py SPEC.json OUT.json` (the venv's python), or the
  OpenAI-compatible server, with a clean environment, logs to a file, and hard time limits.
- The runner side (`main` and the `task_*` functions): runs inside the engine subprocess. It builds
  `vllm.LLM(**spec["llm"])`, runs the requested tasks (several checks per engine start, since a start
  costs ~30-50 s here) and writes one JSON document with the raw results (token ids, logprobs,
  prefix-cache counters, platform classes, timings). The tests do the asserting.

Prompts are token-id prompts built from the model's own tokenizer (`build_prompts`), so vLLM,
the built-in CPU platform and transformers see exactly the same input ids.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_VENV_PY = REPO / ".venv" / "bin" / "python"
PYTHON = str(_VENV_PY) if _VENV_PY.exists() else sys.executable

# Settings that would change which platform vLLM picks or how the plugin runs: a "no env var" run
# starts without any of them; scenarios add back exactly what they test.
_SWITCHES = ("VLLM_PLUGINS", "VLLM_TARGET_DEVICE", "VLLM_METAL_USE_MLX", "VLLM_METAL_MEMORY_FRACTION",
             "VLLM_METAL_BLOCK_SIZE", "VLLM_METAL_DEBUG", "VLLM_MLX_DEVICE", "VLLM_CPU_KVCACHE_SPACE",
             "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_ENABLE_V1_MULTIPROCESSING")

PLATFORM_LOG_LINE = "vllm-metal: MLX platform active"
METAL_PLATFORM = "vllm_metal_plugin.platform.MetalPlatform"
CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"

# --------------------------------------------------------------------------------------------------
# Prompts (shared by both sides)
# --------------------------------------------------------------------------------------------------
GREEDY_CHAT = ["What is the capital of France?", "Write a haiku about the sea.",
               "Explain photosynthesis in one sentence.", "List three prime numbers."]
GREEDY_RAW = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a small village,",
              "The theory of relativity states that"]
_FILLER = ("You are a meticulous assistant for a public library. You answer questions about opening hours, "
           "borrowing rules, late fees, interlibrary loans, reading rooms, printing, and events for children "
           "and adults. Always answer politely, briefly and precisely; when you do not know, say so and "
           "suggest asking the front desk. The library opens at nine in the morning on weekdays and at ten "
           "on Saturdays, it is closed on Sundays and public holidays, members may borrow up to twelve items "
           "for three weeks, renewals are possible twice unless another member reserved the item, late fees "
           "are twenty cents per day and item, and printing costs ten cents per page in black and white. ")
SYSTEM_PROMPT_TOKENS = 200
LONG_PROMPT_TOKENS = 1500
NUM_PREFIX_REQUESTS = 16
NUM_MIXED = 32


def build_prompts(tokenizer) -> dict:
    """All prompts as lists of token ids (same for every engine and for transformers)."""
    greedy = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False) for q in GREEDY_CHAT]
    greedy = [list(g["input_ids"]) if isinstance(g, dict) or hasattr(g, "keys") else list(g) for g in greedy]
    greedy += [tokenizer(t).input_ids for t in GREEDY_RAW]

    text = (_FILLER * 4)
    system = tokenizer(text).input_ids[:SYSTEM_PROMPT_TOKENS]
    assert len(system) == SYSTEM_PROMPT_TOKENS
    prefix = [system + tokenizer(f"\nQuestion {i}: what happens if I return book number {i * 7 + 3} "
                                 f"{i + 1} days late? Answer:").input_ids for i in range(NUM_PREFIX_REQUESTS)]

    # Mixed lengths 1..200 tokens: a deterministic mix of short and long prompts.
    corpus = tokenizer((_FILLER + " ".join(GREEDY_RAW + GREEDY_CHAT)) * 4).input_ids
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 200, 7, 17, 27, 37, 47, 64, 96, 128, 4, 11, 19, 42,
               77, 111, 150, 6, 9, 15, 24, 70]
    assert len(lengths) == NUM_MIXED
    mixed = [corpus[(i * 37) % 200:(i * 37) % 200 + n] for i, n in enumerate(lengths)]
    long = tokenizer(" ".join(f"{i}. {_FILLER}" for i in range(20))).input_ids[:LONG_PROMPT_TOKENS]
    assert len(long) == LONG_PROMPT_TOKENS
    return {"greedy": greedy, "prefix": prefix, "mixed": mixed, "long": [long]}


# --------------------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------------------
def kill_group(pgid: int) -> None:
    """SIGKILL a process group (a subprocess started in its own session, and vLLM's engine core and
    workers under it), if anything of it is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def clean_env(**overrides: str | None) -> dict:
    """os.environ without the platform switches, plus `overrides` (None removes)."""
    env = {k: v for k, v in os.environ.items() if k not in _SWITCHES}
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # lets the runner send a callable to the worker
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.get("VLLM_RPC_BASE_PATH"):
        os.makedirs(env["VLLM_RPC_BASE_PATH"], exist_ok=True)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


class EngineRun:
    """One engine subprocess: its spec, log file and result file."""

    def __init__(self, name: str, spec: dict, env: dict, workdir: Path, timeout: float):
        self.name, self.spec, self.timeout = name, spec, timeout
        workdir.mkdir(parents=True, exist_ok=True)
        self.spec_path = workdir / f"{name}.spec.json"
        self.out_path = workdir / f"{name}.out.json"
        self.log_path = workdir / f"{name}.log"
        self.spec_path.write_text(json.dumps(spec))
        self.started = time.monotonic()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([PYTHON, str(Path(__file__).resolve()), str(self.spec_path), str(self.out_path)],
                                     cwd=str(REPO), env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._result = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_contains(self, text: str) -> bool:
        try:
            return text in self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc.pid)  # its own session: the engine core and worker too
            self.proc.wait(timeout=30)

    def result(self) -> dict:
        """Wait (bounded) for the subprocess; return its JSON (with 'log' and 'wall_s' added)."""
        if self._result is not None:
            return self._result
        left = self.timeout - (time.monotonic() - self.started)
        try:
            self.proc.wait(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"engine run {self.name!r} exceeded {self.timeout:.0f} s; log tail:\n"
                                 + self.log()[-4000:])
        finally:
            self._log.close()
        wall = time.monotonic() - self.started
        kill_group(self.proc.pid)  # sessions left behind by the engine (worker processes) go with it
        if not self.out_path.exists():
            raise AssertionError(f"engine run {self.name!r} exited {self.proc.returncode} without a result; "
                                 "log tail:\n" + self.log()[-6000:])
        out = json.loads(self.out_path.read_text())
        if out.get("error"):
            raise AssertionError(f"engine run {self.name!r} failed: {out['error']}\nlog tail:\n" + self.log()[-4000:])
        out["log"] = self.log()
        out["wall_s"] = wall
        self._result = out
        return out


def start_engine(name: str, spec: dict, workdir: Path, env: dict | None = None, timeout: float = 300) -> EngineRun:
    return EngineRun(name, spec, env if env is not None else clean_env(), workdir, timeout)


class EnginePool:
    """Runs queued engine subprocesses, at most `parallel` at a time, in submission order (a run
    whose `after` condition does not hold yet lets the next one go first).

    Two at a time suits this 2-core machine: an engine's start-up is mostly single-threaded Python,
    so two overlap well; more only thrash. A background thread starts the next run when one ends
    (bounded by `deadline_s`); `get(name)` waits for a run's start and then for its result.
    """

    def __init__(self, workdir: Path, parallel: int = 2, deadline_s: float = 900):
        import threading

        self.workdir, self.parallel = workdir, parallel
        self.queue: list[tuple] = []
        self.runs: dict[str, EngineRun] = {}
        self.started = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + deadline_s
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def submit(self, name, spec, env=None, timeout=300, after=None):
        """`after`: a callable returning True once this run may start (checked with the slot free)."""
        import threading

        self.started[name] = threading.Event()
        self.queue.append((name, spec, env, timeout, after))

    def start(self):
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                running = sum(1 for r in self.runs.values() if r.proc.poll() is None)
                if self.queue and running < self.parallel:
                    # The first queued run that may start now (a waiting run does not block the rest).
                    ready = next((i for i, item in enumerate(self.queue) if item[4] is None or item[4](self)), None)
                    if ready is not None:
                        name, spec, env, timeout, _ = self.queue.pop(ready)
                        self.runs[name] = start_engine(name, spec, self.workdir, env, timeout)
                        self.started[name].set()
                        continue
                if not self.queue:
                    return
            time.sleep(0.5)

    def get(self, name: str) -> dict:
        if not self.started[name].wait(timeout=max(self._deadline - time.monotonic(), 1)):
            raise AssertionError(f"engine run {name!r} never started (pool deadline)")
        return self.runs[name].result()

    def stop(self):
        self._stop.set()
        with self._lock:
            self.queue.clear()
            for run in self.runs.values():
                run.kill()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The OpenAI-compatible server as a subprocess on 127.0.0.1 (killed with its process group)."""

    def __init__(self, model: str, workdir: Path, extra: list[str] | None = None, env: dict | None = None,
                 served_name: str = "smollm2"):
        self.port = free_port()
        self.model, self.served_name = model, served_name
        self.base_url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"server-{self.port}.log"
        script = Path(PYTHON).parent / "vllm-metal-serve"
        args = ["--model", model, "--served-model-name", served_name, "--dtype", "float32",
                "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(self.port), *(extra or [])]
        if script.exists():
            self.command = [str(script), *args]
        else:
            self.command = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", *args]
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command, cwd=str(REPO), env=env if env is not None else clean_env(),
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.start_s = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 180) -> float:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded: at most timeout / 0.5 polls
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode} during start-up:\n{self.log()[-6000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.start_s = time.monotonic() - self.started
                        return self.start_s
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not healthy after {timeout:.0f} s:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        kill_group(self.proc.pid)  # whatever is left of the group (engine core, worker)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


# --------------------------------------------------------------------------------------------------
# Comparison helpers (test side)
# --------------------------------------------------------------------------------------------------
def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def near_tie_gaps(model_path: str, prefixes: list[list[int]], workdir: Path, timeout: float = 240) -> list[dict]:
    """transformers (f32) top-2 logits at the end of each prefix: [{top2_ids, top2_logits, gap}], in a subprocess."""
    run = start_engine("near_tie", {"model": model_path, "tasks": ["gaps"], "prefixes": prefixes}, workdir,
                       timeout=timeout)
    return run.result()["gaps"]["gaps"]


# --------------------------------------------------------------------------------------------------
# Runner side (inside the engine subprocess)
# --------------------------------------------------------------------------------------------------
def _outputs(results) -> list[dict]:
    out = []
    for r in results:
        c = r.outputs[0]
        item = {"token_ids": list(c.token_ids), "text": c.text, "num_cached_tokens": r.num_cached_tokens}
        if c.logprobs is not None:
            item["logprobs"] = [{str(t): [lp.logprob, lp.rank] for t, lp in step.items()} for step in c.logprobs]
        out.append(item)
    return out


def _metrics(llm) -> dict:
    found = {}
    for m in llm.get_metrics():
        if "prefix_cache" in m.name and hasattr(m, "value"):
            found[m.name] = found.get(m.name, 0) + m.value
    return found


def _worker_facts(worker) -> dict:
    from vllm.platforms import current_platform

    worker = getattr(worker, "worker", worker)  # vLLM wraps the platform's worker in WorkerWrapperBase
    runner = getattr(worker, "model_runner", None)
    return {
        "platform": f"{type(current_platform).__module__}.{type(current_platform).__qualname__}",
        "worker": f"{type(worker).__module__}.{type(worker).__qualname__}",
        "model_runner": f"{type(runner).__module__}.{type(runner).__qualname__}",
        "mlx_step_built": getattr(runner, "lowered", None) is not None,
    }


def task_platform(llm, prompts, spec) -> dict:
    from vllm.platforms import current_platform

    return {"main_process": f"{type(current_platform).__module__}.{type(current_platform).__qualname__}",
            "workers": llm.collective_rpc(_worker_facts)}


def task_greedy(llm, prompts, spec) -> dict:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=spec.get("greedy_tokens", 48), ignore_eos=True,
                        logprobs=spec.get("logprobs", 5))
    res = llm.generate([{"prompt_token_ids": p} for p in prompts["greedy"]], sp, use_tqdm=False)
    return {"outputs": _outputs(res)}


def task_long(llm, prompts, spec) -> dict:
    """Greedy tokens after the LONG_PROMPT_TOKENS-token prompt."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=spec.get("greedy_tokens", 24), ignore_eos=True,
                        logprobs=spec.get("logprobs", 5))
    return {"outputs": _outputs(llm.generate([{"prompt_token_ids": p} for p in prompts["long"]], sp,
                                             use_tqdm=False))}


def task_mixed(llm, prompts, spec) -> dict:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=spec.get("mixed_tokens", 4), ignore_eos=True)
    reqs = [{"prompt_token_ids": p} for p in prompts["mixed"]]
    t = time.perf_counter()
    together = _outputs(llm.generate(reqs, sp, use_tqdm=False))
    t_together = time.perf_counter() - t
    t = time.perf_counter()
    alone = [_outputs(llm.generate([r], sp, use_tqdm=False))[0] for r in reqs]
    return {"together": together, "alone": alone, "together_s": t_together, "alone_s": time.perf_counter() - t}


def task_prefix(llm, prompts, spec) -> dict:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=spec.get("prefix_tokens", 4), ignore_eos=True)
    reqs = [{"prompt_token_ids": p} for p in prompts["prefix"]]
    stats = spec.get("stats", False)
    before = _metrics(llm) if stats else {}
    warm = _outputs(llm.generate(reqs[:1], sp, use_tqdm=False))  # fills the cache with the system prompt
    mid = _metrics(llm) if stats else {}
    batch = _outputs(llm.generate(reqs, sp, use_tqdm=False))     # all 16 together: should hit
    after = _metrics(llm) if stats else {}
    return {"warm": warm, "outputs": batch, "metrics_before": before, "metrics_mid": mid, "metrics_after": after}


def task_sampling(llm, prompts, spec) -> dict:
    from vllm import SamplingParams

    n = spec.get("sampling_prompts", 2)
    reqs = [{"prompt_token_ids": p} for p in prompts["greedy"][:n]]
    kw = dict(temperature=0.8, top_p=0.9, top_k=40, max_tokens=spec.get("sampling_tokens", 12), ignore_eos=True)
    params = [SamplingParams(seed=1234, **kw)] * n + [SamplingParams(seed=99, **kw)] * n
    calls = [_outputs(llm.generate(reqs + reqs, params, use_tqdm=False)) for _ in range(2)]
    return {"call1": [o["token_ids"] for o in calls[0]], "call2": [o["token_ids"] for o in calls[1]], "n": n}


def task_hf(llm, prompts, spec) -> dict:
    """transformers `generate`, greedy f32, the greedy prompts batched with left padding."""
    import torch
    from transformers import AutoModelForCausalLM

    # One thread: next to an engine process on 2 cores, torch's spinning OpenMP threads made this
    # ~30x slower (122 s vs ~4 s for 8x48 tokens).
    torch.set_num_threads(spec.get("threads", 1))
    model = _hf_model(spec["model"])
    ids = prompts["greedy"]
    width = max(map(len, ids))
    pad = 0
    inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        out = model.generate(inp, attention_mask=mask, max_new_tokens=spec.get("greedy_tokens", 48), do_sample=False,
                             pad_token_id=pad, eos_token_id=None)
    return {"outputs": [row[width:].tolist() for row in out]}


_HF = {}


def _hf_model(path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    if (path, dtype) not in _HF:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.eval()
        model.generation_config.eos_token_id = None  # 48 tokens always, like vLLM's ignore_eos
        _HF[path, dtype] = model
    return _HF[path, dtype]


def task_gaps(llm, prompts, spec) -> dict:
    import torch

    model = _hf_model(spec["model"])
    gaps = []
    with torch.no_grad():
        for p in spec["prefixes"]:
            logits = model(torch.tensor([p])).logits[0, -1].float()
            top = torch.topk(logits, 2)
            gaps.append({"top2_ids": top.indices.tolist(), "top2_logits": top.values.tolist(),
                         "gap": float(top.values[0] - top.values[1])})
    return {"gaps": gaps}


def task_dtype_gaps(llm, prompts, spec) -> dict:
    """At the end of each prefix: transformers' float32 logits of two candidate tokens, and how far its own
    logits in `spec["dtype"]` are from its float32 ones (max abs, with max |logit| in float32)."""
    import torch

    f32 = _hf_model(spec["model"])
    low = _hf_model(spec["model"], getattr(torch, spec["dtype"]))
    out = []
    with torch.no_grad():
        for p, pair in zip(spec["prefixes"], spec["candidates"]):
            ref = f32(torch.tensor([p])).logits[0, -1].float()
            own = low(torch.tensor([p])).logits[0, -1].float()
            out.append({"logits": [float(ref[t]) for t in pair], "dtype_err": float((own - ref).abs().max()),
                        "max_logit": float(ref.abs().max())})
    return {"gaps": out}


TASKS = {"platform": task_platform, "greedy": task_greedy, "long": task_long, "mixed": task_mixed,
         "prefix": task_prefix, "sampling": task_sampling, "hf": task_hf, "gaps": task_gaps,
         "dtype_gaps": task_dtype_gaps}
_NEEDS_LLM = {"platform", "greedy", "long", "mixed", "prefix", "sampling"}


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"timings": {}}
    t0 = time.perf_counter()
    try:
        import runtime  # noqa: F401  (the fast BLAS before mlx, as the plugin does)
        from transformers import AutoTokenizer

        prompts = build_prompts(AutoTokenizer.from_pretrained(spec["model"]))
        result["timings"]["import_s"] = time.perf_counter() - t0
        llm = None
        if _NEEDS_LLM & set(spec["tasks"]):
            from vllm import LLM

            t = time.perf_counter()
            llm = LLM(model=spec["model"], **spec.get("llm", {}))
            result["timings"]["engine_start_s"] = time.perf_counter() - t
        for name in spec["tasks"]:
            if llm is not None and name not in _NEEDS_LLM:
                # Shut the engine down first: its worker pins threads to every core and spins on
                # shared memory, which starves transformers in this process.
                t = time.perf_counter()
                llm.llm_engine.engine_core.shutdown()
                llm = None
                result["timings"]["shutdown_s"] = time.perf_counter() - t
            t = time.perf_counter()
            result[name] = TASKS[name](llm, prompts, spec)
            result["timings"][name + "_s"] = time.perf_counter() - t
    except BaseException as e:  # reported to the test, which shows the log tail
        import traceback

        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    result["timings"]["total_s"] = time.perf_counter() - t0
    Path(out_path).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # do not wait for vLLM's background threads; the test kills the process group anyway


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
