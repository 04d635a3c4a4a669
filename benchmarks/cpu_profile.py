"""Where a batch-1 decode step's CPU time goes: `perf record` of the lowered SmolLM2 decoding, samples grouped.

The model is the one `cpu_compiler.py` measures (ours: vLLM's torch model -> capture_vllm -> passes -> compiled
MLX; q4: the bundled GGUF). After a prompt and a warm-up, `perf` samples every thread of this process while it
decodes; the samples are grouped by what ran: this project's CPU kernels by kind, MLX's graph evaluation
(building, scheduling and freeing the step's arrays), MLX's own op kernels (JIT-fused elementwise ops,
copies, scatters), malloc/free, the pool's threads waiting for work, and the OS (context switches, futexes).
Shares are of CPU time over all threads. Needs Linux `perf` allowed to attach to this process (root, or
kernel.perf_event_paranoid <= 1). Prints one JSON line.

    .venv/bin/python benchmarks/cpu_profile.py --dtype q4 --seconds 8
"""

from __future__ import annotations

import runtime  # noqa: F401  (first: the optimized BLAS for MLX's CPU backend before mlx.core)

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import mlx.core as mx
from transformers import AutoTokenizer

from cpu_compiler import DTYPES, Ours, prompt_tokens
from weights.bundled import prepare

# (group, dso pattern, symbol pattern): the first match names a sample's group
GROUPS = [
    ("4-bit GEMV (ours)", r"_cpu_ext", r"q4"),
    ("8-bit GEMV (ours; the tied LM head)", r"_cpu_ext", r"q8"),
    ("dense GEMV and GEMM (ours: f32, bf16, f16 weights)", r"_cpu_ext", r"gemv|gemm|matmul|dequant|widen"),
    ("paged attention (ours)", r"_cpu_ext", r"attention|heads_scores|accumulate|softmax"),
    ("pool threads waiting for work (ours)", r"_cpu_ext", r"Pool|parallel_for|_M_run"),
    ("other (ours)", r"_cpu_ext", r""),
    ("BLAS", r"blas", r""),
    ("memory allocation (malloc/free)", r"libc", r"malloc|free|unlink_chunk|consolidate|tcache"),
    ("MLX op kernels (copies, scatters, fused elementwise)", r"libc", r"mem(move|cpy|set)"),
    ("MLX graph evaluation (build, schedule, free)", r"libmlx|libstdc", r"eval|compile|schedul|array::|allocator|"
                                                                       r"Hashtable|Function_handler|shared_ptr|"
                                                                       r"detach|release|vector|Stream|Event"),
    ("MLX op kernels (copies, scatters, fused elementwise)", r"libmlx|\.so$", r""),
    ("OS: context switches, futexes, interrupts", r"kernel", r""),
    ("Python (driver, step arguments)", r"python|numpy|multiarray", r""),
]


def group_of(dso: str, sym: str) -> str:
    for name, d, s in GROUPS:
        if re.search(d, dso) and re.search(s, sym):
            return name
    return "other"


def perf_groups(data: str) -> dict[str, float]:
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "-g", "none",
                          "--stdio", "--field-separator", "\t"], capture_output=True, text=True, check=True).stdout
    shares: dict[str, float] = {}
    for line in out.splitlines():
        if not line or line.startswith("#"):
            continue
        pct, dso, sym = (line.split("\t") + ["", ""])[:3]
        g = group_of(dso.strip(), sym.strip())
        shares[g] = shares.get(g, 0.0) + float(pct.strip().rstrip("%"))
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="q4")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    if shutil.which("perf") is None:
        sys.exit("cpu_profile.py needs Linux `perf` (linux-tools / linux-perf)")

    path = str(prepare("smollm2"))
    ours = Ours(path, args.dtype, 4096)
    prompt = prompt_tokens(AutoTokenizer.from_pretrained(path), args.prompt)
    seq, row = ours.prefill(prompt)
    ours.decode(seq, row, 16)  # warm-up: mx.compile traces the decode shapes
    ours.done(seq)
    seq, row = ours.prefill(prompt)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        rec = subprocess.Popen(["perf", "record", "-F", "1999", "-p", str(os.getpid()), "-o", data, "--", "sleep",
                                str(args.seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # perf attached
        steps, t = 0, time.perf_counter()
        while rec.poll() is None:  # decode (this thread: MLX's streams are per thread) until perf is done
            ours.decode(seq, row, 1)
            steps += 1
        elapsed = time.perf_counter() - t
        if rec.returncode:
            sys.exit(f"perf record failed (allowed to attach? see kernel.perf_event_paranoid): {rec.stderr.read().strip()}")
        shares = perf_groups(data)
    print(json.dumps({"dtype": args.dtype, "prompt": args.prompt, "seconds": args.seconds, "mlx": mx.__version__,
                      "steps": steps, "ms_per_step": elapsed / max(steps, 1) * 1e3, "cpus": os.cpu_count(),
                      "cpu_time_share_percent": shares}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
