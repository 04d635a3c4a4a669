"""What the compiled MLX code runs with: weights, the paged KV cache, batches, the model step.

Importing this package first loads an optimized BLAS so that MLX's CPU matmul is fast on Linux
(see runtime/blas.py); every entry point of the project imports it before mlx. The venv's `.pth`
hook (written by setup.sh) imports it in *every* interpreter, so keep this file cheap: no mlx, no torch.
"""

from runtime import blas as _blas

_blas.preload()
