"""The Hugging Face front's unit batch axis dropped (passes/squeeze_batch.py): the pass harness on
small functions (torch and MLX vs eager), and the real front end's graph."""

import torch
import torch.nn.functional as F

from lowering import capture
from lowering.api import lower
from passes.squeeze_batch import squeeze_batch


def hf_like(x, w_in, w_out, bias):
    """A batch-1 block as transformers writes it: [1, T, H] activations, column slices, a reshape back
    to [1, T, -1], `[0]` at the end."""
    h = F.linear(x[None], w_in)  # [1, T, 2F]
    gate, up = h[:, :, :24], h[..., 24:]
    y = torch.tanh(gate) * up + bias  # bias [F]: broadcasts the same with or without the axis
    y = y.reshape(-1, 24).reshape(1, x.shape[0], -1)
    return (F.linear(y, w_out) * 0.5)[0]


def _make(dtype, n):
    return (torch.randn(n, 16, dtype=dtype), torch.randn(48, 16, dtype=dtype) / 4,
            torch.randn(16, 24, dtype=dtype) / 5, torch.randn(24, dtype=dtype))


def test_unit_axis_goes_and_values_match(check_pass):
    report = check_pass(squeeze_batch, hf_like, _make, expect_matched=1, ops_before={"unsqueeze", "select"},
                        ops_absent_after={"unsqueeze", "select"}, dtypes=(torch.float32, torch.bfloat16),
                        sizes=(1, 5, 17))
    after = report.after[torch.float32]
    assert "reshape" not in after and "[1, " not in after, after  # both reshapes were the identity without it
    r = report.results[torch.float32]
    assert r.nodes_after < r.nodes_before, report.summary()


def test_an_op_that_needs_the_axis_gets_it_back(check_pass):
    def reduce_over_tokens(x, w_in, w_out, bias):
        h = F.linear(x[None], w_in)[:, :, :24] + bias  # squeezed so far
        return h.sum(dim=1)  # reads axis 1 of the [1, T, F] value: not a row-wise op

    report = check_pass(squeeze_batch, reduce_over_tokens, _make, ops_after={"unsqueeze", "sum"},
                        dtypes=(torch.float32,), sizes=(3, 9))
    assert "unsqueeze" in report.after[torch.float32]


def test_broadcast_operand_with_the_axis_keeps_it(check_pass):
    def full_rank_scale(x, w_in, scale):  # scale [1, 1, 48]: would not broadcast the same without the axis
        return (F.linear(x[None], w_in) * scale)[0]

    report = check_pass(squeeze_batch, full_rank_scale,
                        lambda dtype, n: (*_make(dtype, n)[:2], torch.randn(1, 1, 48, dtype=dtype)),
                        ops_after={"unsqueeze"}, dtypes=(torch.float32,), sizes=(4,))
    assert "linear(%x, %w_in)" in report.after[torch.float32]  # squeezed up to the op that needs the axis


def test_hf_front_graph_has_no_unit_axis():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    lowered = lower(capture.capture_hf(LlamaForCausalLM(cfg).eval()))
    graph = lowered.program.graph
    linears = [n for n in graph.nodes if n.target == torch.ops.aten.linear.default]
    assert linears and all(n.args[0].meta["val"].dim() == 2 for n in linears), [
        (n.name, tuple(n.args[0].meta["val"].shape)) for n in linears]
    ops = lowered.op_histogram()
    assert "unsqueeze" not in ops and "select.int" not in ops and "reshape" not in ops, ops
    result = next(r for r in lowered.passes if r.name == "squeeze_batch")
    assert result.matched == 1 and result.nodes_after < result.nodes_before, result
    assert "expand_dims" not in lowered.source and "[:, :, " not in lowered.source
