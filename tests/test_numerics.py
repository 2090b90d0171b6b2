"""Numerics: float32 against float64 on large kernels, NaN/Inf propagation, memory guards."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shiftwise import ShiftWiseConv2d, TilePlan, shiftwise_conv2d, split_kernel
from shiftwise.tiling import merge_tiles


@pytest.mark.parametrize("k,hw,n", [(61, 128, 5), (51, 128, 5), ((51, 5), 128, 5), (31, 96, 3)])
def test_float32_within_1e5_of_float64(k, hw, n):
    k = (k, k) if isinstance(k, int) else k
    w = torch.randn(2, *k, dtype=torch.float64) / (k[0] * k[1]) ** 0.5
    x = torch.randn(1, 2, hw, hw, dtype=torch.float64)
    tiles, plan = split_kernel(w, n)
    exact = F.conv2d(x, w[:, None], padding=(k[0] // 2, k[1] // 2), groups=2)
    y32 = shiftwise_conv2d(x.float(), tiles.float(), plan, backend="taichi")
    rel = ((y32.double() - exact).abs().max() / exact.abs().max()).item()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("k", [(15, 15), (13, 13), (51, 5)])
def test_nan_inf_reach_exactly_the_tile_windows(value, k):
    # 0 * NaN = NaN, as in F.conv2d: a non-finite input reaches every output whose tile windows
    # cover it, which is F.conv2d's reach with the kernel of all tile taps (the plan's footprint).
    tiles, plan = split_kernel(torch.randn(3, *k, dtype=torch.float64), 5)
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    x[0, 1, 2, 17] = value
    y = shiftwise_conv2d(x, tiles, plan, backend="taichi")
    footprint = merge_tiles(torch.ones_like(tiles), plan)[:, None]
    reach = F.conv2d(x.isfinite().logical_not().double(), footprint, padding=plan.info.padding, groups=3) > 0
    assert torch.equal(~y.isfinite(), reach)
    assert torch.equal(y.isfinite(), shiftwise_conv2d(x, tiles, plan, backend="torch").isfinite() | ~reach)
    if k == (15, 15):  # tiles cover the kernel exactly: identical to F.conv2d with the dense kernel
        dense = F.conv2d(x, merge_tiles(tiles, plan, k)[:, None], padding=7, groups=3)
        assert torch.equal(y.isnan(), dense.isnan()) and torch.equal(y.isinf(), dense.isinf())


def test_huge_plans_refused_before_allocating():
    with pytest.raises(MemoryError, match=r"GiB.*smaller kernel_size"):
        ShiftWiseConv2d(4096, 30001, small_kernel=3)
    with pytest.raises(MemoryError, match="GiB"):
        TilePlan.grid(100000, 5001, 1)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_backward_matches_reference_on_random_geometry(data):
    c = data.draw(st.integers(1, 3))
    n = data.draw(st.sampled_from([1, 3, 5]))
    per_channel = [data.draw(st.lists(st.tuples(st.integers(-9, 9), st.integers(-9, 9)), max_size=3, unique=True))
                   for _ in range(c)]
    plan = TilePlan.from_lists(per_channel, n)
    hw = (data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)))
    x = torch.randn(2, c, *hw, dtype=torch.float64)
    w = torch.randn(plan.num_tiles, n, n, dtype=torch.float64)
    b = torch.randn(c, dtype=torch.float64)
    g = torch.randn(2, c, *hw, dtype=torch.float64)
    grads = []
    for backend in ("taichi", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        shiftwise_conv2d(*leaves[:2], plan, leaves[2], backend=backend).backward(g)
        # no tile at all: the output does not depend on x, and autograd may leave its grad None
        grads.append([t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves])
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
