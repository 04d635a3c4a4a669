"""Capture a torch model's whole step as ONE ATen FX graph with a dynamic token dimension.

Mechanism: `torch.export` (non-strict) of a small wrapper whose forward is one model step:
`(input_ids[T], positions[T], logits_indices[R]) -> logits[R, vocab]`. Export gives ATen-level IR
(so patterns match one canonical spelling of each op, whatever the model's Python said), lifts
parameters and buffers to placeholders named after their module paths, records `nn_module_stack`
and source lines on every node, and keeps T and R symbolic: one capture serves every batch.
(docs/architecture.md has the measurements behind this choice.)

Two front ends build the wrapper: `capture_vllm` (vLLM's own model classes; each attention layer is
vLLM's opaque unified attention op) and `capture_hf` (transformers causal LMs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from lowering import stamp
from passes.program import AttentionLayer, Program, exported_weights

CAPTURES = 0  # how many captures this process ran (tests assert one lowering serves all shapes)
_MAX_TOKENS = 1 << 16
STAMP = True  # export the first layers of N identical ones and copy the rest (lowering/stamp.py); False: the whole model


class _Step(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, forward):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, input_ids, positions, logits_indices):
        return self._forward(self.model, input_ids, positions, logits_indices)


def export_step(step: _Step, example_tokens: int = 8) -> tuple[torch.fx.GraphModule, dict, dict]:
    """Export a step wrapper; returns (graph module, placeholder -> tensor, placeholder -> module path)."""
    global CAPTURES
    CAPTURES += 1
    t = torch.export.Dim("num_tokens", min=2, max=_MAX_TOKENS)
    r = torch.export.Dim("num_logits", min=2, max=_MAX_TOKENS)
    ids = torch.zeros(example_tokens, dtype=torch.int64)
    positions = torch.arange(example_tokens, dtype=torch.int64)
    rows = torch.tensor([example_tokens // 2, example_tokens - 1], dtype=torch.int64)
    with torch.no_grad():
        ep = torch.export.export(
            step, (ids, positions, rows), dynamic_shapes=({0: t}, {0: t}, {0: r}), strict=False
        )
    weights, paths = exported_weights(ep, step, strip="model.")  # "model." is the wrapper's attribute
    return ep.graph_module, weights, paths


def _program(gm, weights, paths, layers, meta, float32_sources=None) -> Program:
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name not in weights]
    return Program(gm, weights, paths, inputs, layers, meta, float32_sources=float32_sources or {})


# -- Hugging Face transformers ----------------------------------------------------------------
def _hf_forward(model, input_ids, positions, logits_indices):
    backbone = model.base_model  # model.model, model.transformer, model.gpt_neox, ...: whatever the family calls it
    hidden = backbone(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
    hidden = hidden.last_hidden_state[0][logits_indices]
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def hf_attention_layers(config) -> list[AttentionLayer]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    scale = getattr(text, "query_pre_attn_scalar", None)
    scale = scale**-0.5 if scale else head_dim**-0.5
    window = getattr(text, "sliding_window", None) or -1
    if not getattr(text, "use_sliding_window", True):
        window = -1
    default = "sliding_attention" if window > 0 else "full_attention"  # Mistral: one window for all layers
    types = getattr(text, "layer_types", None) or [default] * text.num_hidden_layers
    cap = getattr(text, "attn_logit_softcapping", None) or 0.0
    return [
        AttentionLayer(i, f"model.layers.{i}.self_attn", heads, kv_heads, head_dim, scale,
                       window if types[i] == "sliding_attention" else -1, cap)
        for i in range(text.num_hidden_layers)
    ]


def capture_hf(model: torch.nn.Module, name: str = "hf") -> Program:
    """Capture a transformers causal LM (eval mode, SDPA attention)."""
    start = time.perf_counter()
    model = model.eval()
    if hasattr(model.config, "_attn_implementation"):
        model.config._attn_implementation = "sdpa"
    gm, weights, paths, stamped = _export(model, _hf_forward)
    layers = hf_attention_layers(model.config)
    meta = {
        "model": name,
        "front": "hf",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "layers": len(layers),
        "capture_s": time.perf_counter() - start,
        "stamped": stamped,
        **_expectations(model, len(layers)),
    }
    return _program(gm, weights, paths, layers, meta)


def _export(model: torch.nn.Module, forward, template: int = 1):
    """Export the step (either front); a stack of N > template + 1 interchangeable decoder layers is exported
    with layers 0..template and stamped to N (lowering/stamp.py: ~0.3 s of export per layer saved). Returns
    (graph module, weights, paths, stamped)."""
    stack = stamp.uniform_layers(model) if STAMP else None
    if stack is not None and len(stack[1]) > template + 1:
        path, layers = stack
        with stamp.first_layers(model, path, layers, template + 1):
            gm, weights, paths = export_step(_Step(model, forward))
        if stamp.stamp(gm, weights, paths, model, path, len(layers), template=template):
            return gm, weights, paths, True
    return *export_step(_Step(model, forward)), False


def _expectations(model: torch.nn.Module, num_layers: int) -> dict:
    """How many RMSNorms and RoPEs the passes should fuse, from the model's own modules: one per
    RMSNorm module call, and q and k of every layer when the model has a rotary embedding."""
    names = [type(m).__name__.lower() for m in model.modules()]
    has_rope = any("rotary" in n or "rope" in n for n in names)
    return {
        "expected_norms": sum("rmsnorm" in n for n in names) or None,
        "expected_ropes": 2 * num_layers if has_rope else None,
    }


# -- vLLM ---------------------------------------------------------------------------------------
def _vllm_forward(model, input_ids, positions, logits_indices):
    hidden = model(input_ids, positions)
    return model.compute_logits(hidden[logits_indices])


@contextlib.contextmanager
def _norm_weights_as_parameters(model: torch.nn.Module):
    """vLLM's RMSNorm hands `self.weight.data` (a detached alias) to its op; export can only keep
    that as an anonymous constant and refuses it. During capture, pass the Parameter itself so the
    weight stays a named input. Same math, same tensor. (vLLM binds each module's forward at
    construction, so the swap is per module.)"""
    import types

    from vllm import ir
    from vllm.model_executor.layers.layernorm import RMSNorm

    def forward(self, x, residual=None):
        weight = self.weight if self.has_weight else None
        if residual is None:
            return ir.ops.rms_norm(x, weight, self.variance_epsilon, self.variance_size_override)
        return ir.ops.fused_add_rms_norm(x, residual, weight, self.variance_epsilon, self.variance_size_override)

    norms = [m for m in model.modules() if type(m) is RMSNorm]
    saved = [m._forward_method for m in norms]
    for m in norms:
        m._forward_method = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m, method in zip(norms, saved):
            m._forward_method = method


_ROUTERS = ("FusedTopKRouter", "GroupedTopKRouter", "FusedTopKBiasRouter", "CustomRoutingRouter", "CPURouter")


def route(router, hidden, router_logits):
    """(topk_weights, topk_ids) by vLLM's own plain-torch routing (the CPU platform's CPURouter,
    which covers softmax top-k, grouped top-k with a correction bias, and custom routing functions),
    configured from the layer's router. Top-k over biased scores without groups (FusedTopKBiasRouter)
    is grouped top-k with one group."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    if type(router).__name__ not in _ROUTERS:
        raise NotImplementedError(f"MoE router {type(router).__name__} is not supported by the MLX lowering yet")
    if getattr(router, "_hash_indices_table", None) is not None:
        raise NotImplementedError("hash-routed MoE layers (expert by token id) are not supported by the MLX lowering yet")
    if getattr(router, "num_fused_shared_experts", 0):
        raise NotImplementedError("MoE routers with fused shared experts are not supported by the MLX lowering yet")
    groups = getattr(router, "num_expert_group", None)
    biased_flat = type(router).__name__ == "FusedTopKBiasRouter"
    cpu = CPURouter(
        top_k=router.top_k, global_num_experts=router.global_num_experts,
        use_grouped_topk=biased_flat or bool(getattr(router, "use_grouped_topk", groups is not None)),
        num_expert_group=1 if biased_flat else groups, topk_group=1 if biased_flat else getattr(router, "topk_group", None),
        renormalize=getattr(router, "renormalize", True), scoring_func=getattr(router, "scoring_func", "softmax"),
        routed_scaling_factor=getattr(router, "routed_scaling_factor", 1.0),
        e_score_correction_bias=getattr(router, "e_score_correction_bias", None),
        custom_routing_function=getattr(router, "custom_routing_function", None),
    )
    return cpu._compute_routing(hidden, router_logits, None)


def moe_problems(runner) -> list[str]:
    """What an MoE layer has that the MLX lowering does not support yet (empty: it lowers)."""
    experts = runner.routed_experts
    return [what for what, bad in [
        ("quantized experts", type(experts.quant_method).__name__ != "UnquantizedFusedMoEMethod"),
        ("non-gated activation", not runner.activation.is_gated),
        (f"activation {runner.activation.value}",
         runner.activation.value not in ("silu", "gelu", "gelu_tanh", "swigluoai")),
        ("router weights applied to the input of top-k > 1 experts",
         bool(getattr(experts, "apply_router_weight_on_input", False)) and runner.router.top_k != 1),
        ("zero experts", type(runner.router).__name__ == "ZeroExpertRouter"),
    ] if bad]


@contextlib.contextmanager
def moe_entries(model: torch.nn.Module, experts_fn):
    """Each MoE runner's entry into vLLM's opaque `moe_forward` op (which finds the layer and its expert weights
    by name at run time) replaced by plain torch: the runner's gate, vLLM's routing (`route`), the routed experts
    as `experts_fn(runner, hidden, topk_weights, topk_ids)`, and the shared experts (vLLM's own module, run in
    line). Everything around the entry (scales, reductions, the shared + routed sum) stays vLLM's code."""
    import types

    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    def entry(self, hidden, router_logits, shared_input, input_ids, layer_name, unpadded):
        if self.gate is not None:
            router_logits, _ = self.gate(hidden)
        topk_weights, topk_ids = route(self.router, hidden, router_logits)
        routed = experts_fn(self, hidden, topk_weights, topk_ids)
        if self._shared_experts is None:
            return routed
        return self._shared_experts._layer(shared_input), routed

    runners = [m for m in model.modules() if isinstance(m, MoERunner)]
    saved = [m.__dict__.get("_forward_entry") for m in runners]
    for m in runners:
        m._forward_entry = types.MethodType(entry, m)
    try:
        yield
    finally:
        for m, old in zip(runners, saved):
            if old is None:
                del m._forward_entry
            else:
                m._forward_entry = old


def _mlx_experts(runner, hidden, topk_weights, topk_ids):
    problems = moe_problems(runner)
    if problems:
        raise NotImplementedError(
            f"MoE layer {runner.layer_name}: {', '.join(problems)} not supported by the MLX lowering yet")
    experts = runner.routed_experts
    if getattr(experts, "apply_router_weight_on_input", False):  # top-1 (Llama 4): the weight scales the input
        hidden = hidden * topk_weights.to(hidden.dtype)
        topk_weights = torch.ones_like(topk_weights)
    return torch.ops.mlx.moe_experts.default(hidden, topk_weights, topk_ids, experts.w13_weight, experts.w2_weight,
                                             runner.activation.value, getattr(experts, "w13_bias", None),
                                             getattr(experts, "w2_bias", None))


def _moe_experts_as_mlx(model: torch.nn.Module):
    """During capture each MoE layer's experts become one `mlx.moe_experts(x, topk_weights, topk_ids, w13, w2,
    activation, w13_bias, w2_bias)` on the layer's Parameters (named graph inputs); see `moe_entries`."""
    return moe_entries(model, _mlx_experts)


def vllm_attention_layers(vllm_config) -> list[AttentionLayer]:
    """The model's attention layers as vLLM registered them (static forward context), in order. A multi-head
    latent attention layer's cache is one plane of [kv_lora_rank + rope] rows, one KV head."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    found = [
        (name, layer) for name, layer in vllm_config.compilation_config.static_forward_context.items()
        if isinstance(layer, (Attention, MLAAttention))
    ]
    found.sort(key=lambda item: [int(p) if p.isdigit() else p for p in item[0].split(".")])
    layers = []
    for i, (name, layer) in enumerate(found):
        impl = layer.impl
        if isinstance(layer, MLAAttention):
            layers.append(AttentionLayer(i, name, layer.num_heads, 1, layer.head_size, float(layer.scale),
                                         cache_planes=1))
            continue
        window = getattr(impl, "sliding_window", None) or -1  # tokens a query sees, itself included
        layers.append(AttentionLayer(
            i, name, layer.num_heads, layer.num_kv_heads, layer.head_size, float(layer.impl.scale),
            int(window), float(getattr(impl, "logits_soft_cap", None) or 0.0),
        ))
    return layers


def _attach_sinks(model: torch.nn.Module, vllm_config, layers: list[AttentionLayer]) -> None:
    """Each attention layer with sinks names the module path of its sinks Parameter (a graph input the attention
    pass reads: vLLM's attention op finds them by layer name)."""
    paths = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    context = vllm_config.compilation_config.static_forward_context
    for i, layer in enumerate(layers):
        sinks = getattr(getattr(context[layer.name], "impl", None), "sinks", None)
        if sinks is not None:
            layers[i] = dataclasses.replace(layer, sinks=paths[id(sinks)])


def vllm_problems(model: torch.nn.Module, vllm_config) -> list[str]:
    """Everything the model's layers need that the MLX lowering does not support yet, all of it (capture would
    stop at the first): attention sinks held outside the model's parameters, KV caches shared across layers,
    non-causal attention, and each kind of MoE layer problem (`moe_problems`)."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    found = []
    params = {id(p) for p in model.parameters()}
    sinks = [name for name, layer in vllm_config.compilation_config.static_forward_context.items()
             if getattr(layer, "has_sink", False) and id(getattr(layer.impl, "sinks", None)) not in params]
    if sinks:
        found.append(f"attention sinks that are not model parameters ({len(sinks)} layers) are not supported by the "
                     "MLX lowering yet")
    shared = [name for name, layer in vllm_config.compilation_config.static_forward_context.items()
              if getattr(layer, "kv_sharing_target_layer_name", None)]
    if shared:
        found.append(f"layers reading another layer's KV cache ({len(shared)} layers) are not supported by the MLX "
                     "lowering yet")
    # vLLM's encoder-only backend wrapper (EncoderOnlyAttention, PrefillPrefixLMAttention) builds non-causal
    # metadata: a prompt that attends to itself bidirectionally
    bidirectional = [name for name, layer in vllm_config.compilation_config.static_forward_context.items()
                     if getattr(getattr(layer, "attn_backend", None), "__name__", "").startswith("EncoderOnlyAttention_")]
    if bidirectional:
        found.append(f"non-causal (prefix-LM) attention over the prompt ({len(bidirectional)} layers) is not "
                     "supported by the MLX lowering yet")
    moe = {problem for m in model.modules() if isinstance(m, MoERunner) for problem in moe_problems(m)}
    if moe:
        found.append(f"MoE layers: {', '.join(sorted(moe))} not supported by the MLX lowering yet")
    return found


@contextlib.contextmanager
def _latent_attention_as_mlx(model: torch.nn.Module):
    """vLLM's multi-head latent attention layer reaches its backend through opaque ops that find the layer (and
    the `kv_b_proj` weight the backend absorbs) by name. During capture each MLA layer's forward becomes one
    `mlx.paged_mla_attention(q, kv_c, k_pe, kv_b_proj.weight, layer, ...)` on the layer's Parameter (a named
    graph input), writing the latent cache vLLM's MLA KV spec describes."""
    import types

    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    def forward(self, q, kv_c_normed, k_pe, output_shape=None, q_dcp_replicated=None):
        if self.use_sparse or getattr(self, "indexer", None) is not None or self.sliding_window:
            raise NotImplementedError(f"MLA layer {self.layer_name}: sparse or windowed latent attention is not "
                                      "supported by the MLX lowering yet")
        t = q.shape[0]
        return torch.ops.mlx.paged_mla_attention.default(
            q.reshape(t, -1), kv_c_normed, k_pe.reshape(t, -1), self.kv_b_proj.weight, self.layer_name,
            self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank,
            float(self.scale))

    mla = [m for m in model.modules() if isinstance(m, MLAAttention)]
    for m in mla:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in mla:
            del m.forward


def capture_vllm(model: torch.nn.Module, vllm_config, name: str | None = None) -> Program:
    """Capture a model vLLM built (inside vLLM's config context, custom ops on their native path)."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    start = time.perf_counter()
    model.eval()  # vLLM's loader sets eval mode only after the weights load; a check before must not see dropout
    layers = vllm_attention_layers(vllm_config)
    problems = vllm_problems(model, vllm_config)
    if problems:
        raise NotImplementedError("; ".join(problems))
    _attach_sinks(model, vllm_config, layers)
    with set_current_vllm_config(vllm_config), set_forward_context(None, vllm_config, num_tokens=8), \
            _norm_weights_as_parameters(model), _moe_experts_as_mlx(model), _latent_attention_as_mlx(model):
        gm, weights, paths, stamped = _export(model, _vllm_forward, template=2)  # layer 0 has no residual input
    dtype = vllm_config.model_config.dtype
    meta = {
        "model": name or vllm_config.model_config.model,
        "front": "vllm",
        "dtype": str(dtype).removeprefix("torch."),
        "layers": len(layers),
        "capture_s": time.perf_counter() - start,
        "stamped": stamped,
        **_expectations(model, len(layers)),
    }
    return _program(gm, weights, paths, layers, meta, _float32_rope_caches(model, set(paths.values())))


def _float32_rope_caches(model: torch.nn.Module, paths: set[str]) -> dict[str, torch.Tensor]:
    """vLLM computes each rotary embedding's cos/sin cache in float32, then keeps it in the model's dtype:
    the float32 original (vLLM's own `_compute_cos_sin_cache`) of every cache the graph reads that was
    rounded, by module path, for passes/rope.py to read the frequencies off at full precision."""
    found, computed = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):  # layers share one module: computed once
        cache, path = getattr(module, "cos_sin_cache", None), f"{name}.cos_sin_cache"
        if path not in paths or not isinstance(cache, torch.Tensor) or cache.dtype == torch.float32:
            continue
        if id(module) not in computed:
            try:
                computed[id(module)] = module._compute_cos_sin_cache().float()
            except (AttributeError, TypeError):  # a class whose cache needs more than its own state
                computed[id(module)] = None
        exact = computed[id(module)]
        if exact is not None and exact.shape == cache.shape:
            found[path] = exact
    return found

