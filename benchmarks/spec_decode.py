"""n-gram speculative decoding through vLLM: acceptance and speed against plain decoding, on SmolLM2.

    .venv/bin/python benchmarks/spec_decode.py                   # this plugin (MLX)
    .venv/bin/python benchmarks/spec_decode.py --platform cpu    # vLLM's built-in CPU platform (eager)
    .venv/bin/python benchmarks/spec_decode.py --out results.json

One process (the platform is chosen by the environment it sets before importing vLLM), two in-process
engines one after the other (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): plain, then n-gram speculation (after
an engine with speculation vLLM cannot build another in the same process, so the two cannot alternate).
Each engine warms up, then runs the same greedy requests `--repeats` times: one request at a time
(batch 1, where speculation is meant to pay) and all together. Prompts are chat questions, half of them
asking to repeat or continue text (what the n-gram proposer can find), and code/number continuations.
Reported: generated tokens per second (median over repeats), speculative over plain, the proposer's
acceptance (accepted / proposed draft tokens) and accepted tokens per verification, the greedy tokens
of both engines compared; with the plugin also the MLX step's median time by tokens per step (a
verification step of one sequence holds 1 + k tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

CHAT = ["Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi.",
        "Copy the following sentence twice: The quick brown fox jumps over the lazy dog near the river.",
        "Rewrite this sentence in the past tense: I walk to the market, I buy bread, I walk home.",
        "Continue the pattern: red, green, blue, red, green, blue, red, green,",
        "What is the capital of France?", "Write a Python function that returns the square of a number.",
        "List the days of the week.", "Explain photosynthesis in one sentence."]
RAW = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
       "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", choices=["plugin", "cpu"], default="plugin")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request (greedy, EOS ends earlier)")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="bench-rpc-"))
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="bench-vllm-cache-"))
    if args.platform == "cpu":
        os.environ.update(VLLM_PLUGINS="none", VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    import runtime  # noqa: F401  (the fast BLAS before mlx)
    from runtime.models import prepare

    path = str(prepare("smollm2"))
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(path)
    prompts = []
    for q in CHAT:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        prompts.append({"prompt_token_ids": list(ids["input_ids"] if hasattr(ids, "keys") else ids)})
    prompts += [{"prompt_token_ids": tok(t).input_ids} for t in RAW]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    base = dict(model=path, dtype="float32", max_model_len=1024, max_num_seqs=len(prompts), seed=0,
                disable_log_stats=False, enable_prefix_caching=False)
    if args.platform == "cpu":
        base["enforce_eager"] = True
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}

    results = {"platform": args.platform, "tokens": args.tokens, "k": args.k, "repeats": args.repeats,
               "load_before": os.getloadavg()}
    for name, extra in (("plain", {}), ("ngram", {"speculative_config": ngram})):
        t = time.perf_counter()
        llm = LLM(**base, **extra)
        entry = {"start_s": time.perf_counter() - t}
        steps = _time_steps(llm)
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
        before = _counters(llm)
        runs = {"alone": [], "together": []}
        for _ in range(args.repeats):
            if steps is not None:
                steps.clear()
            t = time.perf_counter()
            alone = [list(llm.generate([q], params, use_tqdm=False)[0].outputs[0].token_ids) for q in prompts]
            runs["alone"].append(time.perf_counter() - t)
            t = time.perf_counter()
            together = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
            runs["together"].append(time.perf_counter() - t)
        after = _counters(llm)
        entry["generated"] = {"alone": sum(map(len, alone)), "together": sum(map(len, together))}
        entry["tokens"] = {"alone": alone, "together": together}
        entry["seconds"] = runs
        entry["tok_s"] = {k: entry["generated"][k] / statistics.median(v) for k, v in runs.items()}
        entry["spec"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        if steps is not None:  # the last repeat's MLX steps, by tokens per step
            by_size = defaultdict(list)
            for n, s in steps:
                by_size[n].append(s)
            entry["step_ms"] = {n: {"steps": len(v), "median_ms": 1e3 * statistics.median(v)}
                                for n, v in sorted(by_size.items())}
        results[name] = entry
        print(f"{name}: {json.dumps({k: v for k, v in entry.items() if k != 'tokens'})}", flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm

    plain, spec = results["plain"], results["ngram"]
    drafted = spec["spec"].get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = spec["spec"].get("vllm:spec_decode_num_accepted_tokens", 0)
    drafts = spec["spec"].get("vllm:spec_decode_num_drafts", 0)
    results["summary"] = {
        "identical_tokens": plain["tokens"] == spec["tokens"],
        "acceptance": accepted / drafted if drafted else None,
        "accepted_per_verification": accepted / drafts if drafts else None,
        "speedup_alone": spec["tok_s"]["alone"] / plain["tok_s"]["alone"],
        "speedup_together": spec["tok_s"]["together"] / plain["tok_s"]["together"],
        "load_after": os.getloadavg(),
    }
    print(json.dumps(results["summary"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    sys.stdout.flush()
    os._exit(0)  # vLLM's background threads need not finish


def _counters(llm) -> dict:
    found = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") and isinstance(getattr(m, "value", None), (int, float)):
            found[m.name] = found.get(m.name, 0) + m.value
    return found


def _time_steps(llm):
    """Wrap the plugin runner's MLX step to record (tokens, seconds) per step; None on other platforms."""
    try:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    except AttributeError:
        return None
    if not hasattr(runner, "run_step"):
        return None
    record, inner = [], runner.run_step

    def timed(step):
        t = time.perf_counter()
        out = inner(step)
        record.append((len(step.input_ids), time.perf_counter() - t))
        return out

    runner.run_step = timed
    return record


if __name__ == "__main__":
    sys.exit(main())
