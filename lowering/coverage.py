"""Architecture coverage: tiny random configs of common decoder families, lowered through each front
end and compared with the same weights run eagerly in transformers (prefill, then decode steps).

    python -m lowering.coverage            # runs the matrix and rewrites docs/models.md

tests/test_coverage.py runs the same checks; nothing here is per-model code in the lowering.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=512)

# family -> (model_type, config overrides). head_dim 32: vLLM's attention needs >= 32.
FAMILIES = {
    "llama": ("llama", {}),
    "llama3-rope-scaling": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 128})),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=6)),
    "qwen2-qkv-bias": ("qwen2", dict(hidden_size=128)),  # vLLM's Qwen2 takes head_dim = hidden / heads
    "qwen3-qk-norm": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "gemma2-softcap": ("gemma2", dict(sliding_window=6)),
    "phi3-partial-rotary": ("phi3", dict(partial_rotary_factor=0.5, pad_token_id=0)),
    # GPT-NeoX has no GQA: vLLM (its Transformers backend) would read num_key_value_heads and size the cache wrong
    "gpt-neox-parallel-residual": ("gpt_neox", dict(hidden_size=128, rotary_pct=0.25, use_parallel_residual=True,
                                                    num_key_value_heads=4)),
    "opt-learned-positions": ("opt", dict(ffn_dim=128, word_embed_proj_dim=64)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)),
    "mixtral-moe": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}
PROMPT, DECODE = 12, 4
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def tiny_model(family: str, dtype: str = "float32", seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**_BASE, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).eval()
    for name, p in model.named_parameters():  # norms near 1, so their weights matter to the check
        if p.dim() == 1 and "norm" in name and "bias" not in name:
            p.data = (0.1 if model_type.startswith("gemma") else 1.0) * torch.ones_like(p) + 0.1 * torch.randn_like(p)
    return model


def check(family: str, front: str, dtype: str = "float32") -> dict:
    """Lower one tiny model and compare with transformers eager: max abs error, greedy agreement."""
    import mlx.core as mx
    import numpy as np
    import torch

    from lowering import capture
    from lowering.api import build_model, lower
    from runtime.driver import Driver

    start = time.perf_counter()
    result = {"family": family, "front": front, "dtype": dtype}
    try:
        model = tiny_model(family, dtype)
        if front == "hf":
            program = capture.capture_hf(model, family)
        else:
            from lowering.vllm_build import build_vllm_model

            folder = tempfile.mkdtemp(prefix=f"tiny-{family}-")
            model.save_pretrained(folder)
            vllm_model, config = build_vllm_model(folder, dtype=dtype, max_model_len=512)
            program = capture.capture_vllm(vllm_model, config, family)
        lowered = lower(program)
        runtime_model = build_model(lowered, num_blocks=8, block_size=16)
        tokens = torch.randint(0, 256, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(tokens[None]).logits[0, PROMPT - 1:].float().numpy()
        driver = Driver(runtime_model)
        driver.add(0, tokens.tolist())
        rows = [driver.step({0: PROMPT})[0]] + [driver.step({0: 1})[0] for _ in range(DECODE)]
        got = np.stack([np.array(r.astype(mx.float32)) for r in rows])
        err, top = float(np.abs(got - ref).max()), float(np.abs(ref).max())
        result.update(max_abs_err=err, max_abs_logit=top, greedy_match=bool((got.argmax(-1) == ref.argmax(-1)).all()),
                      ok=err <= TOLERANCE[dtype] * top,
                      missed=[r.name for r in lowered.passes if r.missed])
    except Exception as exc:  # a family we do not cover yet: record why, in one line
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        if "--debug" in sys.argv:
            traceback.print_exc()
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def render(results: list[dict]) -> str:
    lines = [
        "# Model coverage", "",
        "Generated by `python -m lowering.coverage` (do not edit by hand). Each row: a tiny random config of",
        "the family (2 layers, hidden 64 or 128, GQA 4/2, head_dim 32), lowered through the front end and run by the",
        f"MLX runtime ({PROMPT}-token prefill, then {DECODE} decode steps), compared with the same weights in",
        "transformers eager. Tolerance: max abs error <= 1e-4 x max |logit| (f32), 2e-2 (bf16).", "",
        "| family | front | dtype | result | max abs err | max abs logit | greedy | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        status = "ok" if r["ok"] else "FAIL"
        err = f"{r['max_abs_err']:.2e}" if "max_abs_err" in r else "-"
        top = f"{r['max_abs_logit']:.3f}" if "max_abs_logit" in r else "-"
        greedy = {True: "match", False: "differ"}.get(r.get("greedy_match"), "-")
        note = r.get("error", "") or (f"missed: {', '.join(r['missed'])}" if r.get("missed") else "")
        lines.append(f"| {r['family']} | {r['front']} | {r['dtype']} | {status} | {err} | {top} | {greedy} | {note} |")
    ok = sum(r["ok"] for r in results)
    lines += ["", f"{ok} of {len(results)} combinations pass.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowering.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fronts", default="hf,vllm")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "models.md"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    import runtime  # noqa: F401  (fast BLAS before mlx)

    results = []
    for family in FAMILIES:
        for front in args.fronts.split(","):
            for dtype in args.dtypes.split(","):
                r = check(family, front, dtype)
                print(json.dumps(r), flush=True)
                results.append(r)
    Path(args.out).write_text(render(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
