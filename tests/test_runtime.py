"""The runtime on the real SmolLM2-135M (f32, HF front end): batched greedy generation with chunked
prefill equals each sequence alone (and HF transformers), prefix sharing, block sizes; plus the
env-var configuration and the KV memory plan. Real MLX, torch and weights; no mocks."""

import runtime  # noqa: F401  (fast BLAS before mlx)

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowering import capture
from lowering.api import build_model, lower
from lowering.driver import Driver
from runtime import memory
from runtime.config import BLOCK_SIZES, KERNEL_SWITCHES, ConfigError, RuntimeConfig
from runtime.device import device_memory_bytes, gpu_available, ram_bytes
from runtime.kernels import select_device

# ----------------------------------------------------------------------------- configuration

BAD_VALUES = [
    ("VLLM_METAL_MEMORY_FRACTION", "0"),
    ("VLLM_METAL_MEMORY_FRACTION", "1.5"),
    ("VLLM_METAL_MEMORY_FRACTION", "-0.2"),
    ("VLLM_METAL_MEMORY_FRACTION", "nan"),
    ("VLLM_METAL_MEMORY_FRACTION", "half"),
    ("VLLM_METAL_USE_MLX", "2"),
    ("VLLM_METAL_USE_MLX", "maybe"),
    ("VLLM_MLX_DEVICE", "tpu"),
    ("VLLM_MLX_DEVICE", "metal"),
    ("VLLM_METAL_BLOCK_SIZE", "12"),
    ("VLLM_METAL_BLOCK_SIZE", "512"),
    ("VLLM_METAL_BLOCK_SIZE", "4"),
    ("VLLM_METAL_BLOCK_SIZE", "sixteen"),
    ("VLLM_METAL_DEBUG", "yes please"),
    ("VLLM_METAL_KERNELS_OFF", "decode_layer,nope"),
    ("MLX_PAGED_KERNEL_TUNE", "3,4"),
    ("MLX_PAGED_KERNEL_TUNE", "8"),
    ("VLLM_METAL_QUANTIZE", "q3"),
    ("VLLM_METAL_QUANTIZE", "q4:48"),
    ("VLLM_METAL_DIST_BACKEND", "tcp"),
]
ALL_VARS = sorted({name for name, _ in BAD_VALUES} | {"VLLM_METAL_DEBUG_DIR"})


@pytest.fixture
def clean_env(monkeypatch):
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_invalid_value_names_the_variable(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        RuntimeConfig.from_env()
    message = str(info.value)
    assert name in message and repr(value) in message and "accepted" in message, message
    assert "\n" not in message


def test_defaults(clean_env, tmp_path):
    cfg = RuntimeConfig.from_env()
    assert cfg.memory_fraction == "auto" and cfg.use_mlx is True and cfg.block_size == 16
    assert cfg.debug is False and cfg.debug_dir
    assert cfg.device == ("gpu" if gpu_available() else "cpu") and cfg.dist_backend == "auto"
    for backend in ("ring", "NCCL", " mpi ", "jaccl", "auto"):
        clean_env.setenv("VLLM_METAL_DIST_BACKEND", backend)
        assert RuntimeConfig.from_env().dist_backend == backend.strip().lower()
    clean_env.setenv("VLLM_METAL_DEBUG", "1")
    clean_env.setenv("VLLM_METAL_DEBUG_DIR", str(tmp_path))
    clean_env.setenv("VLLM_METAL_MEMORY_FRACTION", "0.25")
    clean_env.setenv("VLLM_METAL_USE_MLX", "0")
    cfg = RuntimeConfig.from_env()
    assert (cfg.debug, cfg.debug_dir, cfg.memory_fraction, cfg.use_mlx) == (True, str(tmp_path), 0.25, False)
    for size in BLOCK_SIZES:
        clean_env.setenv("VLLM_METAL_BLOCK_SIZE", str(size))
        assert RuntimeConfig.from_env().block_size == size


def test_device_selection(clean_env):
    clean_env.setenv("VLLM_MLX_DEVICE", "cpu")
    assert RuntimeConfig.from_env().device == "cpu"
    clean_env.setenv("VLLM_MLX_DEVICE", "gpu")
    if gpu_available():
        cfg = RuntimeConfig.from_env()
        assert cfg.device == "gpu"
    else:  # asked for explicitly where MLX has none: refused (tests/test_gpu_device.py checks the message)
        with pytest.raises(ConfigError):
            RuntimeConfig.from_env()
        clean_env.delenv("VLLM_MLX_DEVICE")
        cfg = RuntimeConfig.from_env()
        assert cfg.device == "cpu"
    table = select_device(cfg)
    assert table.config.device == cfg.device and table.name == ("cpu" if cfg.device == "cpu" else table.name)
    assert mx.default_device() == (mx.gpu if cfg.device == "gpu" else mx.cpu)


def test_kernel_switches_and_tune(clean_env):
    clean_env.setenv("VLLM_METAL_KERNELS_OFF", "decode_layer, kv_in_place")
    clean_env.setenv("MLX_PAGED_KERNEL_TUNE", "4,2")
    cfg = RuntimeConfig.from_env()
    assert cfg.kernels_off == {"decode_layer", "kv_in_place"} and cfg.paged_kernel_tune == (4, 2)
    assert all(name in repr(KERNEL_SWITCHES) for name in ("decode_layer", "paged_decode", "silu_row"))


# ----------------------------------------------------------------------------- SmolLM2 fixtures

TEXT = (
    "The history of paged memory begins with the Atlas computer at the University of Manchester, which "
    "introduced the idea that a program could address more memory than the machine physically held. "
    "Pages moved between a small fast core store and a large slow drum, and the hardware kept a table "
    "mapping each virtual page to its frame. Decades later the same idea returned in a new setting: "
    "language model servers store the keys and values of attention in fixed-size blocks, so that many "
    "requests of very different lengths can share one pool of memory without fragmentation. A block "
    "table per request plays the role of the page table, and requests that begin with the same system "
    "prompt can point at the same physical blocks. Scheduling then becomes a question of how many "
    "blocks are free, which requests to admit, and when to preempt one to make room for another."
)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """(HF torch model, Lowered program, tokens of TEXT): lowered once for the module (~40 s)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tokens = AutoTokenizer.from_pretrained(smollm2_path)(TEXT)["input_ids"]
    assert len(tokens) >= 150
    return model, lower(capture.capture_hf(model, name="SmolLM2-135M")), tokens


@pytest.fixture(scope="module")
def built(smollm2):
    """One LoweredModel per block size, built on first use (same 2048-token cache for each)."""
    models = {}

    def get(block_size):
        if block_size not in models:
            models[block_size] = build_model(smollm2[1], num_blocks=2048 // block_size, block_size=block_size)
        return models[block_size]

    return get


def prompts_of(tokens, lengths):
    """Prompts of the given lengths cut from different places of TEXT (so they do not all share a prefix)."""
    return {i: tokens[(7 * i) % 80:(7 * i) % 80 + n] for i, n in enumerate(lengths)}


def alone(model, prompts, max_new):
    return {i: Driver(model).generate({i: p}, max_new)[i] for i, p in prompts.items()}


LENGTHS = [3, 90, 17, 45, 8, 64, 31, 76]


@pytest.fixture(scope="module")
def reference(smollm2, built):
    """Greedy tokens of each LENGTHS prompt run alone (whole-prompt prefill), block size 16."""
    prompts = prompts_of(smollm2[2], LENGTHS)
    return prompts, alone(built(16), prompts, 8)


def test_batched_chunked_generation_equals_alone(smollm2, built, reference):
    prompts, expected = reference
    driver = Driver(built(16))
    got = driver.generate(prompts, 8, chunk=16)  # long prompts prefill in chunks while short ones decode
    assert got == expected
    assert driver.seqs == {} and len(driver.free) == driver.model.num_blocks  # every block came back
    # the lowered "alone" run is itself right: HF transformers' greedy continuation of the longest prompt
    hf_model, _, _ = smollm2
    with torch.no_grad():
        ids = torch.tensor([prompts[1]])
        hf = hf_model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    assert hf[0, len(prompts[1]):].tolist() == expected[1]


def test_mixed_step_shapes(built, smollm2):
    """A single step may mix a fresh prefill, a continued chunk and decodes: logits match alone runs."""
    tokens = smollm2[2]
    model = built(16)
    a, b, c = tokens[:40], tokens[50:70], tokens[100:103]
    driver = Driver(model)
    driver.add(0, a)
    driver.add(1, b)
    driver.step({0: 24, 1: 19})  # 0: first chunk, 1: all but its last token
    driver.add(2, c)
    rows = driver.step({0: 16, 1: 1, 2: 3})  # 0: continued chunk, 1: decode-like, 2: new prefill
    for seq_id, prompt in ((0, a), (1, b), (2, c)):
        ref = Driver(model)
        ref.add(9, prompt)
        want = np.array(ref.step({9: len(prompt)})[9])
        np.testing.assert_allclose(np.array(rows[seq_id]), want, atol=1e-4, rtol=0)


def test_prefix_sharing(built, smollm2):
    tokens, bs = smollm2[2], 16
    model = built(bs)
    prefix = tokens[:48]
    tails = {1: tokens[60:71], 2: tokens[120:127]}

    shared = Driver(model)
    shared.add(0, prefix)
    shared.step({0: 48})
    prefix_blocks = list(shared.seqs[0].blocks)
    before = [np.array(layer[0][:, mx.array(prefix_blocks)]) for layer in model.kv]  # K
    for seq_id, tail in tails.items():
        shared.add(seq_id, prefix + tail, share_from=0, shared_tokens=48)
    got = shared.step({seq_id: len(tail) for seq_id, tail in tails.items()})  # both tails in one step
    after = [np.array(layer[0][:, mx.array(prefix_blocks)]) for layer in model.kv]
    assert all(np.array_equal(x, y) for x, y in zip(before, after)), "a shared block was rewritten"
    assert all(shared.seqs[s].blocks[:3] == prefix_blocks for s in tails)
    assert shared.ref[prefix_blocks].tolist() == [3, 3, 3]
    # prefix blocks written once: 3 for the prefix, then one fresh block per tail
    assert shared.blocks_written == 3 + 2

    unshared = Driver(model)
    for seq_id, tail in tails.items():
        unshared.add(seq_id, prefix + tail)
        want = unshared.step({seq_id: 48 + len(tail)})[seq_id]
        # f32 rounding only: the two steps have different shapes (2 tails vs one 59-token prefill), so
        # SDPA and the matmuls sum in different orders; 1e-4 abs is ~3e-6 of these logits (|max| ~30).
        np.testing.assert_allclose(np.array(got[seq_id]), np.array(want), atol=1e-4, rtol=0)
    assert unshared.blocks_written == 2 * math.ceil((48 + 11) / bs)

    shared.release(1)
    assert prefix_blocks[0] not in shared.free  # still used by 0 and 2
    shared.release(2)
    shared.release(0)
    assert sorted(shared.free) == list(range(model.num_blocks))


@pytest.mark.parametrize("block_size", [8, 32])
def test_block_sizes_give_same_tokens(built, reference, block_size):
    prompts, expected = reference
    subset = {i: prompts[i] for i in (0, 1, 2, 5)}  # lengths 3, 90, 17, 64: within, across, beyond blocks
    got = Driver(built(block_size)).generate(subset, 8, chunk=16)
    assert got == {i: expected[i] for i in subset}


# ----------------------------------------------------------------------------- memory plan


def test_plan_kv_blocks(built, smollm2):
    model = built(16)
    layout = model.layout
    assert layout.bytes_per_block() == 2 * 30 * 16 * 3 * 64 * 4
    wb = memory.weights_bytes(model.weights)
    assert wb == sum(w.nbytes for w in model.weights.values()) > 500e6
    dims = dict(hidden_size=576, num_heads=9)
    device = 24 * memory.GiB

    plan = memory.plan_kv_blocks(layout, wb, 0.1, device, max_model_len=8192, **dims)
    assert plan.num_blocks * layout.bytes_per_block() + wb + plan.headroom_bytes <= 0.1 * device
    assert (plan.num_blocks + 1) * layout.bytes_per_block() + wb + plan.headroom_bytes > 0.1 * device
    auto = memory.plan_kv_blocks(layout, wb, "auto", device, max_model_len=2048, **dims)
    assert auto.num_blocks == memory.AUTO_SEQS * 2048 // 16  # room for AUTO_SEQS full-length sequences
    capped = memory.plan_kv_blocks(layout, wb, "auto", device, max_model_len=8192, **dims)
    assert capped.num_blocks == int(memory.AUTO_KV_CAP * device) // layout.bytes_per_block()  # ... within the cap
    small = memory.plan_kv_blocks(layout, wb, "auto", device, max_model_len=8192, max_num_seqs=1, **dims)
    assert small.num_blocks == 8192 // 16

    with pytest.raises(memory.MemoryPlanError) as info:
        memory.plan_kv_blocks(layout, wb, 0.01, device, max_model_len=8192, **dims)
    message = str(info.value)
    needed = wb + plan.headroom_bytes + 512 * layout.bytes_per_block()
    assert "VLLM_METAL_MEMORY_FRACTION" in message and f"{needed} bytes" in message, message
    minimum = float(message.split("use at least ")[1].split()[0])
    assert memory.plan_kv_blocks(layout, wb, minimum, device, max_model_len=8192, **dims).num_blocks >= 512
    with pytest.raises(ConfigError):
        memory.plan_kv_blocks(layout, wb, 1.5, device, max_model_len=8192, **dims)


def test_device_and_process_memory():
    ram = ram_bytes()
    assert 1 << 30 < ram < 1 << 50
    assert device_memory_bytes("cpu") == ram
    usage = memory.process_memory()
    assert 0 < usage["rss"] <= usage["peak_rss"]
