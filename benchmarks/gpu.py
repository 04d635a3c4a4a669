"""The lowered model on MLX's CUDA backend (issue 10): correctness and absolute speed on one GPU, no vLLM.

Systems, same GPU, same shapes, same dtype (bf16), random weights from a fixed seed:
  ours          HF Llama (transformers) -> capture_hf -> passes -> emitted MLX -> mx.compile, driven by
                runtime.model.LoweredModel + lowering.driver.Driver (paged KV cache, block size 16)
  mlx_lm        mlx-lm's hand-written Llama (mlx_lm.models.llama), its KVCache
  torch_eager   transformers LlamaForCausalLM on CUDA (SDPA, DynamicCache)
  torch_compile the same model, torch.compile: decode mode="reduce-overhead" (CUDA graphs) over a
                StaticCache, prefill default mode; dynamic=True, so one compile serves every batch size
Models: SmolLM2-135M's config (benchmarks/configs/smollm2-135m.json) and a Llama-3-8B-shaped config
(benchmarks/configs/llama3-8b-shape.json).

Subcommands (each a fresh process; MLX and torch never share the GPU in one process):
  lower  --out DIR          capture + passes + emit; writes DIR/<model>-<dtype>/{step.py, meta.json,
                            constants.safetensors} (needs torch, not mlx: runs where MLX is not installed)
  torch  --out FILE.json    bandwidth (torch copy), torch eager and torch.compile prefill + decode
  mlx    --out FILE.json    bandwidth (MLX), ours and mlx-lm prefill + decode, weights made on the GPU;
                            --systems ours,ours_composed,mlx_lm adds ours with the fused decode kernel off
  profile --out FILE.json   where a decode step's time goes (host record / launch / wait; CUDA kernels per step
                            through CUPTI), ours vs mlx-lm; --batch B (default 1)
  ab --artefacts A,B ...    lowerings (artefact folders), the first one with a kernel off (--variants, e.g.
                            ours_rope_apart,ours_kv_scatter,ours_fused_always) and, with --mlx-lm, mlx-lm side by side in one process,
                            in rounds of rotating order; ratios paired by round (--batches, --prefills, --rounds)
  kernel --out FILE.json    the fused paged decode attention kernel alone: GPU time per (warps, unroll) vs the
                            composed path and MLX's decode SDPA; prints the best "warps,unroll"
  check  --out FILE.json    correctness: lowered logits on MLX's default device vs transformers on the CPU,
                            same weights (SmolLM2 shape, f32 and bf16)
  report FILE.json ...      the GPU section of docs/benchmarks.md (between <!-- gpu:begin/end -->)

Measurements: prefill = one forward of a batch-1 prompt (512 / 4096 tokens), logits of the last token
only, timed to the host having them; decode at batch B = B sequences of PROMPT random tokens prefilled
together, then steps of one token each, greedy (argmax on the device, token ids read on the host every
step). "sync": the host waits for step n before building step n+1 (what the vLLM plugin does today);
"async": step n+1 is recorded with step n's lazy argmax and launched (mx.async_eval) before step n's
tokens are read, as mlx_lm.generate does. torch is asynchronous by construction (kernels queue while
the host runs ahead) and reads the tokens every step. Each figure: median over REPEATS segments of
SEGMENT steps after warm-up; tok/s = B * steps / seconds.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: runtime, lowering
import runtime  # noqa: E402,F401  (first: the BLAS hook for MLX's CPU backend; a no-op for CUDA)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"smollm2": ROOT / "benchmarks/configs/smollm2-135m.json",
           "llama8b": ROOT / "benchmarks/configs/llama3-8b-shape.json"}
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
PROMPT = 96  # tokens per sequence before decode; with warm-up and 2 x 3 segments of 24 steps, contexts stay
SEGMENT, REPEATS, WARMUP = 24, 3, 4  # within 256 keys: one compiled shape per batch size (Lk bucket 256)
PREFILL_REPEATS = 9  # a prefill row is single steps: more of them for a steadier median (r8: 3 moved it +-20%)
BATCHES = (1, 8, 32, 128)
PREFILLS = (512, 4096)
BLOCK = 16
LOWERED = Path(os.environ.get("GPU_LOWERED", "/root/gpu_lowered"))  # artefacts lowered on the GPU host
CARRIED = ROOT / "benchmarks/results/gpu-lowered"  # ... and the ones lowered here, carried along
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


TINY_LLAMA3 = dict(TINY, tie_word_embeddings=False, rope_parameters={
    "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024})


def load_config(name: str) -> dict:
    if name in ("tiny", "tiny_llama3"):
        return dict(TINY if name == "tiny" else TINY_LLAMA3)
    return json.loads(CONFIGS[name].read_text())


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


class Results:
    """A JSON file rewritten after every measurement, so a run cut short keeps what it measured."""

    def __init__(self, path: str | None, **head):
        self.path = Path(path) if path else None
        self.data = {"env": environment(), **head, "rows": [], "errors": []}
        self.save()

    def add(self, **row) -> dict:
        self.data["rows"].append(row)
        self.save()
        return row

    def error(self, what: str, exc: BaseException) -> None:
        log(f"FAILED {what}: {type(exc).__name__}: {exc}")
        self.data["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        self.save()

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))


def environment() -> dict:
    env = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    for mod in ("torch", "transformers", "mlx.core", "mlx_lm"):
        if mod in sys.modules:
            env[mod] = getattr(sys.modules[mod], "__version__", "?")
    env["vllm_imported"] = "vllm" in sys.modules
    return env


# ----------------------------------------------------------------------------- torch models
def torch_model(cfg: dict, dtype, device: str, init: str, seed: int = 0):
    """LlamaForCausalLM from a config dict. init="seed": transformers' own initialisation under
    torch.manual_seed(seed), built on the CPU (correctness: the same weights go to MLX). init="random":
    built on the meta device, materialised on `device`, N(0, 0.02) matrices and unit norms drawn there
    (speed: no 16 GB pass through the host). init="empty": materialised, not initialised (capture only
    needs shapes). The rotary embedding is rebuilt for real in every case."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    if init == "seed":
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype).to(device)
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to(dtype).to_empty(device=device)  # cast on meta: no 32 GB f32 detour for 8B
    model.tie_weights()  # materialising unties SmolLM2's lm_head from its embedding: tie again
    rotary = model.model.rotary_emb  # its inv_freq stays float32, as from_pretrained keeps it
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    if init == "random":
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():  # tied weights appear once
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def aliases(model) -> dict[str, str]:
    """path -> canonical path for tied parameters (SmolLM2's lm_head is its embedding)."""
    first, out = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


# ----------------------------------------------------------------------------- lowering
def lower_program(model, name: str):
    """capture_hf + the default passes + emit (no mlx needed). Returns (source, program, info)."""
    from lowering.capture import capture_hf
    from lowering.emit import emit_source
    from passes import default_manager

    program = capture_hf(model, name)
    t = time.perf_counter()
    results = default_manager().run(program)
    source = emit_source(program)
    info = {"capture_s": program.meta["capture_s"], "passes_emit_s": time.perf_counter() - t,
            "passes": {r.name: r.matched for r in results}}
    return source, program, info


def save_artefact(folder: Path, model, source: str, program, info: dict) -> None:
    import hashlib
    from dataclasses import asdict

    import torch
    from safetensors.torch import save_file

    params = dict(model.named_parameters(remove_duplicate=False))
    alias = aliases(model)
    derived = {p: r for p, r in getattr(program, "derived", {}).items() if p in set(program.weight_paths.values())}
    # a merged projection (passes/merge_projections.py) is stored as its recipe; its sources go in params
    paths = sorted((set(program.weight_paths.values()) - set(derived)) | {s for r in derived.values() for s in r["cat"]})
    meta = {"params": {}, "aliases": {}, "constants": [], "layers": [asdict(x) for x in program.attention],
            "derived": derived, "torch": torch.__version__, **info}
    tensors = {program.weight_paths[k]: v for k, v in program.weights.items()}
    constants = {}
    for path in paths:
        if path in params:
            t = params[path]
            meta["params"][path] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            if alias[path] != path and alias[path] in paths:  # export names a tied tensor once; both if used twice
                meta["aliases"][path] = alias[path]
        else:
            meta["constants"].append(path)
            constants[path] = tensors[path].detach().contiguous().clone()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "step.py").write_text(source)
    save_file(constants or {"_": torch.zeros(1)}, str(folder / "constants.safetensors"))
    meta["source_sha256"] = hashlib.sha256(source.encode()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def find_artefact(name: str) -> Path:
    """The artefact lowered on this host (`lower` run here) if present, else the carried one."""
    for base in (LOWERED, CARRIED):
        if (base / name / "meta.json").is_file():
            return base / name
    raise FileNotFoundError(f"no lowered artefact {name} under {LOWERED} or {CARRIED}")


def _lean_merged_weight(program, nodes):
    """passes.merge_projections._merged_weight without the concatenation: for `lower` only, whose weights are
    never used (the artefact stores the recipe; the GPU run makes random sources and concatenates them there).
    The real one would hold a second copy of the 8B shape's q/k/v and gate/up weights (+9 GB) on this 24 GB box."""
    import torch
    from passes.merge_projections import _joined

    parts = [program.weights[n.name] for n in nodes]
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    value = torch.zeros((1,) * len(shape), dtype=parts[0].dtype).expand(shape)  # one element, any shape
    return program.add_derived(_joined([program.weight_paths[n.name] for n in nodes]), value,
                               [program.weight_paths[n.name] for n in nodes], dim=0)


def cmd_lower(args) -> int:
    import torch

    try:
        import passes.merge_projections as merge

        merge._merged_weight = _lean_merged_weight
    except ImportError:  # a tree without the pass
        pass
    out = Path(args.out)
    report = {}
    for spec in args.models.split(","):
        name, dtype = spec.split(":")
        t = time.perf_counter()
        model = torch_model(load_config(name), getattr(torch, dtype), "cpu", init="empty")
        source, program, info = lower_program(model, name)
        folder = out / f"{name}-{dtype}"
        save_artefact(folder, model, source, program, info)
        carried = CARRIED / f"{name}-{dtype}" / "step.py"
        same = carried.is_file() and carried.read_text() == source
        report[f"{name}-{dtype}"] = {**info, "total_s": time.perf_counter() - t, "identical_to_carried": same}
        log(f"lowered {name} {dtype}: {report[f'{name}-{dtype}']}")
        del model, program
    report["torch"] = torch.__version__
    report["vllm_imported"] = "vllm" in sys.modules
    print(json.dumps(report, default=str))
    return 0


# ----------------------------------------------------------------------------- MLX side
def mlx_setup(device: str):
    """Select MLX's device through the runtime's own config (VLLM_MLX_DEVICE)."""
    os.environ["VLLM_MLX_DEVICE"] = device
    from runtime.config import RuntimeConfig
    from runtime.kernels import select_device

    return select_device(RuntimeConfig.from_env()).config.device


def mlx_random_weights(meta: dict, dtype, seed: int) -> dict:
    """Weights made on MLX's default device (mx.random), never through host memory; tied paths share."""
    import mlx.core as mx

    weights = {}
    for i, (path, spec) in enumerate(sorted(meta["params"].items())):
        if path in meta["aliases"]:
            continue
        shape = tuple(spec["shape"])
        if len(shape) == 1:
            w = mx.ones(shape, dtype=dtype)
        else:
            w = (mx.random.normal(shape, key=mx.random.key(seed * 100_003 + i)) * 0.02).astype(dtype)
        mx.eval(w)  # one weight at a time: temporaries stay small
        weights[path] = w
    for path, canon in meta["aliases"].items():
        weights[path] = weights[canon]
    weights = with_derived(weights, meta, mx.concatenate)
    mx.eval(list(weights.values()))
    return weights


def with_derived(weights: dict, meta: dict, cat) -> dict:
    """Merged projections (meta["derived"]: path -> {"cat": sources, "dim"}) made from their sources, which
    stay too: mlx-lm reads q/k/v and gate/up apart, ours the merged ones."""
    for path, recipe in meta.get("derived", {}).items():
        weights[path] = cat([weights[s] for s in recipe["cat"]], recipe["dim"])
    return weights


def mlx_constants(folder: Path) -> dict:
    import mlx.core as mx

    meta = json.loads((folder / "meta.json").read_text())
    loaded = mx.load(str(folder / "constants.safetensors")) if meta["constants"] else {}
    return {p: loaded[p] for p in meta["constants"]}


def build_ours(source: str, weights: dict, layers: list[dict], dtype, num_blocks: int):
    from lowering.compile import load_step
    from lowering.driver import Driver
    from runtime.model import CacheLayout, LoweredModel

    layout = CacheLayout(len(layers), layers[0]["num_kv_heads"], layers[0]["head_dim"], BLOCK, dtype)
    model = LoweredModel(load_step(source, jit=True), weights, layout, num_blocks)
    return model, Driver(model)


class Ours:
    name = "ours"

    def __init__(self, model, driver):
        self.model, self.driver, self._next = model, driver, 0

    def prefill_last(self, prompt) -> None:
        """One step over a whole batch-1 prompt; host waits for the last token's argmax (one sync)."""
        tok, sid = self.record_prefill(prompt)
        tok.tolist()
        self.driver.release(sid)

    def record_prefill(self, prompt):
        """The prompt's step recorded, not run: (its last token's argmax, which evaluates the cache writes
        with it; the sequence id to release)."""
        import mlx.core as mx

        sid = self._new([int(x) for x in prompt])
        logits = self.model.step_lazy(self.driver.prepare({sid: len(prompt)}))
        tok = mx.argmax(logits, axis=-1)
        return mx.depends(tok, list(self.model.kv))[0], sid

    def _new(self, tokens) -> int:
        self._next += 1
        self.driver.add(self._next, tokens)
        return self._next

    def start(self, prompts):
        import mlx.core as mx

        sids = [self._new([int(x) for x in p]) for p in prompts]
        logits = self.model.step(self.driver.prepare({s: len(p) for s, p in zip(sids, prompts)}))
        tok = mx.argmax(logits, axis=-1).astype(mx.int32)
        mx.eval(tok)
        return {"sids": sids, "tok": tok}

    def _record(self, state):
        import mlx.core as mx

        for s in state["sids"]:
            self.driver.seqs[s].tokens.append(0)  # placeholder: the real id is on the device
        batch = self.driver.prepare({s: 1 for s in state["sids"]})
        logits = self.model.step_lazy(batch, input_ids=state["tok"])
        return mx.argmax(logits, axis=-1).astype(mx.int32)

    def decode(self, state, steps: int, pipelined: bool) -> list[int]:
        import mlx.core as mx

        if not pipelined:
            for _ in range(steps):
                state["tok"] = self._record(state)
                host = state["tok"].tolist()
            return host
        pending = None
        for _ in range(steps):
            nxt = self._record(state)
            mx.async_eval(nxt)
            if pending is not None:
                pending.tolist()
            pending = state["tok"] = nxt
        return pending.tolist()

    def finish(self, state) -> None:
        for s in state["sids"]:
            self.driver.release(s)


class _KernelOff(Ours):
    """Ours with one of our CUDA kernels off, for an A/B in the same run. Needs its own compiled step: the
    switch (`_off`) is applied while the step is traced, and mx.compile keeps a trace per function and shape."""

    def _off(self, fn, *args, **kw):
        raise NotImplementedError

    def prefill_last(self, prompt) -> None:
        return self._off(super().prefill_last, prompt)

    def record_prefill(self, prompt):
        return self._off(super().record_prefill, prompt)

    def start(self, prompts):
        return self._off(super().start, prompts)

    def _record(self, state):
        return self._off(super()._record, state)


class OursComposed(_KernelOff):
    """The fused paged decode kernel off (VLLM_MLX_PAGED_KERNEL=0: runtime/paged_kernel.py), i.e. the composed
    attention (block gather + masked SDPA)."""
    name = "ours_composed"

    def _off(self, fn, *args, **kw):
        old = os.environ.get("VLLM_MLX_PAGED_KERNEL")
        os.environ["VLLM_MLX_PAGED_KERNEL"] = "0"
        try:
            return fn(*args, **kw)
        finally:
            if old is None:
                os.environ.pop("VLLM_MLX_PAGED_KERNEL")
            else:
                os.environ["VLLM_MLX_PAGED_KERNEL"] = old


class _UsableOff(_KernelOff):
    """A kernel module's `usable` (or another switch, `attr`) is replaced by `value` (answers False by default)
    while the step is traced: MLX's own ops run instead. A benchmark-only switch."""
    module, attr = "", "usable"
    value = staticmethod(lambda *a: False)

    def _off(self, fn, *args, **kw):
        import importlib

        kernel = importlib.import_module(self.module)
        usable = getattr(kernel, self.attr)
        setattr(kernel, self.attr, self.value)
        try:
            return fn(*args, **kw)
        finally:
            setattr(kernel, self.attr, usable)


class OursNormOff(_UsableOff):
    """runtime/norm.py's fused residual-add + RMSNorm kernel off (MLX's add and mx.fast.rms_norm, two kernels),
    the paged decode kernel on."""
    name, module = "ours_norm_off", "runtime.norm"


class OursRopeOff(_UsableOff):
    """runtime/rope_kernel.py's RoPE + K/V-rows kernel off (mx.fast.rope on q and k, MLX's concatenation for
    the rows), the other kernels on."""
    name, module = "ours_rope_off", "runtime.rope_kernel"


class OursKvScatter(_UsableOff):
    """Decode steps write K/V into the cache with a scatter of the RoPE kernel's rows (a kernel a layer), not
    from the RoPE kernel itself (runtime/rope_kernel.py `rope_qkv_into_cache`)."""
    name, module, attr = "ours_kv_scatter", "runtime.rope_kernel", "in_place_usable"


class OursRopeApart(_UsableOff):
    """Decode attention in two kernels (RoPE + K/V write, then the attention) instead of
    runtime/paged_kernel.py's one `paged_decode_rope_attention`."""
    name, module, attr = "ours_rope_apart", "runtime.paged_kernel", "rope_usable"


class OursFusedAlways(_UsableOff):
    """`paged_decode_rope_attention` at every batch size (runtime/paged_kernel.py FUSED_MAX_BLOCKS lifted)."""
    name, module, attr, value = "ours_fused_always", "runtime.paged_kernel", "FUSED_MAX_BLOCKS", 1 << 30


_VARIANTS = {"ours_composed": OursComposed, "ours_norm_off": OursNormOff,  # ours with one kernel off, own trace
             "ours_rope_off": OursRopeOff, "ours_kv_scatter": OursKvScatter, "ours_rope_apart": OursRopeApart,
             "ours_fused_always": OursFusedAlways}


class MlxLm:
    name = "mlx_lm"

    def __init__(self, cfg: dict, weights: dict):
        import mlx.core as mx
        from mlx_lm.models import llama

        args = dict(cfg)
        rope = args.pop("rope_parameters", None) or {}
        args["rope_theta"] = rope.get("rope_theta", args.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            args["rope_scaling"] = dict(rope)  # mlx-lm 0.32.2 reads only the flat keys (see ENVIRONMENT.md)
        self.args = llama.ModelArgs.from_dict(args)
        self.model = llama.Model(self.args)
        names = dict(_flatten(self.model.parameters()))
        own = {k: v for k, v in weights.items() if k in names}
        if "model.embed_tokens.weight" not in own:  # tied: torch.export named the one tensor lm_head.weight
            own["model.embed_tokens.weight"] = weights["lm_head.weight"]
        self.model.load_weights(list(own.items()), strict=True)
        mx.eval(self.model.parameters())

    def _logits_last(self, ids, cache):
        h = self.model.model(ids, cache)[:, -1, :]
        if self.args.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def prefill_last(self, prompt) -> None:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        mx.argmax(self._logits_last(mx.array(prompt)[None], cache), axis=-1).tolist()

    def start(self, prompts):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        tok = mx.argmax(self._logits_last(mx.array(prompts), cache), axis=-1)
        mx.eval(tok)
        return {"cache": cache, "tok": tok}

    def decode(self, state, steps: int, pipelined: bool) -> list[int]:
        import mlx.core as mx

        cache = state["cache"]
        if not pipelined:
            for _ in range(steps):
                state["tok"] = mx.argmax(self.model(state["tok"][:, None], cache=cache)[:, -1], axis=-1)
                host = state["tok"].tolist()
            return host
        pending = None
        for _ in range(steps):  # mlx_lm.generate's pattern
            nxt = mx.argmax(self.model(state["tok"][:, None], cache=cache)[:, -1], axis=-1)
            mx.async_eval(nxt)
            if pending is not None:
                pending.tolist()
            pending = state["tok"] = nxt
        return pending.tolist()

    def finish(self, state) -> None:
        state.clear()


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


# ----------------------------------------------------------------------------- torch systems
class TorchSystem:
    def __init__(self, model, compiled: bool, max_len: int, device: str = "cuda"):
        import torch

        self.model, self.compiled, self.max_len, self.device = model, compiled, max_len, device
        self.name = "torch_compile" if compiled else "torch_eager"
        self.torch = torch
        self._prefill = self._prefill_fn
        self._decode = self._decode_fn
        if compiled:
            self._prefill = torch.compile(self._prefill_fn, dynamic=True)
            self._decode = torch.compile(self._decode_fn, mode="reduce-overhead", fullgraph=True, dynamic=True)

    def _prefill_fn(self, ids):
        return self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]

    def _decode_fn(self, tok, pos, cache):
        return self.model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1]

    def prefill_last(self, prompt) -> None:
        with self.torch.no_grad():
            ids = self.torch.as_tensor(prompt, device=self.device)[None]
            self._prefill(ids).argmax(-1).tolist()

    def start(self, prompts):
        import torch
        from transformers import DynamicCache, StaticCache

        with torch.no_grad():
            ids = torch.as_tensor(prompts, device=self.device)
            if self.compiled:  # static shapes for CUDA graphs: a StaticCache, prefilled eagerly
                cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
                pos = torch.arange(ids.shape[1], device=self.device)
                out = self.model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True,
                                 logits_to_keep=1)
            else:
                cache = DynamicCache(config=self.model.config)
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1)
        return {"cache": cache, "tok": tok, "pos": ids.shape[1]}

    def decode(self, state, steps: int, pipelined: bool) -> list[int]:
        import torch

        with torch.no_grad():
            for _ in range(steps):
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                    pos = torch.tensor([state["pos"]], device=self.device)
                    logits = self._decode(state["tok"][:, None], pos, state["cache"])
                else:
                    out = self.model(input_ids=state["tok"][:, None], past_key_values=state["cache"], use_cache=True)
                    logits = out.logits[:, -1]
                state["tok"] = logits.argmax(-1)
                state["pos"] += 1
                host = state["tok"].tolist()
        return host

    def finish(self, state) -> None:
        state.clear()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the measurements
def prompts_for(vocab: int, batch: int, length: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).tolist()


def measure_prefill(system, res: Results, model: str, vocab: int, lengths, repeats: int = PREFILL_REPEATS) -> None:
    for n in lengths:
        try:
            prompt = prompts_for(vocab, 1, n, seed=n)[0]
            t = time.perf_counter()
            system.prefill_last(prompt)  # warm-up: compiles/traces this shape
            first = time.perf_counter() - t
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                system.prefill_last(prompt)
                times.append(time.perf_counter() - t)
            s = summary([n / x for x in times])
            res.add(system=system.name, model=model, kind="prefill", tokens=n, tok_s=s, first_call_s=first,
                    ms=statistics.median(times) * 1e3)
            log(f"{model} {system.name} prefill {n}: {s['median']:.0f} tok/s (first call {first:.2f} s)")
        except Exception as exc:  # noqa: BLE001  one failure must not lose the rest
            res.error(f"{model} {system.name} prefill {n}", exc)


def measure_decode(system, res: Results, model: str, vocab: int, batches, modes=("sync",)) -> None:
    for b in batches:
        try:
            prompts = prompts_for(vocab, b, PROMPT, seed=1000 + b)
            t = time.perf_counter()
            state = system.start(prompts)
            system.decode(state, WARMUP, pipelined=False)
            warm = time.perf_counter() - t
            for mode in modes:
                pipelined = mode == "async"
                if pipelined:
                    system.decode(state, 2, pipelined=True)  # the async loop's own first steps
                times = []
                for _ in range(REPEATS):
                    t = time.perf_counter()
                    system.decode(state, SEGMENT, pipelined=pipelined)
                    times.append(time.perf_counter() - t)
                s = summary([b * SEGMENT / x for x in times])
                res.add(system=system.name, model=model, kind="decode", batch=b, mode=mode, tok_s=s,
                        step_ms=statistics.median(times) / SEGMENT * 1e3, warmup_s=warm)
                log(f"{model} {system.name} decode b={b} {mode}: {s['median']:.1f} tok/s "
                    f"({statistics.median(times) / SEGMENT * 1e3:.2f} ms/step)")
            system.finish(state)
        except Exception as exc:  # noqa: BLE001
            res.error(f"{model} {system.name} decode b={b}", exc)


def bytes_per_decode_step(meta: dict, cfg: dict, context: int, batch: int = 1) -> dict:
    """Bytes a decode step must read: every weight matrix once (the embedding only as the LM head when
    tied; untied, the lookup reads B rows: ignored) + the K/V of every layer at `context` tokens."""
    size = {"bfloat16": 2, "float16": 2, "float32": 4}
    total, embed = 0, 0
    for path, spec in meta["params"].items():
        if path in meta["aliases"]:
            continue
        n = 1
        for d in spec["shape"]:
            n *= d
        nbytes = n * size[spec["dtype"]]
        total += nbytes
        if path.endswith("embed_tokens.weight"):
            embed = nbytes
    weights = total if cfg.get("tie_word_embeddings") else total - embed
    layers = meta["layers"]
    kv = batch * context * sum(2 * x["num_kv_heads"] * x["head_dim"] for x in layers) * size[
        next(iter(meta["params"].values()))["dtype"]]
    return {"weights": weights, "kv": kv, "total": weights + kv}


def cmd_torch(args) -> int:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = Results(args.out, part="torch")
    log(f"torch {torch.__version__} on {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}")
    if dev == "cuda":  # bandwidth: a large device-to-device copy, counted as bytes read + written
        try:
            n = 1 << 30
            src = torch.randn(n // 2, device=dev, dtype=torch.bfloat16)  # 1 GiB
            dst = torch.empty_like(src)
            for _ in range(3):
                dst.copy_(src)
            times = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dst.copy_(src)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            res.add(system="torch", kind="bandwidth", bytes=2 * n, GB_s=summary([2 * n / t / 1e9 for t in times]))
            log(f"torch copy: {2 * n / statistics.median(times) / 1e9:.0f} GB/s")
            del src, dst
        except Exception as exc:  # noqa: BLE001
            res.error("torch bandwidth", exc)
    deadline = T0 + args.budget_s
    batches = [int(b) for b in args.batches.split(",")]
    prefills = [int(n) for n in args.prefills.split(",")]
    for name in args.models.split(","):
        cfg = load_config(name)
        t = time.perf_counter()
        model = torch_model(cfg, torch.bfloat16, dev, init="random", seed=1)
        if dev == "cuda":
            torch.cuda.synchronize()
        log(f"{name}: torch model on {dev} in {time.perf_counter() - t:.1f} s")
        for compiled in args.systems.split(","):
            compiled = compiled == "compile"
            if compiled and time.perf_counter() > deadline:
                res.error(f"{name} torch_compile", RuntimeError("skipped: the run's time budget is spent"))
                continue
            system = TorchSystem(model, compiled, max_len=256, device=dev)
            measure_decode(system, res, name, cfg["vocab_size"], batches)
            if compiled and time.perf_counter() > deadline:
                res.error(f"{name} torch_compile prefill", RuntimeError("skipped: the run's time budget is spent"))
                continue
            measure_prefill(system, res, name, cfg["vocab_size"], prefills)
        del model, system
        if dev == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    res.data["env"] = environment()
    res.save()
    return 0


def cmd_mlx(args) -> int:
    device = mlx_setup(args.device)
    import mlx.core as mx

    res = Results(args.out, part="mlx")
    log(f"mlx {mx.__version__}, default device {mx.default_device()} (selected {device})")
    try:
        n = 1 << (30 if device == "gpu" else 24)
        a = mx.random.normal((n // 2,)).astype(mx.bfloat16)
        mx.eval(a)
        times = []
        for i in range(23):
            t = time.perf_counter()
            b = a + 1  # one read, one write
            mx.eval(b)
            if i >= 3:
                times.append(time.perf_counter() - t)
            del b
        res.add(system="mlx", kind="bandwidth", bytes=2 * n, GB_s=summary([2 * n / t / 1e9 for t in times]))
        log(f"mlx a+1: {2 * n / statistics.median(times) / 1e9:.0f} GB/s")
        del a
    except Exception as exc:  # noqa: BLE001
        res.error("mlx bandwidth", exc)
    batches = [int(b) for b in args.batches.split(",")]
    prefills = [int(n) for n in args.prefills.split(",")]
    for name in args.models.split(","):
        cfg = load_config(name)
        folder = find_artefact(f"{name}-bfloat16")
        meta = json.loads((folder / "meta.json").read_text())
        source = (folder / "step.py").read_text()
        t = time.perf_counter()
        weights = mlx_random_weights(meta, mx.bfloat16, seed=1)
        weights.update(mlx_constants(folder))
        res.data.setdefault("models", {})[name] = {
            "artefact": str(folder), "artefact_torch": meta.get("torch"), "passes": meta.get("passes"),
            "weights_s": time.perf_counter() - t, "weight_arrays": len(weights),
            "bytes_step_b1": bytes_per_decode_step(meta, cfg, PROMPT + WARMUP + SEGMENT * REPEATS, 1)}
        log(f"{name}: {len(weights)} weights made on {mx.default_device()} in {time.perf_counter() - t:.1f} s")
        blocks = max(batches) * (256 // BLOCK) + 64
        ours, driver = build_ours(source, weights, meta["layers"], mx.bfloat16, blocks)
        ref = MlxLm(cfg, weights)
        systems = [Ours(ours, driver), ref]
        wanted = args.systems.split(",")
        for label, variant in _VARIANTS.items():
            if label in wanted:
                systems.append(variant(*build_ours(source, weights, meta["layers"], mx.bfloat16, blocks)))
        try:  # same weights in both: their last-token logits must agree (catches RoPE/config mismatches)
            prompt = prompts_for(cfg["vocab_size"], 1, 64, seed=5)[0]
            sid = systems[0]._new(prompt)
            a = ours.step(driver.prepare({sid: len(prompt)}))[0].astype(mx.float32)
            driver.release(sid)
            from mlx_lm.models.cache import make_prompt_cache

            b = ref._logits_last(mx.array(prompt)[None], make_prompt_cache(ref.model))[0].astype(mx.float32)
            diff, scale = mx.abs(a - b).max().item(), mx.abs(b).max().item()
            res.data["models"][name]["ours_vs_mlx_lm"] = {"max_abs_diff": diff, "max_abs_logit": scale,
                                                          "rel": diff / scale, "argmax_equal": mx.argmax(a).item() == mx.argmax(b).item()}
            log(f"{name}: ours vs mlx-lm logits, same weights: {res.data['models'][name]['ours_vs_mlx_lm']}")
        except Exception as exc:  # noqa: BLE001
            res.error(f"{name} ours vs mlx-lm logits", exc)
        for system in systems:
            if system.name not in wanted:
                continue
            measure_decode(system, res, name, cfg["vocab_size"], batches, modes=("sync", "async"))
            measure_prefill(system, res, name, cfg["vocab_size"], prefills)
        res.data["models"][name]["peak_memory_gb"] = mx.get_peak_memory() / 1e9 if hasattr(mx, "get_peak_memory") else None
        del ours, driver, ref, systems, weights
        mx.clear_cache()
    if args.profile:
        profile_step(res, args.profile)
    res.data["env"] = environment()
    res.save()
    return 0


def _decode_split(system, state, steps: int) -> dict:
    """`steps` synchronous decode steps, each split into record (building it), launch (`mx.async_eval`
    returning) and wait (the token ids on the host); medians in ms, and of their sum (total)."""
    import mlx.core as mx

    split = {k: [] for k in ("record", "launch", "wait", "total")}
    for _ in range(steps):
        t0 = time.perf_counter()
        if isinstance(system, MlxLm):
            tok = mx.argmax(system.model(state["tok"][:, None], cache=state["cache"])[:, -1], axis=-1)
        else:
            tok = system._record(state)
        t1 = time.perf_counter()
        mx.async_eval(tok)
        t2 = time.perf_counter()
        tok.tolist()
        t3 = time.perf_counter()
        state["tok"] = tok
        for k, v in zip(split, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            split[k].append(v * 1e3)
    return {k: statistics.median(v) for k, v in split.items()}


def cmd_ab(args) -> int:
    """Systems side by side in ONE process on the same weights: lowerings of the model (artefact
    folders) and, with --mlx-lm, mlx-lm's model. In each round every side runs every workload, in an
    order that rotates by round: a decode at each batch size (a synchronous segment split into record
    / launch / wait, then the async loop) and a prefill of each length (median of 3). Host-bound steps
    drift by tens of percent between processes and even between minutes of one process
    (docs/benchmarks.md), so sides are compared round by round (paired), not across runs."""
    mlx_setup(args.device)
    import mlx.core as mx

    res = Results(args.out, part="ab")
    folders = [Path(f) for f in args.artefacts.split(",")]
    batches = [int(b) for b in args.batches.split(",") if b]
    prefills = [int(n) for n in args.prefills.split(",") if n]
    for name in args.models.split(","):
        cfg = load_config(name)
        metas = [json.loads((f / f"{name}-bfloat16" / "meta.json").read_text()) for f in folders]
        weights = mlx_random_weights(metas[0], mx.bfloat16, seed=1)
        weights.update(mlx_constants(folders[0] / f"{name}-bfloat16"))
        blocks = max(max(batches, default=1) * (256 // BLOCK), max(prefills, default=0) // BLOCK) + 64
        sides = {}
        for f, meta in zip(folders, metas):
            source = (f / f"{name}-bfloat16" / "step.py").read_text()
            sides[f.name] = Ours(*build_ours(source, weights, meta["layers"], mx.bfloat16, blocks))
        for v in [v for v in args.variants.split(",") if v]:  # the first lowering with one kernel off
            source = (folders[0] / f"{name}-bfloat16" / "step.py").read_text()
            sides[v] = _VARIANTS[v](*build_ours(source, weights, metas[0]["layers"], mx.bfloat16, blocks))
        if args.mlx_lm:
            sides["mlx_lm"] = MlxLm(cfg, weights)
        labels = list(sides)
        for r in range(args.rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for b in batches:
                for label in order:
                    system = sides[label]
                    state = system.start(prompts_for(cfg["vocab_size"], b, PROMPT, seed=1000 + b))
                    system.decode(state, WARMUP, pipelined=False)
                    split = _decode_split(system, state, SEGMENT)
                    system.decode(state, 2, pipelined=True)
                    t = time.perf_counter()
                    system.decode(state, SEGMENT, pipelined=True)
                    async_ms = (time.perf_counter() - t) / SEGMENT * 1e3
                    system.finish(state)
                    sync_ms = split.pop("total")
                    res.add(model=name, side=label, round=r, kind="decode", batch=b, sync_ms=sync_ms,
                            async_ms=async_ms, **split)
                    log(f"{name} r{r} b={b} {label}: sync {sync_ms:.2f} ms (record {split['record']:.2f}, "
                        f"launch {split['launch']:.2f}), async {async_ms:.2f} ms")
            for n in prefills:
                prompt = prompts_for(cfg["vocab_size"], 1, n, seed=n)[0]
                for label in order:
                    sides[label].prefill_last(prompt)  # this shape traced / warm
                    times = []
                    for _ in range(3):
                        t = time.perf_counter()
                        sides[label].prefill_last(prompt)
                        times.append((time.perf_counter() - t) * 1e3)
                    res.add(model=name, side=label, round=r, kind="prefill", tokens=n, ms=statistics.median(times))
                    log(f"{name} r{r} prefill {n} {label}: {statistics.median(times):.2f} ms")
        _ab_summary(res.data["rows"], name, labels)
        del sides, weights
        mx.clear_cache()
    return 0


def _ab_summary(rows: list[dict], name: str, labels: list[str]) -> None:
    """Per workload: each side's median time and the median over rounds of its ratio to the first side."""
    first = labels[0]
    keys = sorted({(r["kind"], r.get("batch", r.get("tokens"))) for r in rows if r["model"] == name})
    for kind, size in keys:
        for metric in (("sync_ms", "async_ms") if kind == "decode" else ("ms",)):
            def by_round(label):
                return {r["round"]: r[metric] for r in rows if r["model"] == name and r["side"] == label
                        and r["kind"] == kind and r.get("batch", r.get("tokens")) == size}
            base = by_round(first)
            parts = []
            for label in labels:
                mine = by_round(label)
                ratios = [base[k] / mine[k] for k in mine if k in base]  # > 1: this side is faster than the first
                parts.append(f"{label} {statistics.median(mine.values()):.2f} ms ({statistics.median(ratios):.2f}x)")
            log(f"{name} {kind} {size} {metric}: " + ", ".join(parts))


def profile_step(res: Results, name: str) -> None:
    """Host-side split of one batch-1 decode step of ours: batch arrays, graph recording, evaluation."""
    import mlx.core as mx
    import numpy as np

    from runtime.batch import attention_arrays, to_mlx

    cfg = load_config(name)
    folder = find_artefact(f"{name}-bfloat16")
    meta = json.loads((folder / "meta.json").read_text())
    weights = mlx_random_weights(meta, mx.bfloat16, seed=1)
    weights.update(mlx_constants(folder))
    model, driver = build_ours((folder / "step.py").read_text(), weights, meta["layers"], mx.bfloat16, 64)
    ours = Ours(model, driver)
    state = ours.start(prompts_for(cfg["vocab_size"], 1, PROMPT, seed=7))
    ours.decode(state, WARMUP, pipelined=False)
    parts = {k: [] for k in ("prepare", "arrays", "record", "eval", "total")}
    for _ in range(32):
        t0 = time.perf_counter()
        driver.seqs[state["sids"][0]].tokens.append(0)
        batch = driver.prepare({state["sids"][0]: 1})
        t1 = time.perf_counter()
        arrays = to_mlx(attention_arrays(batch, BLOCK))
        t2 = time.perf_counter()
        logits, kv = model.step_fn(model.step_weights, model.kv, arrays, state["tok"],
                                   mx.array(batch.positions.astype(np.int32)),
                                   mx.array(batch.logits_indices.astype(np.int32)))
        model.kv = kv
        state["tok"] = mx.argmax(logits, axis=-1).astype(mx.int32)
        t3 = time.perf_counter()
        state["tok"].tolist()
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            parts[k].append(v * 1e3)
    res.data["profile"] = {"model": name, "ms": {k: statistics.median(v) for k, v in parts.items()}}
    log(f"profile {name} b=1 (ms): {res.data['profile']['ms']}")
    ours.finish(state)


def cmd_profile(args) -> int:
    """Where a decode step's time goes (batch --batch, default 1), ours vs mlx-lm: host time to record the graph (ours
    compiled and not), to launch it (mx.async_eval returns), then the wait; and, through CUPTI (torch's
    profiler sees every CUDA kernel of the process, MLX's included), kernels per step and their time."""
    mlx_setup(args.device)
    import mlx.core as mx

    res = Results(args.out, part="profile", batch=args.batch, prefill=args.prefill)
    for name in args.models.split(","):
        cfg = load_config(name)
        folder = find_artefact(f"{name}-bfloat16")
        meta = json.loads((folder / "meta.json").read_text())
        source = (folder / "step.py").read_text()
        weights = mlx_random_weights(meta, mx.bfloat16, seed=1)
        weights.update(mlx_constants(folder))
        from lowering.compile import load_step

        blocks = max(args.batch * (256 // BLOCK), args.prefill // BLOCK) + 64
        model, driver = build_ours(source, weights, meta["layers"], mx.bfloat16, blocks)
        plain = load_step(source, jit=False)
        ref = MlxLm(cfg, weights)
        out = {}
        for label in args.systems.split(","):
            system = ref if label == "mlx_lm" else _VARIANTS.get(label, Ours)(model, driver)
            if label == "ours_nojit":
                model.step_fn, compiled = plain, model.step_fn
            if label in _VARIANTS:  # a step traced afresh with the kernel off
                model.step_fn, compiled = load_step(source, jit=True), model.step_fn
            if args.prefill:
                out[label] = _profile_prefill(system, ref if label == "mlx_lm" else None,
                                              prompts_for(cfg["vocab_size"], 1, args.prefill, seed=3)[0])
                log(f"{name} {label} prefill {args.prefill}: {out[label]}")
                if label == "ours_nojit" or label in _VARIANTS:
                    model.step_fn = compiled
                continue
            state = system.start(prompts_for(cfg["vocab_size"], args.batch, PROMPT, seed=7))
            system.decode(state, WARMUP, pipelined=False)
            out[label] = _decode_split(system, state, 24)
            log(f"{name} {label} b={args.batch} step split (ms): {out[label]}")
            try:
                out[label]["kernels"] = _cupti_kernels(lambda: system.decode(state, 4, pipelined=False), steps=4)
                k = out[label]["kernels"]
                log(f"{name} {label}: {k['per_step']:.0f} kernels/step, {k['gpu_ms_per_step']:.2f} ms GPU/step; "
                    f"top: {k['top'][:6]}")
            except Exception as exc:  # noqa: BLE001
                res.error(f"{name} {label} cupti", exc)
            system.finish(state)
            if label == "ours_nojit" or label in _VARIANTS:
                model.step_fn = compiled
        res.data.setdefault("profile", {})[name] = out
        res.save()
        del model, driver, ref, weights, plain
        mx.clear_cache()
    return 0


def _profile_prefill(system, ref, prompt) -> dict:
    """A batch-1 prefill's host split (record the graph, launch it, wait for the last token's argmax) and its
    CUDA kernels; `ref` is the MlxLm system (a fresh prompt cache each time), None for ours."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    def record():
        if ref is None:
            return system.record_prefill(prompt)
        return mx.argmax(ref._logits_last(mx.array(prompt)[None], make_prompt_cache(ref.model)), axis=-1), None

    for _ in range(2):  # traces and cuDNN plans for this shape
        system.prefill_last(prompt)
    parts = {k: [] for k in ("record", "launch", "wait", "total")}
    for _ in range(10):
        t0 = time.perf_counter()
        tok, sid = record()
        t1 = time.perf_counter()
        mx.async_eval(tok)
        t2 = time.perf_counter()
        tok.tolist()
        t3 = time.perf_counter()
        if sid is not None:
            system.driver.release(sid)
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            parts[k].append(v * 1e3)
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["tokens"] = len(prompt)
    try:
        out["kernels"] = _cupti_kernels(lambda: system.prefill_last(prompt), steps=1)
    except Exception as exc:  # noqa: BLE001  the split alone still says where the time goes
        out["kernels_error"] = repr(exc)
    return out


def _cupti_kernels(fn, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = {}
    for e in kernels:
        total[e.name] = total.get(e.name, 0.0) + e.device_time / 1e3
    top = sorted(total.items(), key=lambda kv: -kv[1])[:15]
    return {"per_step": len(kernels) / steps, "gpu_ms_per_step": sum(total.values()) / steps,
            "top": [(n[:80], round(t / steps, 4)) for n, t in top]}


def cmd_kernel(args) -> int:
    """The fused paged decode kernel alone (runtime/paged_kernel.py), 8B attention shape (32 heads, 8 KV
    heads, D 128, bf16, block 16): GPU time per call through CUPTI for each (warps, unroll), against the
    composed path (block gather + masked SDPA) and MLX's own decode SDPA on a contiguous unmasked cache
    (what mlx-lm runs). Prints the best (warps, unroll): the one whose worst ratio to the per-batch best is
    smallest."""
    mlx_setup(args.device)
    import mlx.core as mx
    import numpy as np

    from runtime import paged_kernel
    from runtime.attention import _attend

    res = Results(args.out, part="kernel")
    kvh, h, d, bs, ctx = 8, 32, 128, BLOCK, args.context
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    times = {}
    for t in [int(b) for b in args.batches.split(",")]:
        rng = np.random.default_rng(t)
        n_used = -(-ctx // bs)
        width = 1 << (n_used - 1).bit_length()
        num_blocks = t * n_used + 1
        table = np.zeros((t, width), np.int32)
        table[:, :n_used] = rng.permutation(np.arange(1, num_blocks)).reshape(t, n_used)
        kc = (mx.random.normal((kvh, num_blocks, bs, d)) * 0.5).astype(mx.bfloat16)
        vc = mx.random.normal((kvh, num_blocks, bs, d)).astype(mx.bfloat16)
        q = mx.random.normal((t, h, d)).astype(mx.bfloat16)
        group = {"q_index": mx.arange(t, dtype=mx.int32)[:, None], "q_pos": mx.full((t, 1), ctx - 1, mx.int32),
                 "blocks": mx.array(table), "key_pos": mx.arange(width * bs, dtype=mx.int32)}
        kd = mx.random.normal((t, kvh, ctx, d)).astype(mx.bfloat16)
        mx.eval(kc, vc, q, kd, group)
        runs = {f"{nw}x{u}": (lambda nw=nw, u=u: paged_kernel.paged_decode_attention(
            q, kc, vc, group["blocks"], group["q_pos"], scale=d ** -0.5, warps=nw, unroll=u)) for nw, u in configs}
        runs["composed"] = lambda: _attend(q, kc, vc, group, d ** -0.5, -1, 0.0)
        runs["mlx_sdpa_contiguous"] = lambda: mx.fast.scaled_dot_product_attention(
            q[:, :, None], kd, kd, scale=d ** -0.5)
        want = runs["composed"]().reshape(t, -1).astype(mx.float32)
        for label, fn in runs.items():
            try:
                if label[0].isdigit():  # a wrong kernel must not win on speed
                    err = mx.abs(fn().astype(mx.float32) - want).max().item()
                    assert err < 3e-2, f"{label}: max abs error {err}"
                for _ in range(3):
                    mx.eval(fn())
                k = _cupti_kernels(lambda: [mx.eval(fn()) for _ in range(20)], steps=20)
                us = k["gpu_ms_per_step"] * 1e3
                times.setdefault(label, {})[t] = us
                res.add(kind="attention_kernel", config=label, batch=t, context=ctx, gpu_us=us,
                        kernels=k["per_step"], top=k["top"][:4])
                log(f"kernel b={t} ctx={ctx} {label}: {us:.1f} us GPU, {k['per_step']:.0f} kernels")
            except Exception as exc:  # noqa: BLE001
                res.error(f"kernel {label} b={t}", exc)
    tuned = {c: v for c, v in times.items() if c[0].isdigit() and len(v) == len(times["composed"])}
    best = {t: min(v[t] for v in tuned.values()) for t in times["composed"]}
    pick = min(tuned, key=lambda c: max(tuned[c][t] / best[t] for t in best))
    res.data["best"] = pick
    res.save()
    print(pick.replace("x", ","))
    return 0


# ----------------------------------------------------------------------------- correctness
def check(name: str, dtype_name: str, device: str) -> dict:
    """Lowered logits (MLX on `device`) vs transformers on the CPU, same weights: two sequences prefilled
    together (40 and 17 tokens), then 3 decode steps each (teacher-forced), every step's last-token logits."""
    import numpy as np
    import torch

    mlx_setup(device)
    import mlx.core as mx

    cfg = load_config(name)
    dtype = getattr(torch, dtype_name)
    model = torch_model(cfg, dtype, "cpu", init="seed", seed=0)
    t = time.perf_counter()
    host = LOWERED / f"{name}-{dtype_name}"
    try:
        if (host / "meta.json").is_file():  # lowered on this host by `lower` (same torch): skip a second capture
            raise FileExistsError(str(host))
        source, program, info = lower_program(model, name)
        weights = {program.weight_paths[k]: v for k, v in program.weights.items()}
        layers = [vars(x) if not hasattr(x, "__dataclass_fields__") else
                  {f: getattr(x, f) for f in x.__dataclass_fields__} for x in program.attention]
        how = f"captured here (torch {torch.__version__})"
    except Exception as exc:  # noqa: BLE001  torch.export differs across versions: fall back to the carried artefact
        if not isinstance(exc, FileExistsError):
            log(f"capture failed here ({type(exc).__name__}: {exc}); using the carried artefact")
        folder = find_artefact(f"{name}-{dtype_name}")
        meta = json.loads((folder / "meta.json").read_text())
        source, layers = (folder / "step.py").read_text(), meta["layers"]
        state = dict(model.named_parameters(remove_duplicate=False))
        weights = {p: state[p] for p in meta["params"]}
        from safetensors.torch import load_file

        weights.update({p: v for p, v in load_file(str(folder / "constants.safetensors")).items() if p in meta["constants"]})
        weights = with_derived(weights, meta, torch.cat)
        how = f"artefact {folder} (lowered with torch {meta.get('torch')})"
    lower_s = time.perf_counter() - t
    mx_dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}[dtype_name]
    mweights = {p: mx.array(v.detach().to(torch.int32) if v.dtype == torch.int64 else v.detach().contiguous())
                for p, v in weights.items()}
    lm, driver = build_ours(source, mweights, layers, mx_dtype, num_blocks=32)

    rng = np.random.default_rng(0)
    lens = {1: 40, 2: 17}
    steps = 3
    seqs = {s: rng.integers(0, cfg["vocab_size"], size=n + steps).tolist() for s, n in lens.items()}
    for s, toks in seqs.items():
        driver.add(s, toks)
    got = {s: [] for s in seqs}
    work = dict(lens)
    for _ in range(steps + 1):
        logits = lm.step(driver.prepare(work))
        rows = np.array(logits.astype(mx.float32))
        for i, s in enumerate(work):
            got[s].append(rows[i])
        work = {s: 1 for s in seqs}
    errs, scale = [], 0.0
    with torch.no_grad():
        for s, toks in seqs.items():
            ref = model(input_ids=torch.tensor([toks]), use_cache=False).logits[0].float().numpy()
            want = ref[lens[s] - 1: lens[s] + steps]
            mine = np.stack(got[s])
            errs.append(float(np.abs(mine - want).max()))
            scale = max(scale, float(np.abs(want).max()))
    err = max(errs)
    tol = {"float32": 1e-4, "bfloat16": 2e-2}[dtype_name]
    return {"model": name, "dtype": dtype_name, "device": str(mx.default_device()), "lowering": how,
            "lower_s": lower_s, "max_abs_err": err, "max_abs_logit": scale, "rel_err": err / scale,
            "tolerance_rel": tol, "ok": bool(err / scale <= tol), "rows_compared": 2 * (steps + 1),
            "tf32": os.environ.get("MLX_ENABLE_TF32", "default(1)"), "vllm_imported": "vllm" in sys.modules}


def cmd_check(args) -> int:
    out = check(args.model, args.dtype, args.device)
    log(f"check: {out}")
    if args.out:
        path = Path(args.out)
        data = json.loads(path.read_text()) if path.is_file() else {"checks": []}
        data["checks"].append(out)
        data["env"] = environment()
        path.write_text(json.dumps(data, indent=1))
    print(json.dumps(out))
    return 0 if out["ok"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("lower")
    q.add_argument("--models", default="smollm2:bfloat16,llama8b:bfloat16,smollm2:float32")
    q.add_argument("--out", default=str(LOWERED))
    for part in ("torch", "mlx"):
        q = sub.add_parser(part)
        q.add_argument("--models", default="llama8b,smollm2")
        q.add_argument("--out")
        q.add_argument("--batches", default=",".join(map(str, BATCHES)))
        q.add_argument("--prefills", default=",".join(map(str, PREFILLS)))
        if part == "torch":
            q.add_argument("--systems", default="eager,compile")
            q.add_argument("--budget-s", type=float, default=480.0, help="skip torch.compile work started after this")
    q.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    q.add_argument("--profile", default="", help="also split a batch-1 decode step of this model")
    q.add_argument("--systems", default="ours,mlx_lm", help="ours, ours_composed (fused decode kernel off), ours_norm_off (fused add+RMSNorm off), ours_rope_off (RoPE + K/V rows kernel off), mlx_lm")
    q = sub.add_parser("profile")
    q.add_argument("--models", default="llama8b,smollm2")
    q.add_argument("--out")
    q.add_argument("--systems", default="ours,ours_nojit,mlx_lm", help="also: ours_composed (fused decode kernel off), ours_norm_off (fused add+RMSNorm off), ours_rope_off (RoPE + K/V rows kernel off)")
    q.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--prefill", type=int, default=0, help="profile a batch-1 prefill of this many tokens instead")
    q = sub.add_parser("ab")
    q.add_argument("--artefacts", required=True, help="comma-separated folders holding <model>-bfloat16/ lowerings")
    q.add_argument("--models", default="llama8b,smollm2")
    q.add_argument("--batches", default="1")
    q.add_argument("--prefills", default="")
    q.add_argument("--rounds", type=int, default=6)
    q.add_argument("--mlx-lm", action="store_true", help="mlx-lm's model as one more side")
    q.add_argument("--variants", default="", help=f"the first lowering with a kernel off, as more sides: {', '.join(_VARIANTS)}")
    q.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    q.add_argument("--out")
    q = sub.add_parser("kernel")
    q.add_argument("--out")
    q.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    q.add_argument("--batches", default="1,8,32,128")
    q.add_argument("--context", type=int, default=172)
    q.add_argument("--configs", default="4x4,8x2,8x4,16x1,16x2,16x4,32x1,32x2")
    q = sub.add_parser("check")
    q.add_argument("--model", default="smollm2")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    q.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    q.add_argument("--out")
    q = sub.add_parser("report")
    q.add_argument("files", nargs="+")
    q.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "report":
        from _gpu_report import report

        return report(args.files, args.write)
    return {"lower": cmd_lower, "torch": cmd_torch, "mlx": cmd_mlx, "check": cmd_check,
            "profile": cmd_profile, "kernel": cmd_kernel, "ab": cmd_ab}[args.cmd](args)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
