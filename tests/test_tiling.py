"""Tile plans: split/merge round trips, layouts, BN folding, multi-branch merging."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shiftwise.tiling import (TilePlan, axis_grid, choose_layout, dilate_kernel, extract_tiles, fold_bn,
                              merge_tiles, split_branches, split_kernel)

SHAPES = [(51, 5), (49, 5), (47, 5), (13, 5), (5, 51), (31, 31), (29, 29), (27, 27), (13, 13), (25, 25),
          (30, 7), (4, 6), (3, 3), (1, 1), (2, 9), (15, 10)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("layout", ["auto", "centered", "compact"])
def test_split_merge_round_trip_exact(shape, n, layout):
    w = torch.randn(3, *shape, dtype=torch.float64)
    tiles, plan = split_kernel(w, n, layout)
    assert tiles.shape == (plan.num_tiles, n, n)
    assert torch.equal(merge_tiles(tiles, plan, shape), w)
    # no tile lies wholly outside the kernel: every tile holds some kernel entry
    ones, _ = split_kernel(torch.ones(1, *shape), n, layout)
    assert bool(ones.flatten(1).sum(1).gt(0).all())


def test_equation_offsets_match_design_formula():
    # DESIGN 1: block (p, q) of an embedding at offset o has dy = p*N + N//2 - o - K//2
    assert axis_grid(51, 5, "compact") == [p * 5 + 2 - 2 - 25 for p in range(11)]
    assert axis_grid(49, 5, "compact") == [p * 5 + 2 - 0 - 24 for p in range(10)]
    assert axis_grid(49, 5, "centered") == list(range(-25, 26, 5))
    assert axis_grid(3, 5, "centered") == [0] and axis_grid(3, 5, "compact") == [0]


@pytest.mark.parametrize("kernels,expected", [
    ((51, 49, 47, 13), (21, 21, 21, 5)),  # SLaK-T stages: tall + wide + small 5x5
])
def test_slak_layout_tile_counts(kernels, expected):
    for k, count in zip(kernels, expected):
        shapes = [(k, 5), (5, k), (5, 5)]
        _, _, plan = split_branches([(torch.randn(2, *s), None) for s in shapes], 5)
        assert plan.info.uniform == count, (k, plan)


@pytest.mark.parametrize("k,count", [(31, 49), (29, 37), (27, 37), (13, 9)])
def test_replknet_layout_tile_counts(k, count):
    _, _, plan = split_branches([(torch.randn(2, k, k), None), (torch.randn(2, 5, 5), None)], 5)
    assert plan.info.uniform == count


def test_choose_layout_prefers_centered_on_ties():
    assert choose_layout([(49, 5), (5, 49), (5, 5)], 5) == [("centered", "centered")] * 3
    assert choose_layout([(29, 29), (5, 5)], 5)[0] == ("compact", "compact")
    with pytest.raises(ValueError, match="layout"):
        choose_layout([(5, 5)], 5, "diagonal")


def _dense_sum(branches):
    kh = max(w.shape[1] for w, _ in branches)
    kw = max(w.shape[2] for w, _ in branches)
    out = torch.zeros(branches[0][0].shape[0], kh, kw, dtype=branches[0][0].dtype)
    for w, _ in branches:
        oy, ox = (kh - w.shape[1]) // 2, (kw - w.shape[2]) // 2
        out[:, oy:oy + w.shape[1], ox:ox + w.shape[2]] += w
    return out


@pytest.mark.parametrize("shapes", [[(51, 5), (5, 51), (5, 5)], [(29, 29), (5, 5)], [(13, 13), (3, 3), (7, 1)]])
@pytest.mark.parametrize("n", [3, 5])
def test_split_branches_equals_summed_dense_kernel(shapes, n):
    branches = [(torch.randn(4, *s, dtype=torch.float64), torch.randn(4, dtype=torch.float64)) for s in shapes]
    tiles, bias, plan = split_branches(branches, n)
    dense = _dense_sum(branches)
    torch.testing.assert_close(merge_tiles(tiles, plan, dense.shape[1:]), dense, rtol=0, atol=1e-14)
    torch.testing.assert_close(bias, sum(b for _, b in branches), rtol=0, atol=1e-14)
    positions = plan.positions()
    assert all(len(set(p)) == len(p) for p in positions), "coincident tiles must be summed into one"


def test_drop_zero_gives_variable_counts_and_stays_exact():
    w = torch.randn(3, 15, 15, dtype=torch.float64)
    w[0, :5] = 0  # channel 0 loses its top row of tiles
    w[2] = 0  # channel 2 loses everything
    tiles, _, plan = split_branches([(w, None)], 5, drop_zero=True)
    assert plan.counts().tolist() == [6, 9, 0]
    assert plan.info.uniform is None
    assert torch.equal(merge_tiles(tiles, plan, (15, 15)), w)


def test_merge_refuses_nonzero_entries_outside_kernel_size():
    tiles, plan = split_kernel(torch.randn(2, 7, 7), 5)  # 3x3 tiles: extent 15
    with pytest.raises(ValueError, match="outside kernel_size"):
        merge_tiles(tiles.new_ones(tiles.shape), plan, (7, 7))


def test_fold_bn_exact_and_commutes_with_split():
    c = 6
    conv = nn.Conv2d(c, c, (13, 5), padding=(6, 2), groups=c, bias=True).double()
    bn = nn.BatchNorm2d(c, eps=1e-3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, c, 9, 11, dtype=torch.float64)
    w, b = fold_bn(conv.weight[:, 0], conv.bias, bn)
    y = F.conv2d(x, w[:, None], b, padding=(6, 2), groups=c)
    torch.testing.assert_close(y, bn(conv(x)), rtol=0, atol=1e-12)
    tiles, plan = split_kernel(conv.weight.detach(), 5)
    folded_tiles, _ = fold_bn(tiles.view(c, -1, 5, 5), None, bn)  # per-channel scale of its tiles
    assert torch.equal(folded_tiles.reshape(tiles.shape), extract_tiles(w.detach(), plan))


def test_fold_bn_validates():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn(torch.randn(4, 3, 3), None, bn)
    with pytest.raises(ValueError, match="channels"):
        fold_bn(torch.randn(5, 3, 3), None, nn.BatchNorm2d(4))


def test_dilate_kernel_matches_dilated_conv():
    w = torch.randn(3, 5, 5, dtype=torch.float64)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    dense = dilate_kernel(w, 3)
    assert dense.shape == (3, 13, 13)
    torch.testing.assert_close(F.conv2d(x, dense[:, None], padding=6, groups=3),
                               F.conv2d(x, w[:, None], padding=6, dilation=3, groups=3), rtol=0, atol=1e-12)


def test_plan_validation_and_select():
    with pytest.raises(ValueError, match="offsets"):
        TilePlan(torch.tensor([1, 2], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                 torch.zeros(1, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="dy/dx"):
        TilePlan(torch.tensor([0, 2], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                 torch.zeros(1, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="tile size"):
        TilePlan.grid(2, 13, 0)
    plan = TilePlan.grid(3, (13, 5), 5)
    keep = torch.tensor([True, False, True, False, False, False, True, True, True])
    sub = plan.select(keep)
    assert sub.counts().tolist() == [2, 0, 3]
    assert sub.positions() == [[(-5, 0), (5, 0)], [], [(-5, 0), (0, 0), (5, 0)]]


def test_plan_from_lists_and_equality():
    per = [[(0, 0), (5, -5)], [(10, 0)]]
    plan = TilePlan.from_lists(per, 5)
    assert plan.positions() == per
    assert plan == TilePlan.from_lists(per, 5)
    assert plan != TilePlan.from_lists(per, 3)
    assert plan.info.padding == (12, 7) and plan.info.extent == (25, 15)
    assert list(itertools.chain(*[[c] * len(p) for c, p in enumerate(per)])) == plan.tile_channel().tolist()


@pytest.mark.parametrize("kernel,size", [((47, 5), (14, 14)), ((5, 47), (14, 9)), ((31, 31), (6, 11)),
                                         ((13, 13), (7, 7)), ((51, 5), (3, 20)), ((6, 6), (2, 2))])
def test_live_tiles_are_those_that_reach_the_map(kernel, size):
    # brute force: a tile reaches the map iff its kernel alone gives a nonzero output on all-ones input
    k = torch.randn(3, *kernel, dtype=torch.float64)
    tiles, plan = split_kernel(k, 3 if kernel == (6, 6) else 5)
    h, w = size
    expected = []
    for t in range(plan.num_tiles):
        one = torch.zeros_like(tiles)
        one[t] = 1.0
        dense = merge_tiles(one, plan)  # the tile's whole window, centred in the plan's extent
        y = F.conv2d(torch.ones(1, 3, h, w, dtype=torch.float64), dense[:, None], padding="same", groups=3)
        expected.append(bool(y.abs().sum() > 0))
    keep, live = plan.live(h, w)
    got = [True] * plan.num_tiles if keep is None else [i in set(keep.tolist()) for i in range(plan.num_tiles)]
    assert got == expected
    if all(expected):
        assert keep is None and live is plan
    else:
        assert live == plan.select(torch.tensor(expected))
    assert plan.live(h, w)[1] is live  # cached per size


def test_tap_counts_match_a_convolution_of_ones():
    # PlanInfo.tile_taps / dense_taps: the auto rule's cost terms (shiftwise.dispatch)
    branches = [(torch.randn(3, 13, 5), None), (torch.randn(3, 5, 13), None), (torch.randn(3, 5, 5), None)]
    tiles, _, plan = split_branches(branches, 5)
    keep = torch.rand(plan.num_tiles, generator=torch.Generator().manual_seed(0)) < 0.6
    plan = plan.select(keep)
    kh, kw = plan.info.extent
    for h, w in [(7, 7), (9, 20), (30, 4)]:
        ones = torch.ones(1, plan.channels, h, w, dtype=torch.float64)
        counts = merge_tiles(torch.ones(plan.num_tiles, 5, 5, dtype=torch.float64), plan)  # tiles on each tap
        got = F.conv2d(ones, counts.unsqueeze(1), padding=plan.info.padding, groups=plan.channels).mean()
        assert plan.info.tile_taps(h, w) == pytest.approx(got.item(), rel=1e-12)
        dense = F.conv2d(ones[:, :1], torch.ones(1, 1, kh, kw, dtype=torch.float64), padding=plan.info.padding).mean()
        assert plan.info.dense_taps(h, w) == pytest.approx(dense.item(), rel=1e-12)
