"""Mixture-of-experts lowering: the ops transformers' experts use (sort, histc, grouped matmul,
index_put_) and the fused `mlx.moe_experts` op of the vLLM front, each run in MLX against torch.
No loop over tokens: the experts are gather-matmuls over the stacked expert weights."""

import runtime  # noqa: F401

import pytest
import torch

from lowering import testing

_NOTHING = testing.as_pass(lambda program: 0)  # lower the captured graph as it is


def _tiny_moe_block(dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = "grouped_mm"  # what from_pretrained / from_config pick
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        p.data = torch.randn_like(p) * 0.2
    return block.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_experts_lower_to_gather_mm(dtype):
    block = _tiny_moe_block(dtype)
    check = testing.check_pass(
        _NOTHING, block, lambda dt, n: (torch.randn(1, n, 32, dtype=dt),), dtypes=(dtype,), sizes=(1, 5, 33),
        pre=("cleanup",), rtol=0.0 if dtype == torch.float32 else 2e-2, atol=1e-5 if dtype == torch.float32 else 2e-2)
    source = check.sources[dtype]
    assert source.count("k.gather_mm(") == 2 and "for " not in source.split("def step")[1], source
    for case in check.cases:
        print(case)


def _routing(x, gate_w, k):
    probs = torch.softmax(x.float() @ gate_w.float().t(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids.to(torch.int32)


def _swigluoai(h):
    """GPT-OSS's activation as transformers writes it (modeling_gpt_oss: interleaved gate/up, clamped at 7)."""
    gate, up = h[..., ::2].clamp(max=7.0), h[..., 1::2].clamp(min=-7.0, max=7.0)
    return (up + 1) * (gate * torch.sigmoid(gate * 1.702))


def _dense_reference(x, w, ids, w13, w2, act, b13=None, b2=None):
    """Token by token: the plain definition the fused op must equal."""
    out = torch.zeros(x.shape[0], w2.shape[1])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = x[t].float() @ w13[e].float().T + (0 if b13 is None else b13[e].float())
            if act is _swigluoai:
                a = _swigluoai(h)
            else:
                gate, up = h.chunk(2)
                a = act(gate) * up
            out[t] += float(w[t, j]) * (a @ w2[e].float().T + (0 if b2 is None else b2[e].float()))
    return out


@pytest.mark.parametrize("activation, biases", [("silu", False), ("gelu", False), ("silu", True), ("swigluoai", True)])
def test_moe_experts_reference_is_the_definition(activation, biases):
    torch.manual_seed(1)
    x, w13, w2 = torch.randn(9, 16), torch.randn(5, 24, 16) * 0.3, torch.randn(5, 16, 12) * 0.3
    b13, b2 = (torch.randn(5, 24), torch.randn(5, 16)) if biases else (None, None)
    w, ids = _routing(x, torch.randn(5, 16), 3)
    act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "swigluoai": _swigluoai}[activation]
    got = torch.ops.mlx.moe_experts(x, w, ids, w13, w2, activation, b13, b2)
    want = _dense_reference(x, w, ids, w13, w2, act, b13, b2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _Experts(torch.nn.Module):
    def __init__(self, dtype, experts=6, k=2, hidden=32, inter=24, activation="silu", biases=False):
        super().__init__()
        torch.manual_seed(2)
        self.gate = torch.nn.Parameter(torch.randn(experts, hidden).to(dtype))
        # weights large enough that swigluoai's clamps at +-7 are reached
        scale = 2.0 if activation == "swigluoai" else 0.2
        self.w13 = torch.nn.Parameter((torch.randn(experts, 2 * inter, hidden) * scale).to(dtype))
        self.w2 = torch.nn.Parameter((torch.randn(experts, hidden, inter) * 0.2).to(dtype))
        self.b13 = torch.nn.Parameter(torch.randn(experts, 2 * inter).to(dtype)) if biases else None
        self.b2 = torch.nn.Parameter(torch.randn(experts, hidden).to(dtype)) if biases else None
        self.k, self.activation = k, activation

    def forward(self, x):
        w, ids = _routing(x, self.gate, self.k)
        return torch.ops.mlx.moe_experts(x, w, ids, self.w13, self.w2, self.activation, self.b13, self.b2)


@pytest.mark.parametrize("dtype, activation, biases", [
    (torch.float32, "silu", False), (torch.float32, "gelu_tanh", False), (torch.bfloat16, "silu", False),
    (torch.float16, "silu", False), (torch.float32, "swigluoai", True), (torch.bfloat16, "swigluoai", True)])
def test_moe_experts_op_in_mlx(dtype, activation, biases):
    check = testing.check_pass(
        _NOTHING, _Experts(dtype, activation=activation, biases=biases), lambda dt, n: (torch.randn(n, 32, dtype=dt),),
        dtypes=(dtype,), sizes=(1, 2, 17, 70), pre=("cleanup",),
        rtol=0.0 if dtype == torch.float32 else 1e-2,
        # biased swigluoai outputs reach |y| ~ 80 (clamps reached): f32 within ~1e-6 of that
        atol={torch.float32: 1e-4 if biases else 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype])
    source = check.sources[dtype]
    assert source.count("= k.moe_experts(") == 1, source


def _sorting_ops(x, ids):
    values, order = torch.sort(x, dim=-1, descending=True)
    top, where = torch.topk(x[:, :4].t(), 3, dim=0)  # a leading axis of static size
    counts = torch.histc(ids.float(), bins=5, min=0, max=4)
    inverse = torch.empty_like(order[0]).index_put_([order[0]], torch.arange(order.shape[1]))
    return values, order, top, where, counts, torch.cumsum(counts, 0, dtype=torch.int32), inverse


def test_sort_topk_histc_index_put_in_mlx():
    def make(dt, n):
        return torch.randn(n, 7, dtype=dt), torch.randint(0, 5, (n, 2))

    testing.check_pass(_NOTHING, _sorting_ops, make, sizes=(4, 9), pre=("cleanup",))
