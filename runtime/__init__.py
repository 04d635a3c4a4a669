"""What the compiled MLX code runs with: weights, the paged KV cache, batches, the model step.

Importing this package points MLX's CPU matmul at an optimized BLAS on Linux (see runtime/blas.py);
every entry point of the project imports it. The venv's `.pth`
hook (written by setup.sh) imports it in *every* interpreter, so keep this file cheap: no mlx, no torch.
"""

import os as _os

from runtime import blas as _blas

# float32 means float32: MLX runs f32 matmuls as TF32 on CUDA (and M5 GPUs) unless told otherwise,
# which cost 1e-3 relative error on the GPU against 1e-6 with it off (docs/benchmarks.md, GPU section).
# torch keeps TF32 off by default too. A user who wants the speed sets MLX_ENABLE_TF32=1.
_os.environ.setdefault("MLX_ENABLE_TF32", "0")
_blas.preload()
