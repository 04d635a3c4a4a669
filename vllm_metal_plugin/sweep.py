"""The registry sweep: every text-generation architecture in vLLM's model registry, lowered or refused.

    python -m vllm_metal_plugin.coverage --registry     # runs the sweep, rewrites docs/models.md

For each architecture of `vllm.model_executor.models.registry._TEXT_GENERATION_MODELS`:
1. its config class (transformers', or vLLM's own) builds a tiny config offline: 2-4 layers, small widths,
   every feature switch of the family left on (`tiny_config`; sizes in `SIZES`, a family's own in `CONFIGS`);
2. vLLM builds its own torch model on the CPU under this plugin's platform, with seeded random weights
   (`RANDOM_WEIGHTS`, a model loader both platforms run, so the engines compare the same model);
3. the model is captured and lowered; a refusal lists every missing op (lowering.emit.UnsupportedOpsError)
   or the capture's reason;
4. the lowered step runs a prefill and decode steps against vLLM's own torch model run eagerly
   (vllm_metal_plugin.eager), f32, max abs error <= 1e-4 x max |logit|;
5. the architectures that pass generate greedy tokens through `vllm.LLM` with this plugin and with vLLM's
   built-in CPU platform (vllm_metal_plugin.coverage.engine_greedy), which must be the same; where they differ,
   vLLM's own model run eagerly, each prompt alone (vllm_metal_plugin.eager.eager_greedy), decides which is right.
A build that fails under this platform is tried again under vLLM's CPU platform (VLLM_PLUGINS=none), so a row
says whether vLLM itself cannot build it here.

Rows run in a worker subprocess (`--sweep-worker`), restarted after a crash or a row past its time limit.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASELINE = Path(__file__).resolve().parent / "coverage_baseline.json"
RANDOM_WEIGHTS = "mlx-coverage-random"  # the load format of the seeded random weights
PROMPT, DECODE = 40, 4  # a 40-token prefill over 3 blocks of 16, then decode steps
MAX_LEN = 256
ROW_TIMEOUT = 600  # seconds one row may take in the worker before it is restarted
F32_TOLERANCE = 1e-4
PLATFORM_REFUSAL = "vllm-metal:"  # how this platform's refusals of a model start

# Sizes every tiny config gets, where its config class has the field (the field's own default otherwise).
# head_dim 32: vLLM's CPU attention takes head sizes 32..512 (the engine comparison runs it).
SIZES = {
    "vocab_size": 256, "padded_vocab_size": 256, "hidden_size": 128, "n_embd": 128, "d_model": 128,
    "intermediate_size": 256, "ffn_hidden_size": 256, "ffn_dim": 256, "n_inner": 256,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "multi_query_group_num": 2, "num_kv_heads": 2, "num_query_groups": 2,
    "head_dim": 32, "kv_channels": 32, "attention_head_dim": 32,
    "max_position_embeddings": MAX_LEN, "n_positions": MAX_LEN, "seq_length": MAX_LEN, "max_seq_len": MAX_LEN,
    "max_position_embedding": MAX_LEN,
    "sliding_window": 8, "sliding_window_size": 8,
    # mixture of experts: 4 experts, 2 a token, small experts, one shared expert
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "moe_top_k": 2, "moe_topk": 2, "num_experts_per_token": 2,
    "moe_intermediate_size": 64, "expert_intermediate_size": 64, "expert_ffn_hidden_size": 64,
    "shared_expert_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64, "share_expert_dim": 64,
    "shared_intermediate_size": 64,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_start_index": 1, "num_dense_layers": 1,
    # multi-head latent attention
    # vLLM's CPU MLA decode kernel takes latent rows of 512 + 64 only
    "kv_lora_rank": 512, "q_lora_rank": 48, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32,
    # state-space and linear-attention layers
    "state_size": 16, "ssm_state_size": 16, "mamba_d_state": 16, "time_step_rank": 8, "mamba_dt_rank": 8,
    "mamba_n_heads": 8, "mamba_num_heads": 8, "n_mamba_heads": 8, "mamba_d_head": 32, "mamba_head_dim": 32,
    "mamba_headdim": 32, "mamba_d_ssm": 256, "n_groups": 1, "chunk_size": 32, "mamba_chunk_size": 32,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
    "linear_num_heads": 4, "linear_head_dim": 32,
    "index_n_heads": 2, "index_head_dim": 32, "index_topk": 16,
    "hidden_size_per_layer_input": 32, "vocab_size_per_layer_input": 256, "laurel_rank": 16,
    "attention_hidden_size": 256, "adapter_rank": 8,
}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")

# A family's own fields (architecture -> config fields): what SIZES cannot say (a layer pattern, a second
# kind of layer, a switch off by default). These are the coverage configs; nothing in passes/ or lowering/
# knows them.
CONFIGS: dict[str, dict] = {
    # fields real checkpoints carry that the transformers config class does not define
    "AfmoeForCausalLM": dict(score_func="sigmoid", route_norm=True, n_group=1, topk_group=1),
    "ChatGLMModel": dict(original_rope=True, add_qkv_bias=True, multi_query_attention=True,
                         tie_word_embeddings=False),
    "ChatGLMForConditionalGeneration": dict(original_rope=True, add_qkv_bias=True, multi_query_attention=True,
                                            tie_word_embeddings=False),
    "DbrxForCausalLM": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                            ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=64)),
    "HYV3ForCausalLM": dict(expert_hidden_dim=64, route_norm=True, first_k_dense_replace=1),
    "MiniMaxM2ForCausalLM": dict(scoring_func="sigmoid", rotary_dim=16),
    "Glm4MoeForCausalLM": dict(head_dim=32),
    "GPTJForCausalLM": dict(rotary_dim=16),
    "LongcatFlashForCausalLM": dict(mla_scale_q_lora=True, mla_scale_kv_lora=True, zero_expert_type="identity",
                                    zero_expert_num=1),
    "Glm4MoeLiteForCausalLM": dict(first_k_dense_replace=1),
    "Llama4ForCausalLM": dict(num_experts_per_tok=1),  # one routed expert a token, its weight on the input
    "MiMoV2FlashForCausalLM": dict(layernorm_epsilon=1e-5, sliding_window=8, sliding_window_size=8,
                                   hybrid_layer_pattern=[0, 1], moe_layer_freq=[0, 1], swa_head_dim=32,
                                   swa_num_attention_heads=4, swa_num_key_value_heads=2),
    # a hybrid's second kind of layer (short convolutions) next to attention
    "Lfm2ForCausalLM": dict(block_dim=128, conv_dim=128, layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
    "Lfm2MoeForCausalLM": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1], num_dense_layers=1),
    # a feature switch the default config leaves off
    "Gemma2ForCausalLM": dict(attn_logit_softcapping=0.01, final_logit_softcapping=0.5),
    "Phi3ForCausalLM": dict(partial_rotary_factor=0.5),
    "StableLmForCausalLM": dict(use_qkv_bias=True),
    "Qwen2ForCausalLM": dict(use_sliding_window=False),
    # DeepSeek (v1) attends with plain multi-head attention, no latent
    "DeepseekForCausalLM": dict(kv_lora_rank=None, q_lora_rank=None, n_group=1, topk_group=1, num_experts_per_tok=2),
    # a state-space config whose sizes must agree: heads x head dim = expand x hidden
    "Mamba2ForCausalLM": dict(num_heads=8, head_dim=32, n_groups=1, expand=2),
    # more layers, so each kind of layer (and the dense layers before the MoE ones) appears
    "Gemma3ForCausalLM": dict(num_hidden_layers=4),
    # the last layers reuse earlier layers' K/V; activation sparsity on the first layer
    "Gemma3nForCausalLM": dict(num_hidden_layers=4, num_kv_shared_layers=2,
                               activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
    "Cohere2ForCausalLM": dict(num_hidden_layers=4),
    "Exaone4ForCausalLM": dict(num_hidden_layers=4),
    "DeepseekV2ForCausalLM": dict(num_hidden_layers=3, n_group=2, topk_group=1, num_experts_per_tok=2),
    "DeepseekV3ForCausalLM": dict(num_hidden_layers=3),
}


# -- the architectures and their configs -----------------------------------------------------------
def registry() -> dict[str, tuple[str, str]]:
    """vLLM's text-generation architectures: name -> (module, class)."""
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS

    return dict(_TEXT_GENERATION_MODELS)


def config_class(arch: str, module: str):
    """(config class, where it comes from) for an architecture, or (None, reason)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    stem = module.split(".")[-1]
    types = [t for t, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
             if arch in (names if isinstance(names, (list, tuple)) else [names])]
    # a text-only config before a multimodal one (llama4_text before llama4), then the module's own name
    # (GPT2LMHeadModel: gpt2 before gpt-sw3)
    types.sort(key=lambda t: (t in CONFIG_MAPPING and bool(getattr(CONFIG_MAPPING[t], "sub_configs", None)), t != stem))
    for model_type in types + [stem]:
        if model_type in _CONFIG_REGISTRY:
            return _CONFIG_REGISTRY[model_type], f"vLLM {_CONFIG_REGISTRY[model_type].__name__}"
        if model_type in CONFIG_MAPPING:
            return CONFIG_MAPPING[model_type], f"transformers {CONFIG_MAPPING[model_type].__name__}"
    return None, "no config class offline (transformers and vLLM have none for it: remote code)"


def _kinds(values: list) -> list:
    """The distinct entries of a per-layer list, in order of first appearance."""
    return list(dict.fromkeys(values))


def _shrunk(defaults: dict, overrides: dict) -> dict:
    """SIZES (and the overrides) for the fields the config has; per-layer lists cycled over the new depth,
    keeping every kind of layer the default config has; token ids inside the small vocabulary."""
    out = {k: v for k, v in SIZES.items() if k in defaults and defaults[k] is not None}
    out.update(overrides)
    depth_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in out), None)
    depth = defaults.get(depth_key, -1)
    per_layer = {k: v for k, v in defaults.items() if k not in out and isinstance(v, list) and v
                 and len(v) == depth and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v)}
    if depth_key is not None and per_layer:
        kinds = {k: [SIZES[k]] if k in SIZES else _kinds(v) for k, v in per_layer.items()}
        layers = out[depth_key] = max([out[depth_key]] + [len(k) for k in kinds.values()])
        out.update({k: [ks[i % len(ks)] for i in range(layers)] for k, ks in kinds.items()})
    for key in TOKEN_IDS:
        value = defaults.get(key)
        if isinstance(value, int) and value >= SIZES["vocab_size"]:
            out[key] = 1
        elif isinstance(value, list):
            out[key] = [v if v < SIZES["vocab_size"] else 1 for v in value]
    return out


def tiny_config(arch: str, module: str):
    """The architecture's tiny random config (a transformers PretrainedConfig), or raise LookupError."""
    cls, origin = config_class(arch, module)
    if cls is None:
        raise LookupError(origin)
    defaults = cls().to_dict()
    kwargs = _shrunk(defaults, CONFIGS.get(arch, {}))
    text = defaults.get("text_config")
    if isinstance(text, dict):  # a multimodal config class: the text model's fields shrink
        kwargs["text_config"] = {**text, **_shrunk(text, {})}
    config = cls(**kwargs)
    config.architectures = [arch]
    return config, origin


# -- seeded random weights, the same on every platform ------------------------------------------------
def randomize(model: torch.nn.Module) -> None:
    """Every floating parameter drawn from a generator seeded by its name: matrices N(0, 1/fan_in) (unit-scale
    activations and logits of order 1), norm weights 1 + N(0, 0.1^2), other vectors N(0, 0.1^2)."""
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.numel() == 0:
            continue
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        values = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.dim() >= 2:
            values /= p.shape[-1] ** 0.5
        elif "norm" in name.lower() and name.endswith("weight"):
            values = 1.0 + 0.1 * values
        else:
            values *= 0.1
        with torch.no_grad():
            p.copy_(values.to(p.dtype))


def register_random_weights() -> None:
    """The `RANDOM_WEIGHTS` load format: vLLM's dummy loader, then `randomize` (before vLLM's own post-load
    processing, so derived tensors follow the weights)."""
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    if RANDOM_WEIGHTS in _LOAD_FORMAT_TO_MODEL_LOADER:
        return

    @register_model_loader(RANDOM_WEIGHTS)
    class RandomWeights(DummyModelLoader):
        def load_weights(self, model, model_config):
            super().load_weights(model, model_config)
            randomize(model)


# -- one row -------------------------------------------------------------------------------------------
def check(arch: str, workdir: Path) -> dict:
    """One architecture: config, vLLM build, capture, lowering, numerics. Returns its row."""
    import numpy as np

    row = {"arch": arch}
    start = time.perf_counter()
    module, cls_name = registry()[arch]
    row["vllm_class"] = f"{module}.{cls_name}"
    try:
        config, row["config"] = tiny_config(arch, module)
    except LookupError as exc:
        return {**row, "outcome": "no config", "reason": str(exc)}
    except Exception as exc:  # the config class refuses our sizes: say so
        return {**row, "outcome": "no config", "reason": f"tiny config refused: {_one_line(exc)}"}
    folder = workdir / arch
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    try:
        model, vllm_config = _build(folder)
    except Exception as exc:
        reason = _one_line(exc)
        if reason.startswith(PLATFORM_REFUSAL):  # this platform refuses the model's attention (a missing piece)
            return {**row, "outcome": "refused", "missing": [reason.removeprefix(PLATFORM_REFUSAL).strip()],
                    "seconds": _since(start)}
        if "failed to be inspected" in reason:  # vLLM logs the cause; the import of the model's module shows it
            try:
                importlib.import_module(module if module.startswith("vllm.") else f"vllm.model_executor.models.{module}")
            except Exception as cause:
                reason = f"vLLM cannot import its model module: {type(cause).__name__}: {_one_line(cause)}"
        return {**row, "outcome": "not built", "reason": reason, "seconds": _since(start)}
    try:
        from lowering import capture
        from lowering.api import build_model, lower
        from lowering.driver import Driver
        from lowering.emit import UnsupportedOpsError

        tokens = torch.randint(0, SIZES["vocab_size"], (PROMPT + DECODE,),
                               generator=torch.Generator().manual_seed(1)).tolist()
        try:
            program = capture.capture_vllm(model, vllm_config, arch)
            lowered = lower(program)
        except UnsupportedOpsError as exc:
            return {**row, "outcome": "refused", "missing": exc.targets(),
                    "missing_where": [str(o) for o in exc.ops], "seconds": _since(start)}
        except NotImplementedError as exc:  # capture's refusals: every missing piece, "; "-separated
            return {**row, "outcome": "refused", "missing": _one_line(exc).split("; "), "seconds": _since(start)}
        from vllm_metal_plugin.eager import eager_logits

        try:
            ref = eager_logits(model, vllm_config, tokens, PROMPT)
        except Exception as exc:
            if os.environ.get("VLLM_METAL_SWEEP_DEBUG"):
                traceback.print_exc()
            return {**row, "outcome": "no reference", "reason": f"vLLM eager: {type(exc).__name__}: {_one_line(exc)}",
                    "seconds": _since(start)}
        runtime_model = build_model(lowered, num_blocks=-(-(PROMPT + DECODE) // 16), block_size=16)
        driver = Driver(runtime_model)
        driver.add(0, tokens)
        import mlx.core as mx

        rows = [driver.step({0: PROMPT})[0]] + [driver.step({0: 1})[0] for _ in range(DECODE)]
        got = np.stack([np.array(r.astype(mx.float32)) for r in rows])
        err, top = float(np.abs(got - ref).max()), float(np.abs(ref).max())
        ok = bool(np.isfinite(got).all()) and err <= F32_TOLERANCE * top
        row.update(outcome="lowered" if ok else "numerics off", max_abs_err=err, max_abs_logit=top,
                   missed=[r.name for r in lowered.passes if r.missed])
        if ok:  # the judge, should the engines differ (sweep())
            from vllm_metal_plugin.coverage import GREEDY_TOKENS, engine_prompts
            from vllm_metal_plugin.eager import eager_greedy

            row["eager_greedy"] = eager_greedy(model, vllm_config, engine_prompts(), GREEDY_TOKENS)
    except NotImplementedError as exc:  # a refusal after lowering (the cache layout the layers need)
        row.update(outcome="refused", missing=[_one_line(exc)])
    except Exception as exc:
        row.update(outcome="error", reason=f"{type(exc).__name__}: {_one_line(exc)}")
        if os.environ.get("VLLM_METAL_SWEEP_DEBUG"):
            traceback.print_exc()
    row["seconds"] = _since(start)
    return row


def _build(folder: Path):
    from vllm.model_executor.models import registry as vllm_registry

    from lowering.vllm_build import build_vllm_model

    # vLLM inspects each new architecture in a fresh Python subprocess (to keep CUDA out of this one): ~30 s an
    # architecture on a 2-core machine. There is no CUDA here; inspect in-process.
    vllm_registry._run_in_subprocess = lambda fn: fn()
    register_random_weights()
    return build_vllm_model(str(folder), dtype="float32", max_model_len=MAX_LEN, load_format=RANDOM_WEIGHTS)


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "validation error" in lines[0]:  # pydantic: the reason is on the next line
        lines = [lines[1].split(" [type=")[0].removeprefix("Value error, ")]
    text = lines[0] if lines else type(exc).__name__
    return text[:400]


# -- the worker and its supervisor ----------------------------------------------------------------------
def worker(spec_path: str, out_path: str) -> int:
    """Run the rows of a spec file ({"archs": [...], "workdir": ...}), one JSON line each, appended as done."""
    import runtime  # noqa: F401  (fast BLAS before mlx)

    spec = json.loads(Path(spec_path).read_text())
    workdir = Path(spec["workdir"])
    for arch in spec["archs"]:
        print(f"sweep: {arch} ...", flush=True)
        row = check(arch, workdir)
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"sweep: {json.dumps(row)[:400]}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # vLLM's background threads need not finish


def run_rows(archs: list[str], workdir: Path, log=print) -> dict[str, dict]:
    """Every architecture's row, from worker subprocesses: a worker that dies or overruns a row is
    replaced, and that row records why."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "rows.jsonl"
    done: dict[str, dict] = {}
    if out.exists():
        done = {r["arch"]: r for r in map(json.loads, out.read_text().splitlines())}
    todo = [a for a in archs if a not in done]
    while todo:
        spec = workdir / "spec.json"
        spec.write_text(json.dumps({"archs": todo, "workdir": str(workdir / "models")}))
        logfile = workdir / "worker.log"
        with open(logfile, "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "vllm_metal_plugin.sweep", "--sweep-worker", str(spec),
                                     str(out)], cwd=str(ROOT), env=_worker_env(workdir), stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            current, since = None, time.monotonic()
            while proc.poll() is None:
                time.sleep(1)
                rows = _read_rows(out)
                finished = [a for a in todo if a in rows]
                if finished:
                    for a in finished:
                        done[a] = rows[a]
                        log(json.dumps(rows[a])[:300])
                    todo = [a for a in todo if a not in rows]
                    since = time.monotonic()
                if todo and time.monotonic() - since > ROW_TIMEOUT:
                    _kill(proc)
                    break
            _kill(proc)
        rows = _read_rows(out)
        for a in [a for a in todo if a in rows]:
            done[a] = rows[a]
        todo = [a for a in todo if a not in rows]
        if todo:  # the worker died on (or overran) the first unfinished row
            arch = todo.pop(0)
            tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
            row = {"arch": arch, "outcome": "error",
                   "reason": f"the row's worker died or ran over {ROW_TIMEOUT} s: {' / '.join(tail)[-300:]}"}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            done[arch] = row
            log(json.dumps(row)[:300])
    return {a: done[a] for a in archs}


def _read_rows(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            r = json.loads(line)
            rows[r["arch"]] = r
    return rows


def _kill(proc) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _worker_env(workdir: Path, **extra) -> dict:
    from vllm_metal_plugin.coverage import _SWITCHES

    env = {k: v for k, v in os.environ.items() if k not in _SWITCHES}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", VLLM_CACHE_ROOT=str(workdir / "vllm-cache"),
               VLLM_RPC_BASE_PATH=str(workdir / "rpc"), VLLM_METAL_CACHE=str(workdir / "metal-cache"), **extra)
    (workdir / "rpc").mkdir(parents=True, exist_ok=True)
    return env


# -- docs/models.md ---------------------------------------------------------------------------------------
OUTCOMES = {  # outcome -> what the table says
    "lowered": "lowered", "numerics off": "numerics off", "refused": "refused", "no reference": "no reference",
    "error": "error", "not built": "not built", "no config": "no config",
}


def missing_items(row: dict) -> list[str]:
    """What a refused row lacks, one entry per distinct op or feature (layer numbers folded)."""
    return list(dict.fromkeys(re.sub(r"layers\.\d+\.", "layers.N.", m) for m in row.get("missing", [])))


# Why vLLM's CPU platform generates other tokens than vLLM's own model run eagerly, for the rows judged so (found
# by running that platform on each prompt alone and reading its code): reason -> architectures.
CPU_PLATFORM_DIFFERENCES = {
    "its multi-head latent attention gives a prompt other tokens in a batch than alone": (
        "AXK1ForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Glm4MoeLiteForCausalLM",
        "HYV4ForCausalLM"),
    "its router (`CPURouter`) drops the expert-score correction bias of top-k without groups, where vLLM's other"
    " routers and transformers choose the experts on the biased scores": ("Ernie4_5_MoeForCausalLM",),
}


def judged(row: dict) -> bool:
    """The plugin generates vLLM's eager model's tokens and vLLM's CPU platform does not."""
    engine = row.get("engine") or {}
    return bool(engine.get("plugin_is_eager") and not engine.get("cpu_is_eager"))


def render(rows: dict[str, dict]) -> str:
    """The registry section of docs/models.md: one row per architecture, then the summary."""
    from collections import Counter

    runnable = [a for a, r in rows.items() if r.get("cpu_engine") == "ok"]
    passing = [a for a in runnable if passes(rows[a])]
    counts = Counter(r["outcome"] for r in rows.values())
    blocked = Counter(m for r in rows.values() if r["outcome"] == "refused" for m in missing_items(r))
    lines = [
        "## Every text-generation architecture in vLLM's registry", "",
        f"Generated by `python -m vllm_metal_plugin.coverage --registry` (do not edit by hand). vLLM {_vllm_version()}"
        f" registers {len(rows)} text-generation architectures. Each row: the architecture's config class (transformers'"
        " or vLLM's own) makes a tiny config (2-4 layers, hidden 128, 4 query and 2 KV heads of 32, 4 experts of which 2"
        " a token plus a shared one, every feature switch of the family left on); vLLM builds its own model on the CPU"
        " under this platform with seeded random weights (`vllm_metal_plugin.sweep.RANDOM_WEIGHTS`); it is captured,"
        f" lowered and run ({PROMPT}-token prefill, {DECODE} decode steps) against vLLM's own torch model run eagerly"
        f" (`vllm_metal_plugin.eager`), f32, max abs error <= {F32_TOLERANCE:g} x max |logit|. The lowered ones then"
        f" generate {16} greedy tokens through `vllm.LLM` with this plugin and with vLLM's built-in CPU platform"
        " (4 batched prompts), which must be identical; where they differ, vLLM's own model run eagerly (each prompt"
        " alone, `vllm_metal_plugin.eager.eager_greedy`) judges: the row passes when the plugin's tokens are its"
        " tokens and the CPU platform's are not. vLLM's CPU platform also runs every architecture that has a"
        " config: `vLLM CPU` says whether vLLM itself builds and runs it here.", "",
        "Results: `lowered` (numerics within the bound), `numerics off` (the max error is shown), `refused` (the"
        " missing column lists every op, vLLM layer or feature the MLX lowering lacks; the plugin refuses the model at"
        " start-up with the same list, before any weight loads), `not built` (vLLM itself cannot build the model"
        " here, with its reason), `no config` (no config class offline: remote code), `error` (the row's reason)."
        " The command exits non-zero when an architecture that passed in `vllm_metal_plugin/coverage_baseline.json`"
        " (the committed rows this page shows) does not pass now.", "",
        f"**{len(passing)} of {len(runnable)} architectures that vLLM's CPU platform builds and runs pass numerics and"
        f" engine parity ({100 * len(passing) / max(len(runnable), 1):.0f}%).** Outcomes: "
        + ", ".join(f"{OUTCOMES[o]} {n}" for o, n in counts.most_common()) + ".", "",
    ]
    if blocked:
        lines += ["Missing pieces by architectures blocked: "
                  + "; ".join(f"{m} ({n})" for m, n in blocked.most_common(12)) + ".", ""]
    differ = [a for a, r in rows.items() if judged(r)]
    if differ:
        known = {a: why for why, archs in CPU_PLATFORM_DIFFERENCES.items() for a in archs}
        reasons = {why: [a for a in differ if known.get(a) == why] for why in CPU_PLATFORM_DIFFERENCES}
        unexplained = [a for a in differ if a not in known]
        lines += ["Where vLLM's CPU platform differs from vLLM's own model run eagerly (the rows `vLLM eager's`): "
                  + "; ".join(f"{why} ({', '.join(archs)})" for why, archs in reasons.items() if archs)
                  + (f"; not yet explained ({', '.join(unexplained)})" if unexplained else "") + ".", ""]
    lines += ["| architecture | vLLM model | config | result | max abs err / max logit | greedy16 == CPU | vLLM CPU "
              "| missing / reason |", "|---|---|---|---|---|---|---|---|"]
    for arch, r in rows.items():
        err = f"{r['max_abs_err']:.1e} / {r['max_abs_logit']:.2f}" if "max_abs_err" in r else "-"
        e = r.get("engine")
        if e is None:
            eng = "-"
        elif e.get("error"):
            eng = "not run"
        elif e.get("identical"):
            eng = "yes" + (f" (logprob diff {e['max_logprob_diff']:.1e})" if e.get("max_logprob_diff") is not None else "")
        elif judged(r):
            eng = (f"vLLM eager's (vLLM CPU differs from it: prompt {e['first_difference'][0]}, token "
                   f"{e['first_difference'][1]})")
        else:
            eng = f"NO (prompt {e['first_difference'][0]}, token {e['first_difference'][1]})"
        cpu = r.get("cpu_engine", "-")
        cpu = "runs" if cpu == "ok" else ("-" if cpu == "-" else f"fails: {cpu}")
        why = ", ".join(f"`{m}`" for m in missing_items(r)) if r["outcome"] == "refused" else r.get("reason", "")
        if e is not None and e.get("error"):
            why = (why + "; " if why else "") + f"engine: {e['error']}"
        cells = [arch, r.get("vllm_class", "-"), r.get("config", "-"), OUTCOMES[r["outcome"]], err, eng, cpu, why]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ")[:600] for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


# -- the sweep: rows, then the engines ----------------------------------------------------------------------
# one architecture of each kind, for the default test suite: dense, MoE with a shared expert, multi-head latent
# attention, interleaved sliding/global layers with per-layer RoPE, state-space layers (refused)
QUICK = ("LlamaForCausalLM", "Qwen2MoeForCausalLM", "DeepseekV2ForCausalLM", "Gemma3ForCausalLM", "MambaForCausalLM")
BUILT = ("lowered", "numerics off", "refused", "no reference", "error")  # vLLM built the model under this platform


def sweep(archs: list[str], workdir: Path, engines: bool = True, log=print) -> dict[str, dict]:
    """The rows of `archs`, then the engines: vLLM's CPU platform runs every architecture that has a config (which
    says whether vLLM itself builds and runs it on this CPU), this plugin the ones that lowered."""
    from vllm_metal_plugin.coverage import compare_engines, run_engines

    rows = run_rows(archs, workdir, log=log)
    if not engines:
        return rows
    models = {a: str(workdir / "models" / a) for a, r in rows.items() if r["outcome"] != "no config"}
    lowered = [a for a, r in rows.items() if r["outcome"] == "lowered"]
    runs = run_engines(models, workdir / "engines", {"plugin": lowered, "cpu": list(models)},
                       load_format=RANDOM_WEIGHTS, timeout=4 * 3600)
    for arch in models:
        cpu = runs.get("cpu", {}).get(arch)
        rows[arch]["cpu_engine"] = "did not run" if cpu is None else cpu.get("error") or "ok"
        if arch in lowered:
            e = compare_engines(arch, runs, workdir / "engines")
            rows[arch]["engine"] = {k: e.get(k) for k in ("identical", "first_difference", "gap_at_difference",
                                                          "max_logprob_diff", "error")}
            judge = rows[arch].get("eager_greedy")
            if not e.get("identical") and not e.get("error") and judge:
                # the engines differ: vLLM's own model run eagerly, each prompt alone, says which one is right
                rows[arch]["engine"].update(plugin_is_eager=e["plugin"]["tokens"] == judge,
                                            cpu_is_eager=e["cpu"]["tokens"] == judge)
    return rows


def regressions(rows: dict[str, dict], baseline: dict[str, dict]) -> list[str]:
    """Architectures that passed in the baseline (lowered, and the same greedy tokens as vLLM's CPU platform where
    the engines ran) and do not now."""
    return [a for a, r in rows.items() if passes(baseline.get(a, {})) and not passes(r)]


def passes(row: dict) -> bool:
    """Lowered, and the plugin's greedy tokens are vLLM's CPU platform's, or (where that platform differs from
    vLLM's own model run eagerly) the eager model's."""
    engine = row.get("engine")
    return row.get("outcome") == "lowered" and (engine is None or bool(engine.get("identical")) or judged(row))


def load_baseline(path: Path = BASELINE) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_baseline(rows: dict[str, dict], regressed: list[str], path: Path = BASELINE) -> None:
    """The rows as the new baseline, except regressed ones, which keep their passing entry (so a regression
    keeps failing until it is fixed)."""
    baseline = load_baseline(path)
    for arch, row in rows.items():
        if arch in regressed:
            continue
        old, new = baseline.get(arch, {}), _stored(row)
        if "cpu_engine" not in new and old.get("outcome") == new["outcome"]:  # a run without the engines
            new.update({k: old[k] for k in ("cpu_engine", "engine") if k in old})
        baseline[arch] = new
    path.write_text(json.dumps(dict(sorted(baseline.items())), indent=1) + "\n")


def _stored(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("seconds", "missing_where", "eager_greedy")}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sweep-worker"]:
        sys.exit(worker(*sys.argv[2:4]))
    sys.exit("usage: python -m vllm_metal_plugin.coverage --registry")
