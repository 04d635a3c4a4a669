"""What the compiled MLX code runs with: weights, the paged KV cache, batches, the model step.

Importing this package points MLX's CPU matmul at an optimized BLAS on Linux (see runtime/blas.py);
every entry point of the project imports it. The venv's `.pth`
hook (written by setup.sh) imports it in *every* interpreter, so keep this file cheap: no mlx, no torch.
"""

from runtime import blas as _blas

_blas.preload()
