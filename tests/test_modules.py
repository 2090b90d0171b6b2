"""ShiftWiseConv2d: conversion from/to dense, multi-branch structures, state dicts, errors."""
import copy

import pytest
import torch
from torch import nn

from conftest import assert_close
from shiftwise import ShiftWiseConv2d
from shiftwise.tiling import merge_tiles


def _bn(c, dtype=torch.float64):
    bn = nn.BatchNorm2d(c, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn.eval()


def _dw(c, k, dtype=torch.float64, bias=False):
    k = (k, k) if isinstance(k, int) else k
    return nn.Conv2d(c, c, k, padding=(k[0] // 2, k[1] // 2), groups=c, bias=bias, dtype=dtype)


@pytest.mark.parametrize("k,hw", [(51, (56, 56)), (13, (7, 7)), (47, (14, 14)), (49, (10, 23))])
@pytest.mark.parametrize("n", [5, 3])
def test_slak_three_branches_with_bn(k, hw, n):
    c = 4
    branches = [(_dw(c, (k, 5)), _bn(c)), (_dw(c, (5, k)), _bn(c)), (_dw(c, 5), _bn(c))]
    sw = ShiftWiseConv2d.from_branches(branches, small_kernel=n, backend="taichi")
    if n == 5:
        assert sw.plan.info.uniform == (21 if k > 13 else 5)
    x = torch.randn(1, c, *hw, dtype=torch.float64)
    expected = sum(bn(conv(x)) for conv, bn in branches)
    assert_close(sw(x), expected)


@pytest.mark.parametrize("k", [31, 29, 27, 13])
def test_replknet_square_plus_small(k):
    c = 3
    branches = [(_dw(c, k), _bn(c)), (_dw(c, 5), _bn(c))]
    sw = ShiftWiseConv2d.from_branches(branches, backend="taichi")
    x = torch.randn(2, c, 14, 14, dtype=torch.float64)
    assert_close(sw(x), sum(bn(conv(x)) for conv, bn in branches))


def test_from_dense_with_bn_and_to_dense_round_trip():
    conv, bn = _dw(5, (13, 7), bias=True), _bn(5)
    sw = ShiftWiseConv2d.from_dense(conv, bn=bn)
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    assert_close(sw(x), bn(conv(x)))
    dense = sw.to_dense()
    assert dense.kernel_size == (13, 7) and dense.padding == (6, 3) and dense.groups == 5
    assert_close(dense(x), bn(conv(x)))
    plain = ShiftWiseConv2d.from_dense(conv)
    assert torch.equal(plain.to_dense().weight, conv.weight) and torch.equal(plain.to_dense().bias, conv.bias)


def test_to_dense_keeps_full_extent_when_tiles_reach_beyond_kernel_size():
    sw = ShiftWiseConv2d(3, (29, 29), small_kernel=5, dtype=torch.float64)  # compact grid covers 30x30
    dense = sw.to_dense()
    assert dense.kernel_size == sw.plan.info.extent == (31, 31)
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    assert_close(dense(x), sw(x))


def test_scratch_init_is_comparable_to_conv2d():
    sw = ShiftWiseConv2d(64, 13, small_kernel=5)  # 9 tiles a channel: 225 taps
    ref = nn.Conv2d(64, 64, 15, padding=7, groups=64)  # 225 taps
    assert sw.weight.shape == (64 * 9, 5, 5)
    bound = sw.weight.abs().max().item()
    assert bound <= 1 / 15 and bound > 0.9 / 15
    assert abs(sw.weight.std().item() - ref.weight.std().item()) < 0.1 * ref.weight.std().item()
    assert "64, kernel_size=(13, 13), small_kernel=5, tiles=576 (9/channel)" in repr(sw)


def test_state_dict_round_trip_and_resize_on_load():
    conv = _dw(4, (51, 5), bias=True)
    sw = ShiftWiseConv2d.from_dense(conv)
    sd = sw.state_dict()
    assert set(sd) == {"weight", "bias", "tile_offsets", "tile_dy", "tile_dx"}
    assert sd["tile_offsets"].dtype == torch.int32
    other = ShiftWiseConv2d(4, 13, dtype=torch.float64)  # another tile count
    weight_param = other.weight
    other.load_state_dict(sd)
    assert other.weight is weight_param  # optimizers keep a valid reference
    x = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    assert torch.equal(other(x), sw(x))
    clone = copy.deepcopy(sw)
    assert torch.equal(clone(x), sw(x))
    with pytest.raises(RuntimeError, match="channels"):
        ShiftWiseConv2d(3, 13).load_state_dict(sd)
    tile3 = ShiftWiseConv2d.from_dense(conv, small_kernel=3)
    other.load_state_dict(tile3.state_dict())  # another tile size: taken from the weight's shape
    assert other.small_kernel == 3 and torch.equal(other(x), tile3(x))
    bad = dict(sd, tile_offsets=sd["tile_offsets"].flip(0))
    with pytest.raises(RuntimeError, match="invalid tile plan"):
        other.load_state_dict(bad)


@pytest.mark.parametrize("make,match", [
    (lambda: nn.Conv2d(4, 4, 13, padding=6, groups=4, stride=2), "stride"),
    (lambda: nn.Conv2d(4, 4, 5, padding=4, groups=4, dilation=2), "dilation"),
    (lambda: nn.Conv2d(4, 8, 13, padding=6, groups=4), "depthwise"),
    (lambda: nn.Conv2d(4, 4, 13, padding=6, groups=1), "depthwise"),
    (lambda: nn.Conv2d(4, 4, 12, padding=6, groups=4), "even kernel size"),
    (lambda: nn.Conv2d(4, 4, 13, padding=3, groups=4), "padding"),
    (lambda: nn.Conv2d(4, 4, 13, padding=6, groups=4, padding_mode="reflect"), "padding"),
    (lambda: nn.Linear(4, 4), "nn.Conv2d"),
])
def test_from_dense_refuses_unsupported_convs(make, match):
    with pytest.raises(ValueError, match=match):
        ShiftWiseConv2d.from_dense(make())


def test_same_padding_string_accepted():
    conv = nn.Conv2d(2, 2, 7, padding="same", groups=2, dtype=torch.float64)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    assert_close(ShiftWiseConv2d.from_dense(conv)(x), conv(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=0, kernel_size=13), "in_channels"),
    (dict(in_channels=4, kernel_size=0), "kernel_size"),
    (dict(in_channels=4, kernel_size=13, small_kernel=0), "small_kernel"),
    (dict(in_channels=4, kernel_size=13, layout="spiral"), "layout"),
    (dict(in_channels=4, kernel_size=13, backend="cuda"), "backend"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShiftWiseConv2d(**kwargs)


def test_trains_like_a_module():
    sw = ShiftWiseConv2d(3, 13, backend="taichi")
    opt = torch.optim.SGD(sw.parameters(), lr=0.1)
    x = torch.randn(2, 3, 10, 10)
    target = torch.randn(2, 3, 10, 10)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (sw(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_plan_object_is_reused_until_its_buffers_change():
    m = ShiftWiseConv2d(4, (47, 5), 5)
    plan = m.plan
    assert m.plan is plan  # per-size caches such as plan.live survive between forwards
    keep, live = plan.live(14, 14)
    assert keep is not None and m.plan.live(14, 14)[1] is live
    other = ShiftWiseConv2d(4, (5, 47), 5)  # same tile counts (same offsets), other positions
    m.load_state_dict(other.state_dict())
    assert m.plan is not plan and torch.equal(m.plan.dx, other.plan.dx) and m.plan.live(14, 14)[0] is not None
    plan = m.plan
    m.set_tiles(torch.randn(8, 5, 5), plan.select(torch.arange(plan.num_tiles) % 5 == 0))
    assert m.plan is not plan and m.plan.num_tiles == 8
    x = torch.randn(2, 4, 14, 14, dtype=torch.float64)
    m = m.double()
    dense = merge_tiles(m.weight.detach(), m.plan)
    bias = None if m.bias is None else m.bias.detach()
    ref = nn.functional.conv2d(x, dense[:, None], bias, padding=(dense.shape[-2] // 2, dense.shape[-1] // 2),
                               groups=4)
    assert_close(m(x), ref)
