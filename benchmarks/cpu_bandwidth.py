"""Memory bandwidth of this machine: a copy of a 1 GiB float32 buffer (far beyond cache) with torch.

GB/s = 2 * bytes / time (each element read once and written once). Prints one JSON line.

    .venv/bin/python benchmarks/cpu_bandwidth.py --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    threads, repeats = args.threads, args.repeats
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
