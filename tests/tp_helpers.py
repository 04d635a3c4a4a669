"""Helpers of tests/test_parallel.py: tiny Llama checkpoints with 8 query heads, the prompts, and the engine
runner (run as `python tests/tp_helpers.py SPEC.json OUT.json` in a subprocess, bounded by the test).

The runner builds one `vllm.LLM` per checkpoint of the spec, one after the other in the same process (the engine
core in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`; at tensor_parallel_size 2 vLLM starts the two worker processes
itself), generates greedily with logprobs, asks every rank what it runs (`collective_rpc`), shuts the engine down
and writes one JSON document after each checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

HEADS = 8
VOCAB = 512
GREEDY_TOKENS = 24
# token-id prompts: short ones, one of several KV blocks, and one past the first chunk of a 256-token step budget
PROMPT_LENGTHS = [1, 3, 7, 12, 30, 61, 130, 300]
DP_REQUESTS = 32
DP_TOKENS = 8


def tiny_llama(path: Path, kv_heads: int, layers: int = 4, seed: int = 0) -> Path:
    """A random Llama checkpoint: 8 query heads of 32 dims, `kv_heads` KV heads, f32. Weights are drawn wider than
    transformers' default (std 0.05), so the greedy token wins by a margin rather than by rounding."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * 32, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=kv_heads, head_dim=32,
                      max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False,
                      initializer_range=0.05)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():  # norms at 1 +- noise, so the test sees their weights
        if p.dim() == 1:
            p.data = 1 + 0.1 * torch.randn_like(p)
    cfg.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


def prompts() -> list[list[int]]:
    import random

    rng = random.Random(7)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENGTHS]


def dp_prompts() -> list[list[int]]:
    """DP_REQUESTS prompts of 3 to 40 tokens."""
    import random

    rng = random.Random(11)
    return [[rng.randrange(3, VOCAB) for _ in range(3 + (7 * i) % 38)] for i in range(DP_REQUESTS)]


def _rank_facts(worker) -> dict:
    """What one rank runs: its place in the tensor-parallel group, its KV cache heads, its MLX group and the
    collectives of its lowered step (called on every worker by `collective_rpc`)."""
    from vllm.distributed import parallel_state

    from runtime import distributed

    worker = getattr(worker, "worker", worker)
    runner = worker.model_runner
    tp = parallel_state.get_tp_group()
    group = distributed._groups.get(tp.unique_name)
    source = runner._source or ""
    return {"tp_rank": tp.rank_in_group, "tp_size": tp.world_size, "pid": os.getpid(),
            "kv_heads": runner.lowered.layout.num_kv_heads, "cache_shape": list(runner.lowered.kv[0].shape),
            "mlx_group": None if group is None else [group.rank(), group.size()],
            "all_reduce": source.count("k.all_reduce("), "all_gather": source.count("k.all_gather(")}


def _gap(step: dict) -> float:
    top = sorted((lp.logprob for lp in step.values()), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def main(spec_path: str, out_path: str) -> int:
    import runtime  # noqa: F401  (the fast BLAS before mlx, as the plugin does)
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.model_executor.models import registry

    # vLLM inspects a new architecture in a fresh Python subprocess (to keep CUDA out of this one): there is none
    registry._run_in_subprocess = lambda fn: fn()
    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for name, job in spec["runs"].items():
        start, llm, entry = time.perf_counter(), None, {}
        try:
            llm = LLM(model=job["model"], dtype="float32", max_model_len=1024, skip_tokenizer_init=True, seed=0,
                      max_num_seqs=16, max_num_batched_tokens=256, tensor_parallel_size=spec["tp"])
            entry["start_s"] = round(time.perf_counter() - start, 1)
            t = time.perf_counter()
            params = SamplingParams(temperature=0.0, max_tokens=job["tokens"], ignore_eos=True, detokenize=False,
                                    logprobs=2)
            outputs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
            entry["generate_s"] = round(time.perf_counter() - t, 1)
            entry["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
            entry["logprobs"] = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                                 for o in outputs]
            entry["gaps"] = [[_gap(step) for step in o.outputs[0].logprobs] for o in outputs]
            entry["ranks"] = llm.collective_rpc(_rank_facts)
        except Exception as exc:  # recorded: the test shows it with the log tail
            entry["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()  # its worker processes with it
                del llm
            cleanup_dist_env_and_memory()
        entry["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = entry
        Path(out_path).write_text(json.dumps(results))  # after each run: a timeout keeps what is done
        print(f"run {name}: {json.dumps(entry)[:300]}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # vLLM's background threads need not finish


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
