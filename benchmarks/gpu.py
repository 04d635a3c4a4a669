"""The GPU suite: the lowered model on MLX's CUDA backend against mlx-lm (and torch), no vLLM.

    python benchmarks/gpu.py lower --out benchmarks/lowered        # CPU, torch >= 2.13: the lowered artefacts
    python benchmarks/gpu.py lower --models llama8b:bfloat16 --quantize q4:64    # a 4-bit lowering
    python benchmarks/gpu.py check --dtype float32                 # on the GPU machine, the folder carried along
    python benchmarks/gpu.py ab --mlx-lm --variants ours_rope_apart --out benchmarks/results/gpu-h100.json
    python benchmarks/gpu.py ab --models llama8b --quantize q4:64 --mlx-lm --variants ours_qgemv_off
    python benchmarks/gpu.py report benchmarks/results/gpu-h100.json

Every measuring command adds its part to the results file of its machine class (--out), replacing that
part's last result; `report` prints the tables of docs/benchmarks.md from it. Shapes and workloads:
benchmarks/gpu_workloads.py; the systems: gpu_systems.py; ours with kernels off: gpu_variants.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runtime, lowering, passes: the GPU machine runs the checkout as it is
sys.path.insert(0, str(ROOT / "benchmarks"))

# subcommand -> (module, what it does); a module is imported only for its command: `bandwidth` and `torch`
# never load MLX, `report` loads neither MLX nor torch
COMMANDS = {
    "lower": ("gpu_lower", "capture + passes + emit the shapes into artefact folders (CPU, no MLX)"),
    "check": ("gpu_check", "lowered logits on MLX's device vs transformers on the CPU, same weights"),
    "ab": ("gpu_ab", "speed: ours, other lowerings, ours with kernels off and mlx-lm, paired rounds in one process"),
    "profile": ("gpu_profile", "host split and CUDA kernels (CUPTI) of one decode step or prefill"),
    "kernel": ("gpu_kernel", "a kernel alone: the paged decode attention per (warps, keys) tune, or the quantized GEMV"),
    "bandwidth": ("gpu_torch", "the device's copy bandwidth (torch), the decode ceiling"),
    "torch": ("gpu_torch", "the bandwidth, then torch eager and torch.compile on the same shapes"),
    "report": ("gpu_report", "the markdown tables of a results file"),
}
RESULTS_H100 = "benchmarks/results/gpu-h100.json"
ARTEFACTS = "benchmarks/lowered"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = {cmd: sub.add_parser(cmd, help=text, description=text) for cmd, (_, text) in COMMANDS.items()}
    q["lower"].add_argument("--models", default="smollm2:bfloat16,llama8b:bfloat16,smollm2:float32",
                            help="model:dtype, comma-separated (models: llama8b, smollm2, tiny, tiny_llama3)")
    q["lower"].add_argument("--out", default=ARTEFACTS, help="artefact folder (default: %(default)s, ignored by git)")
    for cmd in ("lower", "check", "ab", "profile"):
        q[cmd].add_argument("--quantize", default=None, metavar="SPEC",
                            help="q4, q8, q4:32, ... (as VLLM_METAL_QUANTIZE): linear and embedding weights quantized; "
                                 "`lower` writes <model>-<dtype>-q<bits>g<group>/, the others read it and quantize "
                                 "their weights on the device with mx.quantize")
    for cmd in ("check", "ab", "profile", "kernel", "bandwidth", "torch"):
        q[cmd].add_argument("--out", help=f"the results file of this machine class to add to, e.g. {RESULTS_H100} "
                                          "(default: none, the results are only logged)")
    for cmd in ("check", "ab", "profile"):
        q[cmd].add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    for cmd in ("check", "ab", "profile"):
        more = "; more folders, comma-separated, are lowerings to compare with the first" if cmd == "ab" else ""
        q[cmd].add_argument("--artefacts", default=ARTEFACTS, help=f"folder of `lower`'s output (default: %(default)s){more}")
    q["check"].add_argument("--model", default="smollm2")
    q["check"].add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    for cmd in ("ab", "profile", "torch"):
        q[cmd].add_argument("--models", default="llama8b,smollm2")
    q["ab"].add_argument("--batches", default="1,8,32,128")
    q["ab"].add_argument("--prefills", default="512,4096")
    q["ab"].add_argument("--rounds", type=int, default=5)
    q["ab"].add_argument("--mlx-lm", action="store_true", help="mlx-lm's model as one more side")
    q["ab"].add_argument("--variants", default="", help="ours with kernels off as more sides, comma-separated: "
                         "ours_composed, ours_norm_off, ours_rope_off, ours_kv_scatter, ours_rope_apart, "
                         "ours_fused_always, ours_silu_off, ours_qgemv_off (benchmarks/gpu_variants.py)")
    q["profile"].add_argument("--systems", default="ours,mlx_lm", help="ours, ours_nojit, mlx_lm or a variant")
    q["profile"].add_argument("--batch", type=int, default=1)
    q["profile"].add_argument("--prefill", type=int, default=0, help="a batch-1 prefill of this many tokens instead")
    q["kernel"].add_argument("--kernel", default="attention", choices=["attention", "quantized"],
                             help="attention: the paged decode attention per tune; quantized: the quantized GEMV "
                                  "against MLX's quantized matmul and bf16 GEMV on the 8B shape's matrices")
    q["kernel"].add_argument("--rows", default="1,2,4,8", help="quantized: activation rows M")
    q["kernel"].add_argument("--batches", default="1,8,32,128")
    q["kernel"].add_argument("--context", type=int, default=172)
    q["kernel"].add_argument("--tunes", default="4x4,8x2,8x4,16x1,16x2,16x4,32x1,32x2", help="WARPSxKEYS, comma-separated")
    q["torch"].add_argument("--batches", default="1,8,32,128")
    q["torch"].add_argument("--prefills", default="512,4096")
    q["torch"].add_argument("--systems", default="eager,compile")
    q["torch"].add_argument("--budget-s", type=float, default=480.0, help="skip torch.compile work started after this")
    q["report"].add_argument("file", help="a results file, e.g. " + RESULTS_H100)
    q["report"].add_argument("--sides", default="", help="the `ab` columns to show, comma-separated (default: all)")
    q["report"].add_argument("--write", action="store_true", help="also write them into docs/benchmarks.md's GPU section")
    q["report"].add_argument("--section", default="gpu", help="the marked section of docs/benchmarks.md to write: "
                             "gpu (the H100's, default) or gpu-h200 (<!-- NAME:begin --> ... <!-- NAME:end -->)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return importlib.import_module(COMMANDS[args.cmd][0]).main(args)


if __name__ == "__main__":
    sys.exit(main())
