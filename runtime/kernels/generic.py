"""The generic kernel table: every entry the emitted step calls, in MLX's own ops (mx.fast.* where MLX has
a fused kernel). It runs on every MLX device; the backends (cpu.py, cuda.py, metal.py) subclass it and
replace the entries they have faster kernels for.

The entries are the fused ops that passes create (passes/fused: `rms_norm`, `add_rms_norm`, `rope`,
`silu_mul`, `gelu_mul`, `paged_attention`, `rope_paged_attention`, `paged_mla_attention`, `moe_experts`, the
collectives `all_reduce` and `all_gather`), with tensor arguments
positional and the rest by keyword, in the op's schema order; and the math the op lowerings call
(`exp`, `sigmoid`, `silu`, `softmax`, `linear`, `gather_mm`). Below them, the pieces of paged attention a
backend may replace (`attention`, `new_kv`, `attend_decode`, `attend_group`).
"""

from __future__ import annotations

import mlx.core as mx

from runtime import distributed
from runtime.config import RuntimeConfig
from runtime.kernels import paged

_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654
SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT = 1.702, 7.0  # vLLM's SwigluOAIAndMul (GPT-OSS's MoE activation)


class Generic:
    name = "generic"
    dist_backend = "ring"  # MLX's distributed backend that VLLM_METAL_DIST_BACKEND=auto stands for: TCP between ranks
    ranks_share_memory = True  # the tensor-parallel ranks of one host share its memory (RAM, a Mac's unified memory)

    def __init__(self, config: RuntimeConfig | None = None):
        self.config = config or RuntimeConfig()

    def __repr__(self) -> str:
        return f"<{self.name} kernel table>"

    # -- the math op lowerings call ----------------------------------------------------------------
    def exp(self, x):
        return mx.exp(x)

    def sigmoid(self, x):
        return mx.sigmoid(x)

    def silu(self, x):
        return x * mx.sigmoid(x)

    def gelu(self, x, approximate: str = "none"):
        """GELU computed in f32 and rounded once to x's dtype (torch's erf form, or its tanh form)."""
        x32 = x.astype(mx.float32)
        if approximate == "tanh":
            y = 0.5 * x32 * (1 + mx.tanh(_SQRT_2_OVER_PI * (x32 + 0.044715 * x32 * x32 * x32)))
        else:
            y = 0.5 * x32 * (1 + mx.erf(x32 * _SQRT_HALF))
        return y.astype(x.dtype)

    def softmax(self, x, axis: int = -1):
        return mx.softmax(x, axis=axis, precise=True)

    def linear(self, x, weight_t, bias=None):
        """x @ weight.T (+ bias), given the weight's transposed view (made once, runtime.model.prepare_weights)."""
        return x @ weight_t if bias is None else mx.addmm(bias, x, weight_t)

    def gather_mm(self, x, weight, rhs_indices, sorted_indices: bool = False):
        """x [S, 1, in] @ weight[rhs_indices[s]] ([E, in, out]) -> [S, 1, out]: one matmul per row with that
        row's expert's weight, never a loop over tokens or experts."""
        return mx.gather_mm(x, weight, rhs_indices=rhs_indices, sorted_indices=sorted_indices)

    # -- fused ops (passes/fused) -----------------------------------------------------------------
    def rms_norm(self, x, weight=None, *, eps: float, out_dtype):
        w = weight if weight is None or weight.dtype == x.dtype else weight.astype(x.dtype)
        out = mx.fast.rms_norm(x, w, eps)
        return out if out_dtype == x.dtype else out.astype(out_dtype)

    def add_rms_norm(self, x, residual, weight, *, eps: float):
        h = x + residual
        return h, mx.fast.rms_norm(h, weight, eps)

    def rope(self, x, positions, inv_freq, *, head_dim: int, traditional: bool, mscale: float):
        """RoPE of x [T, heads * D] (or [T, heads, D]) at per-token positions; the first 2 * len(inv_freq)
        dims of each head rotate. Each token is its own "sequence" of one, so it gets its own offset."""
        shape, t = x.shape, x.shape[0]
        heads = x.size // (t * head_dim)
        rot = 2 * inv_freq.shape[0]
        out = mx.fast.rope(x.reshape(t, heads, 1, head_dim), rot, traditional=traditional, base=None, scale=1.0,
                           offset=positions, freqs=mx.reciprocal(inv_freq)).reshape(t, heads, head_dim)
        if mscale != 1.0:  # scales the rotated dims (YaRN), as the torch reference does
            out = out * mscale if rot == head_dim else mx.concatenate([out[..., :rot] * mscale, out[..., rot:]], axis=-1)
        return out.reshape(shape)

    def quantized_linear(self, x, wq, scales, biases, bias=None, *, bits: int, group_size: int):
        """x @ w.T (+ bias) for w in MLX's affine format (wq uint32 [N, K * bits / 32], scales and biases
        [N, K / group_size]), in x's dtype. Scales kept in another dtype (float16 from a GGUF file, exact) make
        MLX compute in float32; the result is rounded to x's dtype once."""
        out = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)
        out = out if bias is None else out + bias
        return out if out.dtype == x.dtype else out.astype(x.dtype)

    def quantized_embedding(self, wq, scales, biases, indices, *, bits: int, group_size: int, out_dtype):
        """The rows `indices` of w, in MLX's affine format, dequantized to `out_dtype`."""
        return mx.dequantize(wq[indices], scales[indices], biases[indices], group_size=group_size,
                             bits=bits).astype(out_dtype)

    def silu_mul(self, gate, up):
        return self.silu(gate) * up

    def gelu_mul(self, gate, up, *, approximate: str):
        return self.gelu(gate, approximate) * up

    def moe_experts(self, x, topk_weights, topk_ids, w13, w2, w13_bias=None, w2_bias=None, *, activation: str):
        """All (token, expert) pairs at once, grouped by expert (one sort), through two `gather_mm`s over the
        stacked expert weights, back to token order, weighted and summed in f32: mlx-lm's SwitchGLU. The
        activations as in passes/fused/moe_experts.py (swigluoai: GPT-OSS's interleaved, clamped SwiGLU)."""
        k, inter = topk_ids.shape[1], w2.shape[2]
        ids = topk_ids.flatten()
        order = mx.argsort(ids)  # pairs grouped by expert: sorted gathers
        pairs = ids[order]
        h = self.gather_mm(mx.take(x, order // k, axis=0)[:, None, :], mx.swapaxes(w13, -1, -2), pairs,
                           sorted_indices=True)
        if w13_bias is not None:
            h = h + mx.take(w13_bias, pairs, axis=0)[:, None, :].astype(h.dtype)
        if activation == "swigluoai":
            gate = mx.minimum(h[..., ::2], SWIGLUOAI_LIMIT)
            up = mx.clip(h[..., 1::2], -SWIGLUOAI_LIMIT, SWIGLUOAI_LIMIT)
            act = gate * self.sigmoid(SWIGLUOAI_ALPHA * gate) * (up + 1)
        else:
            gate = h[..., :inter]
            act = self.silu(gate) if activation == "silu" else self.gelu(gate, "tanh" if activation == "gelu_tanh" else "none")
            act = act * h[..., inter:]
        y = self.gather_mm(act, mx.swapaxes(w2, -1, -2), pairs, sorted_indices=True)[:, 0, :]
        if w2_bias is not None:
            y = y + mx.take(w2_bias, pairs, axis=0).astype(y.dtype)
        unsorted = mx.take(y, mx.argsort(order), axis=0).reshape(-1, k, y.shape[-1])
        return mx.sum(unsorted * topk_weights[..., None].astype(mx.float32), axis=1).astype(x.dtype)

    def paged_attention(self, q, k, v, cache, batch, sinks=None, *, num_heads, num_kv_heads, head_dim, scale,
                        sliding_window, logit_cap):
        return paged.paged_attention(self, q, k, v, cache, batch, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                     head_dim=head_dim, scale=scale, window=sliding_window, cap=logit_cap, sinks=sinks)

    def rope_paged_attention(self, q, k, v, positions, inv_freq, cache, batch, sinks=None, *, traditional, mscale,
                             num_heads, num_kv_heads, head_dim, scale, sliding_window, logit_cap):
        """paged_attention of q and k given un-rotated: rotated here, where the cache rows are laid out."""
        return paged.paged_attention(self, q, k, v, cache, batch, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                     head_dim=head_dim, scale=scale, window=sliding_window, cap=logit_cap,
                                     rope=(positions, inv_freq, traditional, mscale), sinks=sinks)

    def paged_mla_attention(self, q, kv_c, k_pe, kv_b_weight, cache, batch, *, num_heads, qk_nope_head_dim,
                            qk_rope_head_dim, v_head_dim, kv_lora_rank, scale):
        return paged.latent_attention(self, q, kv_c, k_pe, kv_b_weight, cache, batch, num_heads=num_heads,
                                      qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                                      v_head_dim=v_head_dim, kv_lora_rank=kv_lora_rank, scale=scale)

    # -- collectives over this process's MLX group (runtime/distributed.py) -------------------------------
    def all_reduce(self, x, *, group: str):
        """The sum of x over the ranks of `group` (vLLM's tensor-parallel group: row-parallel linears, the
        vocab-parallel embedding)."""
        return mx.distributed.all_sum(x, group=distributed.group(group))

    def all_gather(self, x, *, dim: int, group: str, world_size: int):
        """The ranks' x concatenated along `dim`, in rank order (vLLM's logits: each rank holds a slice of the
        vocabulary). MLX gathers along axis 0; the rank axis is then moved next to `dim` and merged with it."""
        gathered = mx.distributed.all_gather(x, group=distributed.group(group, world_size))
        dim = dim % x.ndim
        if dim == 0:
            return gathered
        parts = mx.moveaxis(gathered.reshape(world_size, *x.shape), 0, dim)
        return parts.reshape(*x.shape[:dim], world_size * x.shape[dim], *x.shape[dim + 1:])

    def use_rank_device(self, local_rank: int) -> None:
        """Put this process on the device of its rank on this host: the one device every rank shares, here."""

    # -- pieces of paged attention (runtime/kernels/paged.py) ------------------------------------------
    def attention(self, q, k, v, *, scale: float, mask):
        """Attention of q [S, H, Lq, D] over k, v [S, KVH, Lk, D] (GQA), boolean mask or "causal"."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def new_kv(self, q, k, v, rope, *, num_heads, num_kv_heads, head_dim):
        return paged.new_kv(self, q, k, v, rope, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)

    def attend_decode(self, q, cache, group, *, scale, window, cap):
        return paged.attend_decode(self, q, cache, group, scale=scale, window=window, cap=cap)

    def attend_group(self, q, k, v, cache, group, *, scale, window, cap, in_order=False):
        """A group of prompts or chunks (not a pure decode step): [S, Lq, H, D]."""
        return paged.attend_group(self, q, k, v, cache, group, scale=scale, window=window, cap=cap, in_order=in_order)
