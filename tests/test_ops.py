"""Op lowerings that no family's test reaches on its own, each captured, lowered and run in MLX against torch."""

import runtime  # noqa: F401

import pytest
import torch

from lowering import testing

_NOTHING = testing.as_pass(lambda program: 0)  # lower the captured graph as it is


def _copy_into(x, y):
    """`copy` as the functional graph has it (HunYuan's in-place cache update): y's values, broadcast, in x's dtype."""
    return torch.ops.aten.copy.default(x, y[:1].to(torch.float16)) * 2, torch.expm1(x), torch.min(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_expm1_min_in_mlx(dtype):
    check = testing.check_pass(
        _NOTHING, _copy_into, lambda dt, n: (torch.randn(n, 8, dtype=dt), torch.randn(n, 8, dtype=dt)),
        dtypes=(dtype,), sizes=(1, 5), rtol=0.0 if dtype == torch.float32 else 1e-2,
        atol=1e-6 if dtype == torch.float32 else 2e-2)
    source = check.sources[dtype]
    assert "mx.broadcast_to(" in source and "mx.expm1(" in source, source
