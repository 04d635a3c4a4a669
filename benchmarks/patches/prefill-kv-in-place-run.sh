# r12d (after stage1): K/V of fresh prompts written by the RoPE kernel (no scatter): GPU tests, checks (their prefill of
# two fresh prompts goes this way, then decode reads that cache), prefill ab: ours vs ours_kv_scatter vs mlx-lm
set -u
export PYTHONUNBUFFERED=1
R=r12d
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu-$R-card.txt
python3 -m pytest -q -x -p no:cacheprovider -k "rope_kernel_writes or (rope_attention_kernel and bfloat16) or (paged and compiled)" \
  tests/test_gpu_device.py > $OUT/gpu-$R-pytest.log 2>&1; rc=$?
tail -1 $OUT/gpu-$R-pytest.log; grep -m3 "^E " $OUT/gpu-$R-pytest.log
[ $rc = 0 ] || exit 5
python3 benchmarks/gpu.py check --dtype float32 --out $OUT/gpu-$R-check-f32.json 2>&1 | tail -1 | cut -c1-400
python3 benchmarks/gpu.py check --dtype bfloat16 --out $OUT/gpu-$R-check-bf16.json 2>&1 | tail -1 | cut -c1-400
rm -rf .gpuab/ours && cp -r benchmarks/results/gpu-lowered .gpuab/ours
for m in smollm2 llama8b; do
  python3 benchmarks/gpu.py ab --artefacts .gpuab/ours --variants ours_kv_scatter --mlx-lm --models $m \
    --rounds 3 --batches 1 --prefills 512,4096 --out $OUT/gpu-$R-ab-$m.json 2>&1 | grep -v " r[0-9] " | tail -6
done
