"""Backend choice: names, the environment variable, the auto rule and the dense conv it runs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close
from shiftwise import (ShiftWiseConv2d, _runtime, dispatch, functional, ops, shiftwise_conv2d, split_branches,
                       split_kernel)
from shiftwise.dispatch import choose_auto_path, dense_conv, resolve_backend
from shiftwise.tiling import merge_tiles


def test_backend_names_resolve():
    assert resolve_backend("taichi_fused", torch.device("cpu")) == "taichi_fused"
    assert resolve_backend("taichi_decomposed", torch.device("cpu")) == "taichi_decomposed"
    assert resolve_backend("auto", torch.device("cpu")) == "taichi"
    with pytest.raises(_runtime.TaichiUnavailable, match="backend='torch'"):
        resolve_backend("taichi_fused", torch.device("meta"))


def _slak_plan(c, k, n=5):
    return split_branches([(torch.randn(c, k, n), None), (torch.randn(c, n, k), None), (torch.randn(c, n, n), None)], n)


def test_auto_choice_on_cpu_follows_the_measured_rule():
    cpu = torch.device("cpu")
    late = split_kernel(torch.randn(2, 13, 13), 5)[1]  # SLaK-T / RepLKNet-31B stage 4: 15x15 extent
    replk = split_kernel(torch.randn(2, 27, 27), 5)[1]  # RepLKNet-31B stage 3, dense 27x27
    slak = _slak_plan(2, 51)[2]  # SLaK-T stage 1: 21 tiles against a 55x55 extent
    assert choose_auto_path(cpu, late, (4, 2, 7, 7)) == "dense"
    assert choose_auto_path(cpu, replk, (4, 2, 14, 14)) == "dense"
    # a cross of 5 x 5 tiles (SLaK's strips): two dense strips on every map size
    assert choose_auto_path(cpu, slak, (4, 2, 56, 56)) == "cross"
    assert choose_auto_path(cpu, slak, (4, 2, 14, 14)) == "cross"
    # a cross of 3 x 3 tiles (an SW layer's sums) too
    sw = _slak_plan(2, 51, 3)[2]
    assert choose_auto_path(cpu, sw, (4, 2, 56, 56)) == "cross"
    assert choose_auto_path(cpu, sw, (4, 2, 28, 28)) == "cross"
    # a plan that is not a cross (RepLKNet's square kernel) never takes the strips
    assert dispatch.cross_strips(replk) is None and dispatch.cross_strips(slak) == ((55, 5), (5, 55))
    # sparse SLaK tiles on 56 x 56 maps: a quarter of the tiles, the fused kernel's work is small
    keep = torch.zeros(slak.num_tiles, dtype=torch.bool)
    keep[::4] = True
    assert choose_auto_path(cpu, slak.select(keep), (4, 2, 56, 56)) == "taichi_fused"
    # training steps: the fused kernel, except for kernels of at most 3 x 3 (PyTorch's backward)
    assert choose_auto_path(cpu, late, (4, 2, 7, 7), needs_grad=True) == "taichi_fused"
    five = split_kernel(torch.randn(2, 5, 5), 5)[1]
    three = split_kernel(torch.randn(2, 3, 3), 3)[1]
    assert choose_auto_path(cpu, five, (4, 2, 16, 16), needs_grad=True) == "taichi_fused"
    assert choose_auto_path(cpu, three, (4, 2, 16, 16), needs_grad=True) == "dense"
    assert choose_auto_path(cpu, three, (4, 2, 16, 16), dtype=torch.float64, needs_grad=True) == "taichi_fused"
    # other devices and dtypes: the fused kernel
    assert choose_auto_path(cpu, late, (4, 2, 7, 7), dtype=torch.float64) == "taichi_fused"
    assert choose_auto_path(torch.device("cuda"), late, (4, 2, 7, 7)) == "taichi_fused"


def test_auto_training_step_on_a_small_kernel_runs_the_dense_conv_with_the_tiles_gradients(monkeypatch):
    # a 3 x 3 kernel in training: auto runs PyTorch's conv of the merged kernel; the output and
    # every gradient (tiles, bias, input) match the torch reference in float64. The tiles' outer
    # ring is zero and the same tensor first runs under no_grad (where the merged kernel is cached
    # cropped to 1 x 1): the training step must still give the ring taps their gradients.
    tiles, plan = split_kernel(torch.randn(3, 3, 3, dtype=torch.float64), 3)
    keep = torch.tensor([True, False, True])
    tiles, plan = tiles[keep].contiguous(), plan.select(keep)
    ring = torch.ones(3, 3, dtype=torch.bool)
    ring[1, 1] = False
    tiles[:, ring] = 0
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    gy = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(functional, "dense_conv", lambda *a: calls.append(1) or dense_conv(*a))
    x32, tiles32, bias32 = x.float(), tiles.float(), bias.float()
    with torch.no_grad():
        shiftwise_conv2d(x32, tiles32, plan, bias32, backend="auto")
    assert dispatch.cropped_extent(tiles32, plan) == (1, 1)
    calls.clear()
    got = [t.requires_grad_() for t in (x32, tiles32, bias32)]
    y = shiftwise_conv2d(*got[:2], plan, got[2], backend="auto")
    y.backward(gy.float())
    assert calls == [1]  # auto's training step ran the dense conv
    want = [t.clone().requires_grad_() for t in (x, tiles, bias)]
    y_ref = shiftwise_conv2d(want[0], want[1], plan, want[2], backend="torch")
    y_ref.backward(gy)
    assert_close(y.double(), y_ref, torch.float32)
    for a, b in zip(got, want):
        assert_close(a.grad.double(), b.grad, torch.float32)
    assert bool((tiles32.grad[:, ring] != 0).all())  # the ring's taps were not cropped away
    # large activations train on the fused kernel (PyTorch's backward was slower there)
    big = (4, 384, 96, 96)
    assert choose_auto_path(torch.device("cpu"), plan, big, needs_grad=True) == "taichi_fused"


@pytest.mark.parametrize("kernel", [(13, 13), (27, 27), (51, 5)])  # NCHW (width <= 13) and channels_last paths
@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_conv_matches_the_reference(kernel, channels_last):
    tiles, plan = split_kernel(torch.randn(3, *kernel, dtype=torch.float64), 5)
    x = torch.randn(2, 3, 11, 16, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(3, dtype=torch.float64)
    y = dense_conv(x, tiles, plan, bias)
    want = F.conv2d(x.contiguous(), merge_tiles(tiles, plan).unsqueeze(1), bias, padding=plan.info.padding, groups=3)
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_dense_conv_crops_and_caches_the_merged_kernel(monkeypatch):
    k = torch.randn(4, 13, 13, dtype=torch.float64)
    tiles, plan = split_kernel(k, 5)  # 9 tiles covering 15 x 15
    assert plan.info.extent == (15, 15)
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    merges = []
    real_merge = dispatch.merge_tiles
    monkeypatch.setattr(dispatch, "merge_tiles", lambda *a: merges.append(1) or real_merge(*a))
    with torch.no_grad():
        y = dense_conv(x, tiles, plan)
        kernel, pad = dispatch._merged_kernel(tiles, plan)
        assert tuple(kernel.shape) == (4, 1, 13, 13) and pad == (6, 6)  # the zero ring cropped
        assert torch.allclose(y, F.conv2d(x, k[:, None], padding=6, groups=4), rtol=1e-12, atol=1e-12)
        assert dense_conv(x, tiles, plan).equal(y) and len(merges) == 1  # cached
        tiles.mul_(-0.5)  # an in-place update (version counter) invalidates the entry
        assert torch.allclose(dense_conv(x, tiles, plan), -0.5 * y, rtol=1e-12, atol=1e-12)
        assert len(merges) == 2
    leaf = tiles.clone().requires_grad_(True)  # with autograd: merged every call, gradients flow
    (g,) = torch.autograd.grad(dense_conv(x, leaf, plan).sum(), leaf)
    (want,) = torch.autograd.grad(shiftwise_conv2d(x, leaf, plan, backend="torch").sum(), leaf)
    assert torch.allclose(g, want, rtol=1e-10, atol=1e-10) and len(merges) == 3
    ident = id(tiles)
    assert sorted(k[0] for k in dispatch._CACHE if k[1] == ident) == ["extent", "merged"]
    del tiles
    assert not [k for k in dispatch._CACHE if k[1] == ident]  # the entries go with their weight


def _brute_cropped(tiles, plan):
    """The merged kernel's size after cropping its all-zero outer ring symmetrically."""
    used = merge_tiles(tiles, plan) != 0
    kh, kw = plan.info.extent
    rows, cols = used.any(0).any(1).nonzero().flatten(), used.any(0).any(0).nonzero().flatten()
    if not len(rows):
        return (1, 1)
    reach_h = max(abs(int(rows[0]) - kh // 2), abs(int(rows[-1]) - kh // 2))
    reach_w = max(abs(int(cols[0]) - kw // 2), abs(int(cols[-1]) - kw // 2))
    return (2 * reach_h + 1, 2 * reach_w + 1)


@pytest.mark.parametrize("kernel", [(13, 13), (51, 5), (7, 7), (5, 5), (27, 9)])
def test_cropped_extent_matches_the_merged_kernel(kernel):
    g = torch.Generator().manual_seed(sum(kernel))
    tiles, plan = split_kernel(torch.randn(3, *kernel, generator=g), 5)
    assert dispatch.cropped_extent(tiles, plan) == _brute_cropped(tiles, plan)
    # sparse: zero out random tiles (whole outer ones too), and a NaN that must count as used
    for trial in range(4):
        t = tiles * (torch.rand(plan.num_tiles, 1, 1, generator=g) < 0.5)
        if trial == 3:
            t[0, 0, 0] = float("nan")
        got = dispatch.cropped_extent(t, plan)
        assert got == _brute_cropped(t.nan_to_num(1.0), plan), (kernel, trial)  # NaN: a non-zero for the brute force


def test_auto_rule_sizes_the_dense_kernel_as_it_runs():
    # RepLKNet-31B stage 4 in tiles of 5: a 15 x 15 extent, run as 13 x 13 on the NCHW kernel
    tiles, plan = split_kernel(torch.randn(64, 13, 13), 5)
    assert dispatch.cropped_extent(tiles, plan) == (13, 13)
    shape = (4, 64, 64, 64)
    extent_only = dispatch.choose_auto_path(torch.device("cpu"), plan, shape)
    with torch.no_grad():
        sized = dispatch.choose_auto_path(torch.device("cpu"), plan, shape, weight=tiles)
    # 13 columns qualify for the NCHW factor that 15 do not; the taps count 13 x 13
    threshold = dispatch.AUTO_RATIO_AT_1 * 64 ** -dispatch.AUTO_RATIO_EXP
    fused = plan.info.tile_taps(64, 64)
    assert (extent_only == "dense") == (plan.info.dense_taps(64, 64) < threshold * fused)
    want = plan.info.dense_taps(64, 64, (13, 13)) < threshold * dispatch.NCHW_RATIO_FACTOR * fused
    assert (sized == "dense") == want


def test_auto_runs_dense_for_inference_and_fused_for_training(monkeypatch):
    tiles, plan = split_kernel(torch.randn(4, 13, 13), 5)
    x, bias = torch.randn(2, 4, 7, 7), torch.randn(4)
    calls = []
    real_dense, real_fused = functional.dense_conv, ops.fused_conv
    monkeypatch.setattr(functional, "dense_conv", lambda *a: calls.append("dense") or real_dense(*a))
    monkeypatch.setattr(ops, "fused_conv", lambda *a: calls.append("fused") or real_fused(*a))
    with torch.no_grad():
        y = shiftwise_conv2d(x, tiles, plan, bias)
    assert calls == ["dense"]
    assert_close(y, shiftwise_conv2d(x, tiles, plan, bias, backend="torch"))
    w = tiles.clone().requires_grad_(True)
    shiftwise_conv2d(x, w, plan, bias).sum().backward()
    assert calls == ["dense", "fused"] and w.grad is not None
    shiftwise_conv2d(x, tiles, plan, bias, backend="taichi")  # explicit Taichi: never the dense conv
    assert calls == ["dense", "fused", "fused"]


def test_backends_agree_and_env_variable(monkeypatch):
    conv = nn.Conv2d(3, 3, 29, padding=14, groups=3)
    sw = ShiftWiseConv2d.from_dense(conv)
    x = torch.randn(2, 3, 16, 16)
    monkeypatch.setenv("SHIFTWISE_BACKEND", "torch")
    assert resolve_backend(None, x.device) == "torch"
    y_torch = sw(x)
    monkeypatch.setenv("SHIFTWISE_BACKEND", "taichi")
    assert resolve_backend(None, x.device) == "taichi"
    assert_close(sw(x), y_torch)
    monkeypatch.setenv("SHIFTWISE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        sw(x)


def test_taichi_backend_refuses_other_devices():
    with pytest.raises(_runtime.TaichiUnavailable, match="backend='torch'"):
        resolve_backend("taichi", torch.device("meta"))
    assert resolve_backend("auto", torch.device("meta")) == "torch"


def test_conv_path_names_the_path_and_logs_why(caplog):
    tiles, plan = split_kernel(torch.randn(2, 13, 13), 5)
    x = torch.randn(1, 2, 7, 7)
    with caplog.at_level("DEBUG", logger="shiftwise.dispatch"):
        with torch.no_grad():
            assert dispatch.conv_path("auto", x, tiles, plan) == "dense"
        assert dispatch.conv_path("auto", x, tiles.requires_grad_(), plan) == "taichi_fused"
        assert dispatch.conv_path("taichi", x, tiles, plan) == "taichi_fused"
        assert dispatch.conv_path("taichi_decomposed", x, tiles, plan) == "taichi_decomposed"
        assert dispatch.conv_path("torch", x, tiles, plan) == "torch"
        assert dispatch.conv_path("auto", x.to("meta"), tiles.to("meta"), plan) == "torch"
    reasons = [r.getMessage() for r in caplog.records if r.name == "shiftwise.dispatch" and r.levelname == "DEBUG"]
    assert len(reasons) == 6
    assert "dense taps 49 against" in reasons[0] and "training step: merged kernel 15 wide" in reasons[1]
    assert "backend 'taichi' runs the fused kernel" in reasons[2]
    assert "'taichi_decomposed' asked for" in reasons[3] and "'torch' asked for" in reasons[4]
    assert "Taichi cannot run on meta" in reasons[5]


@pytest.mark.parametrize("side,every", [(56, 1), (14, 1), (9, 3), (30, 2)])
def test_cross_conv_equals_the_reference(side, every):
    # the two-strip path of a cross-shaped plan, dense and sparse (strips with holes), maps smaller
    # than the strips, NCHW and channels_last input, bias; float64 against the reference
    tiles, _, plan = _slak_plan(3, 51)
    tiles = tiles.double()
    keep = torch.zeros(plan.num_tiles, dtype=torch.bool)
    keep[::every] = True
    tiles, plan = tiles[keep].contiguous(), plan.select(keep)
    bias = torch.randn(3, dtype=torch.float64)
    for x in (torch.randn(2, 3, side, side + 3, dtype=torch.float64),
              torch.randn(2, 3, side, side, dtype=torch.float64).contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            expected = shiftwise_conv2d(x, tiles, plan, bias, backend="torch")
            assert_close(dispatch.cross_conv(x, tiles, plan, bias), expected)


def test_auto_runs_the_strips_for_a_cross_in_float32_inference(monkeypatch):
    tiles, _, plan = _slak_plan(4, 31)
    x = torch.randn(2, 4, 14, 14)
    calls = []
    monkeypatch.setattr(functional, "cross_conv", lambda *a: calls.append(1) or dispatch.cross_conv(*a))
    with torch.no_grad():
        y = shiftwise_conv2d(x, tiles, plan)
    assert calls == [1]
    assert_close(y, shiftwise_conv2d(x, tiles, plan, backend="torch"))
