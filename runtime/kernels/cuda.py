"""The kernel table of MLX's CUDA backend: the generic table with kernels of our own (`mx.fast.cuda_kernel`).

- `add_rms_norm`: one kernel for the residual add and the norm (cuda_norm.py);
- `silu_mul` of one token: a kernel that writes a contiguous row, so the down projection's GEMV does not copy
  its input (cuda_silu.py);
- paged attention: RoPE of q and k with the K/V cache rows laid out in one kernel (cuda_rope.py); at decode,
  this step's K/V written into the cache in place by that kernel, and the attention read through the block
  table in place (cuda_attention.py), or the whole decode layer - rotation, cache write and attention - in
  one kernel while its grid is small enough (FUSED_MAX_BLOCKS);
- `quantized_linear` of up to cuda_quantized.MAX_M rows (decode): a GEMV over the packed 4- or 8-bit codes at
  memory bandwidth (cuda_quantized.py); more rows (prefill) take MLX's quantized matmul.
Each can be turned off by name through `RuntimeConfig.kernels_off` (VLLM_METAL_KERNELS_OFF), for A/B runs;
then the generic entry runs.
"""

from __future__ import annotations

import mlx.core as mx

from runtime.kernels import cuda_attention, cuda_norm, cuda_quantized, cuda_rope, cuda_silu, paged
from runtime.kernels.generic import Generic


class Cuda(Generic):
    name = "cuda"
    dist_backend = "nccl"
    ranks_share_memory = False  # one GPU per rank

    def use_rank_device(self, local_rank: int) -> None:
        mx.set_default_device(mx.Device(mx.gpu, local_rank))  # GPU i for the host's rank i, as MLX's launcher does

    def _on(self, kernel: str) -> bool:
        return kernel not in self.config.kernels_off

    def add_rms_norm(self, x, residual, weight, *, eps: float):
        if self._on("add_rms_norm") and cuda_norm.fits(x, residual, weight):
            return cuda_norm.add_rms_norm(x, residual, weight, eps)
        return super().add_rms_norm(x, residual, weight, eps=eps)

    def quantized_linear(self, x, wq, scales, biases, bias=None, *, bits: int, group_size: int):
        if self._on("quantized_gemv") and cuda_quantized.fits(x, wq, scales, biases, bits, group_size):
            out = cuda_quantized.quantized_matmul(x, wq, scales, biases, bits=bits, group_size=group_size)
            return out if bias is None else (out + bias).astype(x.dtype)
        return super().quantized_linear(x, wq, scales, biases, bias, bits=bits, group_size=group_size)

    def silu_mul(self, gate, up):
        if self._on("silu_row") and cuda_silu.fits(gate, up):
            return cuda_silu.silu_mul(gate, up)
        return super().silu_mul(gate, up)

    def rope_paged_attention(self, q, k, v, positions, inv_freq, cache, batch, *, traditional, mscale, num_heads,
                             num_kv_heads, head_dim, scale, sliding_window, logit_cap):
        rope = (positions, inv_freq, traditional, mscale)
        if paged.is_decode(q, batch) and self._in_place(q, k, v, rope, head_dim, batch):
            group, tune = batch["groups"][0], self.config.paged_kernel_tune
            if self._decode_layer(head_dim, 2 * inv_freq.shape[0], traditional, num_heads * q.shape[0]):
                return cuda_attention.paged_decode_rope_attention(
                    q, k, v, *rope, cache, batch["kv_rows"], group["blocks"], group["q_pos"], num_heads=num_heads,
                    scale=scale, window=sliding_window, cap=logit_cap, tune=tune), cache
            # one kernel rotates q and k and writes K/V into the cache; the fused attention, ordered after it by
            # reading its q, is the cache's only reader here
            q = cuda_rope.rope_qkv_into_cache(q, k, v, *rope, cache, batch["kv_rows"], num_heads=num_heads,
                                              num_kv_heads=num_kv_heads, head_dim=head_dim)
            return self.attend_decode(q, cache, group, scale=scale, window=sliding_window, cap=logit_cap), cache
        return super().rope_paged_attention(q, k, v, positions, inv_freq, cache, batch, traditional=traditional,
                                            mscale=mscale, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                            head_dim=head_dim, scale=scale, sliding_window=sliding_window,
                                            logit_cap=logit_cap)

    def _in_place(self, q, k, v, rope, head_dim, batch) -> bool:
        """A decode step's K/V go into the cache from the RoPE kernel (no scatter) where both kernels serve the
        call: the rope one and the fused attention that reads the cache after it."""
        return ("kv_rows" in batch and self._on("kv_in_place") and self._rope_rows(q, k, v, rope, head_dim)
                and self._paged_decode(head_dim))

    def _decode_layer(self, head_dim, rotary_dims, traditional, blocks) -> bool:
        """The one-kernel decode layer serves it: on, the shapes fit, the grid within FUSED_MAX_BLOCKS."""
        return (self._on("decode_layer") and cuda_attention.rope_fits(head_dim, rotary_dims, traditional)
                and (blocks <= cuda_attention.FUSED_MAX_BLOCKS or not self._on("decode_block_limit")))

    def _rope_rows(self, q, k, v, rope, head_dim) -> bool:
        return self._on("rope_rows") and cuda_rope.fits(q, k, v, rope, head_dim)

    def _paged_decode(self, head_dim) -> bool:
        return self._on("paged_decode") and cuda_attention.fits(head_dim)

    def new_kv(self, q, k, v, rope, *, num_heads, num_kv_heads, head_dim):
        if rope is None or not self._rope_rows(q, k, v, rope, head_dim):
            return super().new_kv(q, k, v, rope, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        t = q.shape[0]
        q, rows = cuda_rope.rope_qkv(q, k, v, *rope, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        k, v = rows.reshape(2, num_kv_heads, t, head_dim).transpose(0, 2, 1, 3)  # views, [T, KVH, D] each
        return q, k, v, rows

    def attend_decode(self, q, cache, group, *, scale, window, cap):
        if self._paged_decode(q.shape[-1]):
            return cuda_attention.paged_decode_attention(q, cache, group["blocks"], group["q_pos"], scale=scale,
                                                         window=window, cap=cap, tune=self.config.paged_kernel_tune)
        return super().attend_decode(q, cache, group, scale=scale, window=window, cap=cap)
