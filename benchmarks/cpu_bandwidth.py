"""Section 3: memory bandwidth of this machine, a large copy with torch on 2 threads.

GB/s = 2 * bytes / time (each element read once and written once); 1 GiB buffers, far beyond cache.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import summary  # noqa: E402


def main() -> int:
    import torch

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    torch.set_num_threads(threads)
    n = 1 << 28  # 256 Mi float32 = 1 GiB
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)  # warm-up (page faults)
    b.copy_(a)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        rates.append(2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    print(json.dumps({"threads": threads, "buffer_bytes": a.nbytes, "gb_s": summary(rates)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
