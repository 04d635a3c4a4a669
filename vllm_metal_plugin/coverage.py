"""Architecture coverage: tiny random configs of common decoder families, lowered through each front
end and compared with a reference run eagerly (prefill, then decode steps), plus greedy generation
through the real vLLM engine with this plugin against vLLM's built-in CPU platform.

    python -m vllm_metal_plugin.coverage            # runs the matrix and the engines, rewrites docs/models.md

tests/test_coverage.py runs the same checks; nothing here is per-model code in the lowering.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Positions reach past 4096 (a 4090-token prompt, then decode steps): a RoPE frequency off by one turn over
# the positions it was read at is only visible far out, where real prompts go.
PROMPT, DECODE = 4090, 4
_MAX_POSITIONS = 4096
_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=_MAX_POSITIONS)

# family -> (model_type, config overrides). head_dim 32 everywhere: vLLM's CPU attention needs >= 32
# (the engine comparison runs every family on vLLM's built-in CPU platform too).
FAMILIES = {
    "llama": ("llama", {}),
    # scaled contexts of 8 x 512 = 4096 positions: the prompt reaches the end of them
    "llama3-rope-scaling": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 512})),
    "qwen2-yarn": ("qwen2", dict(hidden_size=128, rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                                                "original_max_position_embeddings": 512})),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=6)),
    "qwen2-qkv-bias": ("qwen2", dict(hidden_size=128)),  # vLLM's Qwen2 takes head_dim = hidden / heads
    "qwen3-qk-norm": ("qwen3", {}),
    "gemma": ("gemma", {}),
    # caps small enough to bite: the random tiny model's attention scores and logits are < 1
    "gemma2-softcap": ("gemma2", dict(sliding_window=6, attn_logit_softcapping=0.01, final_logit_softcapping=0.5)),
    "phi3-partial-rotary": ("phi3", dict(hidden_size=128, partial_rotary_factor=0.5, pad_token_id=0)),
    # GPT-NeoX has no GQA: vLLM (its Transformers backend) would read num_key_value_heads and size the cache wrong
    "gpt-neox-parallel-residual": ("gpt_neox", dict(hidden_size=128, rotary_pct=0.25, use_parallel_residual=True,
                                                    num_key_value_heads=4)),
    "opt-learned-positions": ("opt", dict(hidden_size=128, ffn_dim=256, word_embed_proj_dim=64)),  # project_in/out
    "gpt2": ("gpt2", dict(hidden_size=128, n_positions=_MAX_POSITIONS, bos_token_id=0, eos_token_id=0)),  # n_embd = hidden_size
    "mixtral-moe": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}
F32_TOLERANCE = 1e-4  # float32: max abs error <= this x max |logit|
# bf16/f16: max abs error vs transformers in float32 (same rounded weights) <= 1.5x transformers' own error in
# that dtype + 1e-3 x max |logit|
DTYPE_ERROR_FACTOR, DTYPE_ERROR_FLOOR = 1.5, 1e-3


def tiny_model(family: str, dtype: str = "float32", seed: int = 0):
    """The family's tiny random model. In bf16/f16 it is the float32 model's weights rounded to `dtype`, saved
    and loaded back with `from_pretrained(dtype=...)`, as real checkpoints are (transformers then keeps its
    RoPE frequencies in float32); `model.name_or_path` is that checkpoint's folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**_BASE, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=_reference_attention(config)).eval()
    for name, p in model.named_parameters():  # norms near 1, so their weights matter to the check
        if p.dim() == 1 and "norm" in name and "bias" not in name:
            p.data = (0.1 if model_type.startswith("gemma") else 1.0) * torch.ones_like(p) + 0.1 * torch.randn_like(p)
    if dtype == "float32":
        return model
    folder = tempfile.mkdtemp(prefix=f"tiny-{family}-{dtype}-")
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                attn_implementation=_reference_attention(config)).eval()


def _reference_attention(config) -> str:
    """transformers' SDPA attention, except where a config asks for what SDPA leaves out (attention soft-capping:
    eager applies it); at 4,096 positions eager attention in bf16 is several times slower on the CPU."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def _transformers_logits(model, tokens) -> "np.ndarray":
    import torch

    with torch.no_grad():
        return model(tokens[None]).logits[0, PROMPT - 1:].float().numpy()


@functools.lru_cache(maxsize=4)
def _reference(family: str, dtype: str):
    """(model, tokens, transformers' logits at positions PROMPT - 1 on, transformers' own error in `dtype` or
    None), shared by both fronts. float32: the model's own logits; bf16/f16: those of the model's rounded
    weights loaded in float32, and the error of the model in `dtype` against them."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 256, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(1))
    model = tiny_model(family, dtype)
    if dtype == "float32":
        return model, tokens, _transformers_logits(model, tokens), None
    f32 = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32,
                                               attn_implementation=_reference_attention(model.config))
    ref = _transformers_logits(f32.eval(), tokens)
    return model, tokens, ref, float(np.abs(_transformers_logits(model, tokens) - ref).max())


def rope_frequency_error(program, model) -> float | None:
    """Largest relative error of the RoPE frequencies the rope pass recovered (the program's `rope_*inv_freq`
    constants) against transformers' own float32 `inv_freq` of the same config; None without RoPE."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    truth = [m.inv_freq.float() for m in AutoModelForCausalLM.from_config(config).modules()
             if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]  # built in float32: float32 frequencies
    found = [w for name, w in program.weights.items() if name.startswith("rope") and name.endswith("inv_freq")]
    if not truth or not found:
        return None
    return max(min(float(((w.double() - t.double()).abs() / t.double()).max()) for t in truth if t.shape == w.shape)
               for w in found)


def check(family: str, front: str, dtype: str = "float32") -> dict:
    """Lower one tiny model and compare its logits (a PROMPT-token prefill, then DECODE decode steps: positions
    past 4096) with the reference. float32: transformers eager for the HF front; vLLM's own torch model run
    eagerly for the vLLM front (or transformers eager where vLLM has no torch path on this platform, with the
    reason in `note`); max abs error <= F32_TOLERANCE x max |logit|. bf16/f16: transformers in float32 on the
    same rounded weights, within DTYPE_ERROR_FACTOR x transformers' own error in that dtype + DTYPE_ERROR_FLOOR
    x max |logit|."""
    import mlx.core as mx
    import numpy as np
    import torch

    from lowering import capture
    from lowering.api import build_model, lower
    from lowering.driver import Driver

    start = time.perf_counter()
    result = {"family": family, "front": front, "dtype": dtype}
    try:
        model, tokens, ref, transformers_err = _reference(family, dtype)
        result["reference"] = "transformers eager" if dtype == "float32" else "transformers eager f32"
        if transformers_err is not None:
            result["transformers_err"] = transformers_err
        if front == "hf":
            program = capture.capture_hf(model, family)
        else:
            from lowering.vllm_build import build_vllm_model
            from vllm_metal_plugin.eager import eager_logits

            folder = model.name_or_path
            if dtype == "float32":
                folder = tempfile.mkdtemp(prefix=f"tiny-{family}-")
                model.save_pretrained(folder)
            try:
                vllm_model, config = build_vllm_model(folder, dtype=dtype, max_model_len=_MAX_POSITIONS)
            except ValueError as exc:  # vLLM's config validation refuses the combination (not our gap)
                if "validation error" not in str(exc):
                    raise
                result.update(ok=None, reference="-", note=f"vLLM refuses it: {_first_line(exc)}",
                              seconds=round(time.perf_counter() - start, 1))
                return result
            if dtype == "float32":
                try:
                    vllm_ref = eager_logits(vllm_model, config, tokens.tolist(), PROMPT)
                except Exception as exc:  # e.g. MoE: vLLM gives out-of-tree platforms no torch experts
                    result["note"] = f"vLLM eager unavailable ({type(exc).__name__}: {_first_line(exc)})"
                else:
                    result["vs_transformers"] = float(np.abs(vllm_ref - ref).max())  # vLLM's model vs transformers
                    ref, result["reference"] = vllm_ref, "vLLM eager"
            program = capture.capture_vllm(vllm_model, config, family)
        lowered = lower(program)
        result["rope_freq_err"] = rope_frequency_error(program, model)
        runtime_model = build_model(lowered, num_blocks=-(-(PROMPT + DECODE) // 16), block_size=16)
        driver = Driver(runtime_model)
        driver.add(0, tokens.tolist())
        rows = [driver.step({0: PROMPT})[0]] + [driver.step({0: 1})[0] for _ in range(DECODE)]
        got = np.stack([np.array(r.astype(mx.float32)) for r in rows])
        err, top = float(np.abs(got - ref).max()), float(np.abs(ref).max())
        bound = F32_TOLERANCE * top if dtype == "float32" else \
            DTYPE_ERROR_FACTOR * result["transformers_err"] + DTYPE_ERROR_FLOOR * top
        result.update(max_abs_err=err, max_abs_logit=top, bound=bound,
                      greedy_match=bool((got.argmax(-1) == ref.argmax(-1)).all()),
                      ok=bool(np.isfinite(got).all()) and err <= bound,
                      missed=[r.name for r in lowered.passes if r.missed])
    except Exception as exc:  # a family we do not cover yet: record why, in one line
        result.update(ok=False, error=f"{type(exc).__name__}: {_first_line(exc)}")
        if "--debug" in sys.argv:
            traceback.print_exc()
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    if len(lines) > 1 and "validation error" in lines[0]:  # pydantic: the reason is on the next line
        lines = [lines[1].split(" [type=")[0].removeprefix("Value error, ")]
    return lines[0][:300] if lines else ""


# -- the real engine: vLLM with this plugin vs vLLM's built-in CPU platform -------------------------
GREEDY_TOKENS = 16
ENGINE_PROMPT_LENGTHS = (5, 12, 23, 40)  # random token ids; the longest spans three 16-token blocks
# Environment that decides the platform or how the plugin runs: the engine runs start without it.
_SWITCHES = ("VLLM_PLUGINS", "VLLM_TARGET_DEVICE", "VLLM_METAL_USE_MLX", "VLLM_METAL_MEMORY_FRACTION",
             "VLLM_METAL_BLOCK_SIZE", "VLLM_METAL_DEBUG", "VLLM_MLX_DEVICE", "VLLM_CPU_KVCACHE_SPACE",
             "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_ENABLE_V1_MULTIPROCESSING")
PLATFORMS = {
    "plugin": {},  # nothing set: the plugin's entry point makes its platform win (docs/plugin.md)
    "cpu": {"VLLM_PLUGINS": "none", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
}


def engine_prompts() -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in ENGINE_PROMPT_LENGTHS]


def engine_greedy(families: list[str], workdir: str | Path, timeout: float = 1800) -> dict[str, dict]:
    """Greedy GREEDY_TOKENS tokens of every family's tiny f32 checkpoint through the real engine
    (`vllm.LLM`), once with this plugin and once on vLLM's built-in CPU platform, both batching the
    same token-id prompts (`run_engines`).

    Returns family -> {"identical", "first_difference", "gap_at_difference" (top-2 logprob gap there),
    "max_logprob_diff" (chosen tokens, where the sequences agree), "plugin", "cpu", "error"}."""
    workdir = Path(workdir)
    models = {}
    for family in families:
        folder = workdir / "models" / family
        if not (folder / "config.json").exists():
            tiny_model(family, "float32").save_pretrained(folder)
        models[family] = str(folder)
    runs = run_engines(models, workdir, {p: families for p in PLATFORMS}, timeout=timeout)
    return {family: compare_engines(family, runs, workdir) for family in families}


def run_engines(models: dict[str, str], workdir: Path, platforms: dict[str, list[str]], load_format: str = "auto",
                timeout: float = 1800) -> dict[str, dict]:
    """Each platform of `platforms` (name -> the models it runs) generates greedily for every one of its models
    (name -> folder) in its own subprocess, all platforms at once; one in-process engine per model after the
    other (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~3 s a start instead of ~30 s). A model whose engine fails ends its
    subprocess (a failed start can leave vLLM's process-wide state broken for the next one) and a fresh one goes
    on with the rest. `load_format`: how the engines load the weights (the registry sweep's seeded random
    weights). Returns platform -> model -> its run."""
    import threading

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rpc").mkdir(exist_ok=True)
    deadline = time.monotonic() + timeout
    runs = {platform: {} for platform in platforms}

    def platform_runs(platform: str, names: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _SWITCHES}
        env.update(PLATFORMS[platform], VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", VLLM_CACHE_ROOT=str(workdir / "vllm-cache"),
                   VLLM_RPC_BASE_PATH=str(workdir / "rpc"), VLLM_METAL_CACHE=str(workdir / "metal-cache"))
        attempt, todo = 0, list(names)
        with open(workdir / f"{platform}.log", "wb") as log:
            while todo and time.monotonic() < deadline:
                spec_path, out_path = workdir / f"{platform}-spec.json", workdir / f"{platform}.{attempt}.json"
                spec_path.write_text(json.dumps({"models": {n: models[n] for n in todo}, "prompts": engine_prompts(),
                                                 "load_format": load_format}))
                proc = subprocess.Popen(
                    [sys.executable, "-m", "vllm_metal_plugin.coverage", "--engine-worker", str(spec_path),
                     str(out_path)], cwd=str(Path(__file__).resolve().parent.parent), env=env, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 1))
                except subprocess.TimeoutExpired:
                    pass
                finally:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)  # its own session: whatever it started goes too
                    proc.wait()
                done = json.loads(out_path.read_text()) if out_path.exists() else {}
                if not done and todo:  # died before its first model: that model records why
                    done = {todo[0]: {"error": f"the engine worker died (exit {proc.returncode}); see {platform}.log"}}
                runs[platform].update(done)
                todo = [n for n in todo if n not in runs[platform]]
                attempt += 1
        (workdir / f"{platform}.json").write_text(json.dumps(runs[platform]))

    threads = [threading.Thread(target=platform_runs, args=item) for item in platforms.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return runs


def compare_engines(family: str, runs: dict, workdir: Path) -> dict:
    out = {p: runs.get(p, {}).get(family) for p in PLATFORMS}
    missing = [p for p in PLATFORMS if out[p] is None]
    if missing:
        tail = (workdir / f"{missing[0]}.log").read_text(errors="replace")[-1500:]
        return {**out, "identical": False, "error": f"{', '.join(missing)} run did not reach it; log tail: {tail}"}
    errors = {p: out[p]["error"] for p in PLATFORMS if out[p].get("error")}
    if errors:
        return {**out, "identical": False, "error": "; ".join(f"{p}: {e}" for p, e in errors.items())}
    a, b = out["plugin"]["tokens"], out["cpu"]["tokens"]
    first = next(((i, j) for i, (x, y) in enumerate(zip(a, b)) for j, (u, v) in enumerate(zip(x, y)) if u != v), None)
    same = [sum(1 for u, v in zip(x, y) if u == v) == len(x) == len(y) for x, y in zip(a, b)]
    # chosen tokens' logprobs, compared where the sequences agree
    diffs = [abs(u - v) for x, y, ok in zip(out["plugin"]["logprobs"], out["cpu"]["logprobs"], same) if ok
             for u, v in zip(x, y)]
    gap = None if first is None else min(out[p]["gaps"][first[0]][first[1]] for p in PLATFORMS)
    return {**out, "identical": all(same) and len(a) == len(b), "first_difference": first,
            "max_logprob_diff": max(diffs) if diffs else None, "gap_at_difference": gap}


def _gap(step: dict) -> float:
    top = sorted((lp.logprob for lp in step.values()), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def engine_worker(spec_path: str, out_path: str) -> int:
    """Inside one platform's subprocess: one in-process engine per family, greedy on every prompt."""
    import runtime  # noqa: F401  (fast BLAS before mlx, as the plugin does)
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.platforms import current_platform

    from vllm.model_executor.models import registry

    # vLLM inspects each new architecture in a fresh Python subprocess (to keep CUDA out of this
    # one): ~30 s a family on this machine. There is no CUDA here; inspect in-process.
    registry._run_in_subprocess = lambda fn: fn()
    spec = json.loads(Path(spec_path).read_text())
    load_format = spec.get("load_format", "auto")
    if load_format != "auto":  # the registry sweep's seeded random weights
        from vllm_metal_plugin.sweep import register_random_weights

        register_random_weights()
    results = {}
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True, detokenize=False,
                            logprobs=2)
    for family, folder in spec["models"].items():
        start, llm = time.perf_counter(), None
        entry = {"platform": type(current_platform).__name__}
        try:
            llm = LLM(model=folder, dtype="float32", max_model_len=256, skip_tokenizer_init=True,
                      enforce_eager=True, max_num_seqs=8, max_num_batched_tokens=256, seed=0, load_format=load_format)
            entry["start_s"] = round(time.perf_counter() - start, 1)
            outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
            entry["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
            entry["logprobs"] = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                                 for o in outputs]
            # top-2 gap at every step: a divergence at a near-tie is rounding, not a bug
            entry["gaps"] = [[_gap(step) for step in o.outputs[0].logprobs] for o in outputs]
        except Exception as exc:  # recorded: a platform that cannot run a family says why
            entry["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
            traceback.print_exc()
        finally:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
                del llm
            cleanup_dist_env_and_memory()
        entry["seconds"] = round(time.perf_counter() - start, 1)
        results[family] = entry
        Path(out_path).write_text(json.dumps(results))  # after each family: a timeout keeps what is done
        print(f"engine {family}: {json.dumps(entry)[:300]}", flush=True)
        if "error" in entry:  # a failed start may leave vLLM's process-wide state broken: a fresh process goes on
            break
    sys.stdout.flush()
    os._exit(0)  # vLLM's background threads need not finish


def render(results: list[dict], engine: dict[str, dict] | None = None) -> str:
    lines = [
        "## Families at long positions, both front ends, every dtype", "",
        "Generated by `python -m vllm_metal_plugin.coverage` (do not edit by hand).",
        "",
        "Each row: a tiny random config of the family (2 layers, hidden 64 or 128, 4 query heads, head_dim 32),",
        "lowered through the front end and run by the MLX runtime "
        f"({PROMPT}-token prefill, then {DECODE} decode steps, so the logits compared lie at positions "
        f"{PROMPT - 1}-{PROMPT + DECODE - 2}), compared",
        "with the reference: transformers eager (same weights) for the `hf` front; for the `vllm` front vLLM's own",
        "torch model run eagerly (`vllm_metal_plugin.eager.eager_logits`: vLLM's model class, this platform's torch",
        "paged attention), or transformers eager where vLLM has no torch path here (the note says why: for MoE,",
        "vLLM's unquantized fused-MoE method leaves out-of-tree platforms without a kernel, so vLLM's torch model",
        "cannot run its experts under this plugin; the engine column compares with vLLM's own CPU MoE kernel).",
        f"float32: max abs error <= {F32_TOLERANCE:g} x max |logit|. bf16/f16: the reference is transformers in "
        "float32 on the same rounded weights, and the bound is",
        f"{DTYPE_ERROR_FACTOR:g}x transformers' own error in that dtype + {DTYPE_ERROR_FLOOR:g} x max |logit| "
        "(the `bound` column). `greedy`: argmax of every step equal.", "",
        f"`vLLM greedy{GREEDY_TOKENS} == CPU`: the real engine (`vllm.LLM`, f32) with this plugin generates the same",
        f"{GREEDY_TOKENS} greedy tokens as vLLM's built-in CPU platform (`VLLM_PLUGINS=none`) for "
        f"{len(ENGINE_PROMPT_LENGTHS)} random prompts",
        f"of {', '.join(map(str, ENGINE_PROMPT_LENGTHS))} tokens, batched; the largest difference of the chosen "
        "tokens' logprobs follows. Shown on the vllm/f32 rows.", "",
        f"| family | front | dtype | result | reference | max abs err | bound | max abs logit | greedy "
        f"| vLLM greedy{GREEDY_TOKENS} == CPU | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        status = {True: "ok", False: "FAIL", None: "n/a"}[r["ok"]]
        err = f"{r['max_abs_err']:.2e}" if "max_abs_err" in r else "-"
        bound = f"{r['bound']:.2e}" if "bound" in r else "-"
        top = f"{r['max_abs_logit']:.3f}" if "max_abs_logit" in r else "-"
        greedy = {True: "match", False: "differ"}.get(r.get("greedy_match"), "-")
        notes = [r.get("error", ""), r.get("note", ""), f"missed: {', '.join(r['missed'])}" if r.get("missed") else ""]
        eng = "-"
        if engine is not None and r["front"] == "vllm" and r["dtype"] == "float32" and r["family"] in engine:
            e = engine[r["family"]]
            if e.get("error"):
                eng = "not run"
                notes.append(f"engine: {e['error'][:200]}")
            else:
                lp = e.get("max_logprob_diff")
                eng = ("yes" if e["identical"] else f"NO (prompt {e['first_difference'][0]}, token "
                       f"{e['first_difference'][1]}, top-2 gap {e['gap_at_difference']:.1e})")
                eng += f", logprob diff {lp:.1e}" if lp is not None else ""
        note = "; ".join(n.replace("|", "/") for n in notes if n)
        lines.append(f"| {r['family']} | {r['front']} | {r['dtype']} | {status} | {r.get('reference', '-')} | {err} | {bound} "
                     f"| {top} | {greedy} | {eng} | {note} |")
    applicable = [r for r in results if r["ok"] is not None]
    lines += ["", f"{sum(bool(r['ok']) for r in applicable)} of {len(applicable)} applicable combinations pass "
              f"({len(results) - len(applicable)} not applicable: vLLM refuses them)."]
    if engine is not None:
        same = sum(bool(e.get("identical")) for e in engine.values())
        lines.append(f"vLLM with the plugin generates the same greedy tokens as vLLM's CPU platform for {same} of "
                     f"{len(engine)} families.")
    return "\n".join(lines) + "\n"




SECTIONS = ("registry", "families")  # docs/models.md: each command rewrites its own section


def write_section(path: Path, name: str, text: str) -> None:
    """Replace section `name` of the coverage page (between its markers), keeping the others."""
    parts = {}
    if path.exists():
        for other in SECTIONS:
            found = re.search(rf"<!-- {other} -->\n(.*?)<!-- /{other} -->\n", path.read_text(), re.DOTALL)
            if found:
                parts[other] = found.group(1)
    parts[name] = text
    body = "".join(f"<!-- {n} -->\n{parts[n]}<!-- /{n} -->\n\n" for n in SECTIONS if n in parts)
    path.write_text("# Model coverage\n\n" + body.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--engine-worker"]:
        return engine_worker(*argv[1:3])
    parser = argparse.ArgumentParser(prog="python -m vllm_metal_plugin.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--fronts", default="hf,vllm")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--registry", action="store_true",
                        help="sweep vLLM's text-generation registry (vllm_metal_plugin/sweep.py) instead of the families")
    parser.add_argument("--archs", default="", help="with --registry: only these architectures (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="with --registry: only sweep.QUICK, one of each kind")
    parser.add_argument("--workdir", default="", help="with --registry: keep rows here (a rerun resumes from them)")
    parser.add_argument("--baseline", default="", help="with --registry: the rows a run must not regress from, "
                        "updated after it (default vllm_metal_plugin/coverage_baseline.json)")
    parser.add_argument("--no-engine", action="store_true", help="skip the vLLM engine comparison")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "models.md"))
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.registry:
        return registry_main(args)
    import runtime  # noqa: F401  (fast BLAS before mlx)

    families = args.families.split(",")
    results = []
    for family in families:
        for front in args.fronts.split(","):
            for dtype in args.dtypes.split(","):
                r = check(family, front, dtype)
                print(json.dumps(r), flush=True)
                results.append(r)
    engine = None
    if not args.no_engine:
        with tempfile.TemporaryDirectory(prefix="coverage-engines-") as workdir:
            engine = engine_greedy(families, workdir)
        for family, e in engine.items():
            print(json.dumps({"family": family, "engine_identical": e.get("identical"),
                              "max_logprob_diff": e.get("max_logprob_diff"), "error": e.get("error")}), flush=True)
    write_section(Path(args.out), "families", render(results, engine))
    print(f"wrote {args.out}")
    return 0


def registry_main(args) -> int:
    """The registry sweep: rows (and engines), the page's registry section when every architecture ran, the
    baseline; exit status 1 when an architecture that passed in the baseline does not now."""
    from vllm_metal_plugin import sweep

    everything = list(sweep.registry())
    archs = list(sweep.QUICK) if args.quick else (args.archs.split(",") if args.archs else everything)
    unknown = [a for a in archs if a not in everything]
    if unknown:
        print(f"not in vLLM's text-generation registry: {', '.join(unknown)}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="coverage-registry-"))
    rows = sweep.sweep(archs, workdir, engines=not args.no_engine)
    path = Path(args.baseline) if args.baseline else sweep.BASELINE
    regressed = sweep.regressions(rows, sweep.load_baseline(path))
    sweep.save_baseline(rows, regressed, path)
    stored = sweep.load_baseline(path)
    if all(a in stored for a in everything):  # the page shows the baseline: every architecture's latest row
        write_section(Path(args.out), "registry", sweep.render({a: stored[a] for a in everything}))
        print(f"wrote {args.out}")
    for arch in regressed:
        print(f"REGRESSION: {arch} passed before and is now {rows[arch]['outcome']}: "
              f"{rows[arch].get('reason') or rows[arch].get('missing') or rows[arch].get('engine')}", file=sys.stderr)
    return 1 if regressed else 0


if __name__ == "__main__":
    sys.exit(main())
