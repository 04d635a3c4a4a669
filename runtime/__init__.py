"""What the compiled MLX code runs with: weights, the paged KV cache, batches, the model step.

Importing this package points MLX's CPU matmul at an optimized BLAS on Linux (see runtime/blas.py);
every entry point of the project imports it. The package's `vllm_metal_blas.pth` hook imports it in
*every* interpreter of the environment, so keep this file cheap and free of side effects beyond the
BLAS: no mlx, no torch, no environment variables (those belong where the runtime picks its device,
runtime/device.py).
"""

from runtime import blas as _blas

_blas.preload()
