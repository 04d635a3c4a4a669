"""llama.cpp (through llama-cpp-python) on a GGUF file: perplexity and batch-1 speed, one JSON line out.

Runs in llama-cpp-python's own virtual environment (benchmarks/llamacpp.py makes it on demand), never
in the project's: it imports only numpy, llama_cpp and benchmarks/perplexity_procedure.py. The token
ids come from the caller in a JSON file, so every system sees the same ids.

    $PY benchmarks/llamacpp_child.py perplexity --gguf F --tokens T.json --n-ctx 512 --threads 2
    $PY benchmarks/llamacpp_child.py speed --gguf F --tokens T.json --gen 128 --repeats 5 --threads 2

perplexity: benchmarks/perplexity_procedure.py's procedure; each window is `reset()` + `eval(window)` with
`logits_all=True` (one llama_decode of the whole window from an empty KV cache, as llama-perplexity
does), and the logits of every position go to the shared scoring code.
speed: prefill = one `eval` of the prompt from an empty cache; decode = `gen` greedy steps after it,
each one `eval` of one token + argmax of its logits (a host round trip per token, as ours does).
Median of `repeats` after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import llama_cpp
import numpy as np

from perplexity_procedure import perplexity


def load(args, n_ctx: int, logits_all: bool) -> llama_cpp.Llama:
    """llama.cpp's defaults otherwise: f16 KV cache; flash attention on, as its tools' "auto" resolves
    on a CPU (llama-cpp-python can only say on or off)."""
    return llama_cpp.Llama(model_path=args.gguf, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                           n_threads=args.threads, n_threads_batch=args.threads, logits_all=logits_all,
                           flash_attn=args.flash_attn, verbose=False)


def settings(llm: llama_cpp.Llama, args) -> dict:
    return {"llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "flash_attn": args.flash_attn,
            "n_ctx": llm.n_ctx(), "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """Logits of the last evaluated token (without logits_all, llama-cpp-python keeps none itself)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def run_perplexity(args, data: dict) -> dict:
    llm = load(args, args.n_ctx, logits_all=True)
    tokens = data["tokens"]
    own = llm.tokenize(data["text"].encode("utf-8"), add_bos=False, special=False) if "text" in data else None

    def logits(window: list[int]) -> np.ndarray:
        llm.reset()  # positions restart at 0; eval drops the cache beyond n_tokens
        llm.eval(window)
        return np.array(llm.scores[:len(window)], dtype=np.float32)

    start = time.perf_counter()
    result = perplexity(logits, tokens, args.n_ctx, add_bos=args.add_bos, bos=llm.token_bos(),
                        progress=lambda i, p: print(f"  window {i + 1}: PPL so far {p:.4f}", file=sys.stderr))
    out = result.as_dict()
    out.update(settings(llm, args), seconds=time.perf_counter() - start)
    if own is not None:
        out["own_tokenizer_agrees"] = own == tokens
        out["own_tokenizer_tokens"] = len(own)
    return out


def run_speed(args, data: dict) -> dict:
    prompt = data["tokens"]
    llm = load(args, len(prompt) + args.gen + 8, logits_all=False)

    def once() -> tuple[float, float, list[int]]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        row = last_logits(llm)
        t_prefill = time.perf_counter() - t
        out = []
        t = time.perf_counter()
        for _ in range(args.gen):
            token = int(np.argmax(row))
            out.append(token)
            llm.eval([token])
            row = last_logits(llm)
        t_decode = time.perf_counter() - t
        return len(prompt) / t_prefill, args.gen / t_decode, out

    once()  # warm-up: first-touch of the weights, thread pool start
    prefill, decode, tokens = [], [], None
    for _ in range(args.repeats):
        p, d, tokens = once()
        prefill.append(p)
        decode.append(d)
    out = settings(llm, args)
    out.update(prompt=len(prompt), gen=args.gen, repeats=args.repeats,
               prefill_tok_s={"median": statistics.median(prefill), "min": min(prefill), "max": max(prefill),
                              "values": prefill},
               decode_tok_s={"median": statistics.median(decode), "min": min(decode), "max": max(decode),
                             "values": decode},
               generated=tokens[:16])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["perplexity", "speed"])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--tokens", required=True, help="JSON file: {'tokens': [...], 'text': optional}")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--add-bos", action="store_true")
    parser.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with open(args.tokens) as f:
        data = json.load(f)
    result = run_perplexity(args, data) if args.command == "perplexity" else run_speed(args, data)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
