"""The systems the GPU suite runs on MLX, on the same weights: ours (a lowered artefact, driven by
LoweredModel + Driver with its paged KV cache) and mlx-lm's hand-written Llama with its own cache.

Both answer the same calls: `start(prompts)` prefills a batch, `record_step(state)` records one decode
step (lazy argmax tokens), `decode(state, steps, pipelined)` runs steps synchronously (step n+1 built after
step n's tokens reach the host, as the vLLM plugin does) or pipelined (step n+1 recorded from step n's lazy
tokens and launched with `mx.async_eval` before step n is read, as mlx_lm.generate does), and
`record_prefill(prompt)` / `prefill_last(prompt)` run a batch-1 prompt to its last token's argmax.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from gpu_lower import folder_name
from gpu_workloads import BLOCK
from lowering.compile import load_step
from lowering.driver import Driver
from runtime.config import RuntimeConfig
from runtime.kernels import select_device
from runtime.model import CacheLayout, LoweredModel

def mlx_setup(device: str) -> RuntimeConfig:
    """The runtime config from the environment with `device` ("gpu" or "cpu"), MLX's device set from it."""
    config = RuntimeConfig.from_env(dict(os.environ, VLLM_MLX_DEVICE=device))
    select_device(config)
    return config


class Artefact:
    """A lowered step as `gpu.py lower` wrote it: <base>/<model>-<dtype>[-q<bits>g<group>]/{step.py, meta.json,
    constants.safetensors}."""

    def __init__(self, base: Path, model: str, dtype: str = "bfloat16", quantize=None):
        self.folder = Path(base) / folder_name(model, dtype, quantize)
        if not (self.folder / "meta.json").is_file():
            more = f" --models {model}:{dtype} --quantize q{quantize.bits}:{quantize.group_size}" if quantize else ""
            raise SystemExit(f"no lowered artefact in {self.folder}: run `python benchmarks/gpu.py lower "
                             f"--out {base}{more}` (on a machine with torch >= 2.13) and carry the folder along")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.source = (self.folder / "step.py").read_text()
        self.layers = self.meta["layers"]
        self.quantized = self.meta.get("quantized", {})  # weight path -> [bits, group_size]

    def constants(self) -> dict:
        loaded = mx.load(str(self.folder / "constants.safetensors")) if self.meta["constants"] else {}
        return {p: loaded[p] for p in self.meta["constants"]}

    def random_weights(self, dtype, seed: int) -> dict:
        """Every parameter made on MLX's default device (mx.random: N(0, 0.02) matrices, unit norms), never
        through host memory; tied paths share one array; the merged projections concatenated from the very
        arrays mlx-lm reads; the constants the step reads. A weight the artefact reads quantized is quantized
        there with mx.quantize, as mlx-lm's own quantization does, and kept only so: codes at its path,
        "<module>.scales" and "<module>.biases" beside it (the names mlx-lm's quantized layers load)."""
        weights = {}
        for i, (path, spec) in enumerate(sorted(self.meta["params"].items())):
            if path in self.meta["aliases"]:
                continue
            shape = tuple(spec["shape"])
            if len(shape) == 1:
                w = mx.ones(shape, dtype=dtype)
            else:
                w = (mx.random.normal(shape, key=mx.random.key(seed * 100_003 + i)) * 0.02).astype(dtype)
            if path in self.quantized:
                bits, group = self.quantized[path]
                weights.update(quantized_parts(path, *mx.quantize(w, group_size=group, bits=bits)))
                mx.eval([weights[p] for p in quantized_parts(path)])
            else:
                mx.eval(w)  # one weight at a time: temporaries stay small
                weights[path] = w
        for path, canon in self.meta["aliases"].items():
            for mine, theirs in zip(quantized_parts(path), quantized_parts(canon)):
                if theirs in weights:
                    weights[mine] = weights[theirs]
        weights = with_derived(weights, self.meta, mx.concatenate)
        weights.update(self.constants())
        mx.eval(list(weights.values()))
        return weights

    def decode_bytes(self, tied: bool, context: int, batch: int = 1) -> dict:
        """Bytes a decode step must read: every weight matrix once (the embedding only as the LM head when
        tied; untied, the lookup reads B rows: not counted) and the K/V of every layer at `context` tokens. A
        quantized weight counts its codes, scales and biases (scales and biases in the weight's dtype, as
        mx.quantize makes them)."""
        size = {"bfloat16": 2, "float16": 2, "float32": 4}
        total = embed = 0
        for path, spec in self.meta["params"].items():
            if path in self.meta["aliases"]:
                continue
            n = size[spec["dtype"]]
            for d in spec["shape"]:
                n *= d
            if path in self.quantized:
                bits, group = self.quantized[path]
                n = n // size[spec["dtype"]] * bits // 8 + 2 * (n // group)
            total += n
            if path.endswith("embed_tokens.weight"):
                embed = n
        weights = total if tied else total - embed
        dtype = next(iter(self.meta["params"].values()))["dtype"]
        kv = batch * context * sum(2 * x["num_kv_heads"] * x["head_dim"] for x in self.layers) * size[dtype]
        return {"weights": weights, "kv": kv, "total": weights + kv}


def part_name(model: str, quantize=None) -> str:
    """The results file's name for a model's part: "llama8b", or "llama8b q4g64" for a quantized lowering."""
    return model + (f" q{quantize.bits}g{quantize.group_size}" if quantize else "")


def quantized_parts(path: str, *arrays):
    """The paths of a quantized weight's codes, scales and biases (lowering.quantize.part_paths); with the
    arrays, a dict of them."""
    base = path.removesuffix(".weight")
    paths = (path, f"{base}.scales", f"{base}.biases")
    return dict(zip(paths, arrays)) if arrays else paths


def with_derived(weights: dict, meta: dict, cat, quantized: bool | None = None) -> dict:
    """The merged projections (meta["derived"]: path -> {"cat": sources, "dim"}) made from their sources, which
    stay too: mlx-lm reads q/k/v and gate/up apart, ours the merged ones. `quantized`: only the merges of
    quantized weights' parts (codes, scales, biases: made once those exist), or only the others; None: all."""
    parts = {part for p in meta.get("quantized", {}) for part in quantized_parts(p)}
    for path, recipe in meta.get("derived", {}).items():
        if quantized is None or quantized == all(s in parts for s in recipe["cat"]):
            weights[path] = cat([weights[s] for s in recipe["cat"]], recipe["dim"])
    return weights


class Decoder:
    """The decode loops both systems share; a system supplies `record_step(state)`."""

    def decode(self, state: dict, steps: int, pipelined: bool) -> list[int]:
        if not pipelined:
            for _ in range(steps):
                state["tok"] = self.record_step(state)
                host = state["tok"].tolist()
            return host
        pending = None
        for _ in range(steps):
            nxt = self.record_step(state)
            mx.async_eval(nxt)
            if pending is not None:
                pending.tolist()
            pending = state["tok"] = nxt
        return pending.tolist()

    def prefill_last(self, prompt) -> None:
        """One step over a batch-1 prompt; the host waits for the last token's argmax (one sync)."""
        tok, handle = self.record_prefill(prompt)
        tok.tolist()
        self.release(handle)


class Ours(Decoder):
    """An emitted step (`source`, for the attention `layers` it was lowered with) on `weights`, with a paged
    KV cache of `num_blocks` blocks of BLOCK tokens. `step`: the loaded step (lowering.compile.Step), by
    default `source` compiled against this process's kernel table."""

    def __init__(self, source: str, layers: list[dict], weights: dict, dtype, num_blocks: int, step=None,
                 name: str = "ours"):
        layout = CacheLayout(len(layers), layers[0]["num_kv_heads"], layers[0]["head_dim"], BLOCK, dtype)
        self.name = name
        self.model = LoweredModel(step or load_step(source, jit=True), weights, layout, num_blocks)
        self.driver = Driver(self.model)
        self._next = 0

    def add(self, tokens) -> int:
        self._next += 1
        self.driver.add(self._next, [int(x) for x in tokens])
        return self._next

    def release(self, sid) -> None:
        self.driver.release(sid)

    def record_prefill(self, prompt):
        """The prompt's step recorded, not run: its last token's argmax (which evaluates the cache writes with
        it) and the sequence to release."""
        sid = self.add(prompt)
        tok = mx.argmax(self.model.step_lazy(self.driver.prepare({sid: len(prompt)})), axis=-1)
        return mx.depends(tok, list(self.model.kv))[0], sid

    def start(self, prompts) -> dict:
        sids = [self.add(p) for p in prompts]
        logits = self.model.step(self.driver.prepare({s: len(p) for s, p in zip(sids, prompts)}))
        tok = mx.argmax(logits, axis=-1).astype(mx.int32)
        mx.eval(tok)
        return {"sids": sids, "tok": tok}

    def record_step(self, state: dict):
        for s in state["sids"]:
            self.driver.seqs[s].tokens.append(0)  # placeholder: the real id is on the device
        batch = self.driver.prepare({s: 1 for s in state["sids"]})
        return mx.argmax(self.model.step_lazy(batch, input_ids=state["tok"]), axis=-1).astype(mx.int32)

    def finish(self, state: dict) -> None:
        for s in state["sids"]:
            self.driver.release(s)


class MlxLm(Decoder):
    """mlx-lm's Llama (mlx_lm.models.llama) on the same weights as ours. `quantized` (weight path -> [bits,
    group_size]): those layers made quantized first, as mlx-lm loads a quantized checkpoint (`nn.quantize` on
    the freshly built model, whose lazy initial weights are never computed), then given ours."""

    name = "mlx_lm"

    def __init__(self, cfg: dict, weights: dict, quantized: dict | None = None):
        args = dict(cfg)
        rope = args.pop("rope_parameters", None) or {}
        args["rope_theta"] = rope.get("rope_theta", args.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            args["rope_scaling"] = dict(rope)  # mlx-lm 0.32.2 reads only the flat keys of transformers' config
        self.args = llama.ModelArgs.from_dict(args)
        self.model = llama.Model(self.args)
        if quantized:
            formats = {tuple(f) for f in quantized.values()}
            if len(formats) != 1:
                raise SystemExit(f"mlx-lm quantizes a model with one format; this artefact has {sorted(formats)}")
            bits, group = formats.pop()
            paths = set(quantized) | ({"model.embed_tokens.weight"} if "lm_head.weight" in quantized
                                      and self.args.tie_word_embeddings else set())
            nn.quantize(self.model, group_size=group, bits=bits,
                        class_predicate=lambda p, m: f"{p}.weight" in paths and hasattr(m, "to_quantized"))
        names = dict(_flatten(self.model.parameters()))
        own = {k: v for k, v in weights.items() if k in names}
        for part in ("weight", "scales", "biases"):  # tied: torch.export named the one tensor lm_head.weight
            if f"model.embed_tokens.{part}" in names and f"model.embed_tokens.{part}" not in own:
                own[f"model.embed_tokens.{part}"] = weights[f"lm_head.{part}"]
        self.model.load_weights(list(own.items()), strict=True)
        mx.eval(self.model.parameters())

    def logits_last(self, ids, cache):
        h = self.model.model(ids, cache)[:, -1, :]
        if self.args.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def prompt_logits(self, prompt):
        """The last token's logits of a batch-1 prompt, on a fresh cache (lazy)."""
        return self.logits_last(mx.array(prompt)[None], make_prompt_cache(self.model))[0]

    def release(self, handle) -> None:
        pass

    def record_prefill(self, prompt):
        return mx.argmax(self.prompt_logits(prompt)), None

    def start(self, prompts) -> dict:
        cache = make_prompt_cache(self.model)
        tok = mx.argmax(self.logits_last(mx.array(prompts), cache), axis=-1)
        mx.eval(tok)
        return {"cache": cache, "tok": tok}

    def record_step(self, state: dict):
        return mx.argmax(self.model(state["tok"][:, None], cache=state["cache"])[:, -1], axis=-1)

    def finish(self, state: dict) -> None:
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
