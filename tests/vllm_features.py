"""What vLLM users rely on, run through real engines: the runner behind tests/test_vllm_features.py.

`run_platform(name, engines, ...)` (test side) starts `python tests/vllm_features.py SPEC OUT` with one
platform's environment (the plugin, or vLLM's built-in CPU platform with `VLLM_PLUGINS=none`). That
process builds its engines one after the other, in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: a start
costs seconds instead of ~30 s), runs each engine's tasks and writes one JSON document of raw results;
the tests compare them. Each task records an error instead of raising, so one failure does not hide
the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_helpers import PYTHON, REPO, clean_env, kill_group  # noqa: E402

CHAT = ["What is the capital of France?", "Name three colours of the rainbow.",
        "Write one sentence about the sea.", "What is two plus two?"]
RAW = ["The quick brown fox", "def fibonacci(n):"]
# ngram speculation proposes tokens that continue an earlier n-gram of the sequence: prompts that copy
# text give it something to find, the others show what it does on ordinary chat.
SPEC_CHAT = ["Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi.",
             "Copy the following sentence twice: The quick brown fox jumps over the lazy dog near the river.",
             "What is the capital of France?", "Write a Python function that returns the square of a number.",
             "List the days of the week.", "Explain photosynthesis in one sentence."]
SPEC_RAW = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
            "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"]
# Bounded, so that even a random model's answer closes within max_tokens.
CAT_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
CODE_REGEX = r"[A-Z]{3}-[0-9]{4}"
CHOICES = ["yes", "no", "maybe"]
STRUCTURED = {
    "json": ("Describe a cat as JSON with a name and an age.", {"json": CAT_SCHEMA}),
    "regex": ("Invent a product code.", {"regex": CODE_REGEX}),
    "choice": ("Is the sky blue? Answer yes, no or maybe.", {"choice": CHOICES}),
}
EMBED_TEXTS = ["The capital of France is Paris.", "Cats are small domesticated mammals.", "def f(x): return x"]


# --------------------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------------------
def tiny_chat_llama(path: Path, tokenizer_dir: str) -> Path:
    """A tiny random Llama (2 layers, hidden 64, head_dim 32: vLLM's CPU attention needs >= 32) with the
    tokenizer and chat template of `tokenizer_dir` (SmolLM2's), so chat, stop strings and grammars work
    as on the real model at a fraction of its cost. Its output head is scaled up so next-token
    distributions are peaked: greedy choices are clear, not near-ties of a near-uniform distribution."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    if (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    real = AutoConfig.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=real.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=real.bos_token_id,
                      eos_token_id=real.eos_token_id, pad_token_id=getattr(real, "pad_token_id", None))
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norms at 1 +- noise
            p.data = 1 + 0.1 * torch.randn_like(p)
    model.lm_head.weight.data *= 25
    cfg.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, path / name)
    return path


def run_platform(name: str, engines: list[dict], model: str, workdir: Path, env: dict, timeout: float) -> dict:
    """One platform's engines in one subprocess; returns {engine name: results} (plus "_log"). An engine
    runs `model` unless it names its own ("model")."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps({"model": model, "engines": engines}))
    env = dict(env, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([PYTHON, str(Path(__file__).resolve()), str(spec_path), str(out_path)],
                                cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            kill_group(proc.pid)
            proc.wait()
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result["_log"] = log_path.read_text(errors="replace")
    return result


def platform_env(platform: str) -> dict:
    if platform == "cpu":  # vLLM's built-in CPU platform, its best settings on this 2-core box
        return clean_env(VLLM_PLUGINS="none", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    return clean_env()


# --------------------------------------------------------------------------------------------------
# Runner side (inside the subprocess)
# --------------------------------------------------------------------------------------------------
def _ids(tokenizer, texts_chat, texts_raw) -> list[list[int]]:
    out = []
    for q in texts_chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out + [tokenizer(t).input_ids for t in texts_raw]


def _completions(outputs) -> list[list[dict]]:
    return [[{"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason,
              "stop_reason": c.stop_reason} for c in o.outputs] for o in outputs]


def task_features(llm, tokenizer, spec) -> dict:
    """Prompt logprobs, n > 1, stop strings and stop token ids, max_tokens, seeds."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for p in _ids(tokenizer, CHAT, RAW)]
    out = {}
    res = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2), use_tqdm=False)
    out["prompt_logprobs"] = [[None if step is None else {str(t): lp.logprob for t, lp in step.items()}
                               for step in r.prompt_logprobs] for r in res]
    out["prompt_ids"] = [list(r.prompt_token_ids) for r in res]
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)
    out["n3"] = _completions(llm.generate(prompts[:3], params, use_tqdm=False))
    greedy = _completions(llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False))
    out["greedy"] = greedy
    # Stop strings taken from each greedy answer (the word at about a third of it), so they do occur.
    stops = []
    for g in greedy:
        words = [w for w in g[0]["text"].split() if w.strip(".,:;!?\"'()")]
        stops.append(words[len(words) // 3] if words else "\n")
    out["stop_strings"] = stops
    out["stop"] = _completions(llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=24, stop=[s])
                                                      for s in stops], use_tqdm=False))
    out["stop_included"] = _completions(llm.generate(
        prompts, [SamplingParams(temperature=0.0, max_tokens=24, stop=[s], include_stop_str_in_output=True)
                  for s in stops], use_tqdm=False))
    stop_ids = [g[0]["token_ids"][len(g[0]["token_ids"]) // 2] for g in greedy]
    out["stop_token_ids"] = stop_ids
    out["stop_token"] = _completions(llm.generate(
        prompts, [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[t]) for t in stop_ids],
        use_tqdm=False))
    out["max_tokens"] = _completions(llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5),
                                                  use_tqdm=False))
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True) for s in (1234, 1234, 99)]
    out["seeds"] = [_completions(llm.generate(prompts[:2], p, use_tqdm=False)) for p in seeded]
    return out


def task_structured(llm, tokenizer, spec) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    out = {}
    for kind, (question, constraint) in STRUCTURED.items():
        params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=StructuredOutputsParams(**constraint))
        res = llm.chat([[{"role": "user", "content": question}]], params, use_tqdm=False)
        out[kind] = {"text": res[0].outputs[0].text, "finish_reason": res[0].outputs[0].finish_reason}
    return out


def task_greedy(llm, tokenizer, spec) -> dict:
    """The speculative-decoding prompts, greedy: one at a time (batch 1, where speculation pays) and all
    together; wall time of each and vLLM's speculative-decoding counters."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for p in _ids(tokenizer, SPEC_CHAT, SPEC_RAW)]
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("tokens", 48), ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    before = _spec_metrics(llm)
    t = time.perf_counter()
    alone = [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
    alone_s = time.perf_counter() - t
    t = time.perf_counter()
    together = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    together_s = time.perf_counter() - t
    after = _spec_metrics(llm)
    return {"alone": alone, "together": together, "alone_s": alone_s, "together_s": together_s,
            "spec": {k: after.get(k, 0) - before.get(k, 0) for k in after}}


def _spec_metrics(llm) -> dict:
    found = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") and isinstance(getattr(m, "value", None), (int, float)):
            found[m.name] = found.get(m.name, 0) + m.value
    return found


def task_embed(llm, tokenizer, spec) -> dict:
    return {"vectors": [list(map(float, o.outputs.embedding)) for o in llm.embed(EMBED_TEXTS, use_tqdm=False)]}


TASKS = {"features": task_features, "structured": task_structured, "greedy": task_greedy, "embed": task_embed}


def main(spec_path: str, out_path: str) -> int:
    import runtime  # noqa: F401  (the fast BLAS before mlx, as the plugin does)
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from vllm_metal_plugin.startup import one_line_error

    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for engine in spec["engines"]:
        entry, llm, start = {}, None, time.perf_counter()
        saved = {k: os.environ.get(k) for k in engine.get("env", {})}
        os.environ.update(engine.get("env", {}))
        model = engine.get("model", spec["model"])
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
            llm = LLM(model=model, **engine["llm"])
            entry["start_s"] = time.perf_counter() - start
            for name in engine["tasks"]:
                t = time.perf_counter()
                try:
                    entry[name] = TASKS[name](llm, tokenizer, engine)
                except Exception as exc:  # noqa: BLE001  recorded; the test shows it
                    entry[name] = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
                entry[name + "_s"] = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001  an engine that does not start says why
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["one_line"] = one_line_error(exc)
            traceback.print_exc()
        finally:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
                del llm
                cleanup_dist_env_and_memory()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        entry["total_s"] = time.perf_counter() - start
        results[engine["name"]] = entry
        Path(out_path).write_text(json.dumps(results))  # after each engine: a timeout keeps what is done
        print(f"engine {engine['name']}: {entry.get('error', 'ok')} ({entry['total_s']:.1f} s)", flush=True)
    sys.stdout.flush()
    os._exit(0)  # vLLM's background threads need not finish


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
