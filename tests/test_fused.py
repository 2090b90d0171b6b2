"""The fused Taichi conv (and the decomposed path) against F.conv2d and the torch reference.

Both kernel styles run here: "cpu" (padded channel chunks, vectorised rows) and "gpu" (one
thread per element, the CUDA kernels' code) forced onto the CPU arch.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, assert_close
from shiftwise import TilePlan, ops, shiftwise_conv2d, split_branches, split_kernel
from shiftwise import functional
from shiftwise.functional import choose_auto_path, choose_taichi_path, dense_conv, resolve_backend
from shiftwise.tiling import merge_tiles

STYLES = ["cpu", "gpu"]


@pytest.fixture(params=STYLES)
def style(request, monkeypatch):
    monkeypatch.setattr(ops, "FORCE_STYLE", request.param)
    return request.param


def _grads(x, w, b, plan, g, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = shiftwise_conv2d(leaves[0], leaves[1], plan, leaves[2], backend=backend)
    return (y, *torch.autograd.grad(y, leaves, g))


def _check_against_reference(x, tiles, plan, backend, dtype=None):
    b = torch.randn(plan.channels, dtype=x.dtype, device=x.device)
    g = torch.randn_like(x)
    for got, want in zip(_grads(x, tiles, b, plan, g, backend), _grads(x, tiles, b, plan, g, "torch")):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("kernel,n,hw", [
    ((13, 5), 5, (9, 11)),  # tall strip on a map smaller than the kernel
    ((5, 51), 5, (7, 70)),  # wide strip, a row longer than one 64-column work item
    ((15, 15), 3, (20, 6)),
    ((7, 9), 1, (5, 4)),  # 1x1 tiles
    ((27, 27), 7, (14, 14)),  # RepLKNet stage 3 on its 14x14 map, N = 7
    ((47, 5), 5, (14, 14)),  # SLaK stage 3: 4 of the 10 tiles never reach the map (skipped)
    ((5, 31), 3, (3, 12)),  # more dead tiles than live ones
])
@pytest.mark.parametrize("backend", ["taichi_fused", "taichi_decomposed"])
def test_float64_matches_reference_forward_backward(kernel, n, hw, backend, style):
    tiles, plan = split_kernel(torch.randn(3, *kernel, dtype=torch.float64), n)
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    _check_against_reference(x, tiles, plan, backend)


@pytest.mark.parametrize("backend", ["taichi_fused", "taichi_decomposed"])
def test_tiles_that_never_reach_the_map_are_skipped(backend, monkeypatch):
    w = torch.randn(2, 5, 47, dtype=torch.float64)
    tiles, plan = split_kernel(w, 5)
    keep, live = plan.live(6, 14)
    assert keep is not None and 0 < live.num_tiles < plan.num_tiles
    launched = []  # tiles handed to the Taichi op
    fused, shift_add = ops.fused_conv, ops.shift_add
    monkeypatch.setattr(ops, "fused_conv", lambda x, wt, *a: launched.append(wt.shape[0]) or fused(x, wt, *a))
    monkeypatch.setattr(ops, "shift_add", lambda u, *a: launched.append(u.shape[1]) or shift_add(u, *a))
    x = torch.randn(3, 2, 6, 14, dtype=torch.float64)
    tr = tiles.clone().requires_grad_(True)
    y = shiftwise_conv2d(x, tr, plan, backend=backend)
    assert launched == [live.num_tiles]
    assert_close(y, F.conv2d(x, w[:, None], padding=(2, 23), groups=2))
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, tr, g)
    dead = torch.ones(plan.num_tiles, dtype=torch.bool)
    dead[keep] = False
    assert torch.equal(got[dead], torch.zeros_like(got[dead]))  # exactly: they meet only padding
    tw = tiles.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(shiftwise_conv2d(x, tw, plan, backend="torch"), tw, g)
    assert_close(got, want)


def test_matches_conv2d_with_the_dense_kernel(style):
    w = torch.randn(4, 51, 5, dtype=torch.float64)
    tiles, plan = split_kernel(w, 5)
    x = torch.randn(2, 4, 16, 19, dtype=torch.float64)
    expected = F.conv2d(x, w[:, None], padding=(25, 2), groups=4)
    assert_close(shiftwise_conv2d(x, tiles, plan, backend="taichi_fused"), expected)


def test_variable_tile_lists(style):
    # CSR plan: a channel without tiles, tiles whose windows never touch the input
    plan = TilePlan.from_lists([[(0, 0), (3, -4), (-9, 2)], [], [(5, 5), (40, 0)], [(-1, 7)]], 3)
    tiles = torch.randn(plan.num_tiles, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 9, dtype=torch.float64)
    _check_against_reference(x, tiles, plan, "taichi_fused")
    dense = merge_tiles(tiles, plan)
    ph, pw = plan.info.padding
    assert_close(shiftwise_conv2d(x, tiles, plan, backend="taichi_fused"),
                 F.conv2d(x, dense[:, None], padding=(ph, pw), groups=4))


@pytest.mark.parametrize("n", [3, 5, 7])  # unrolled kernels (3, 5) and the generic one (7)
@pytest.mark.parametrize("width,stores", [(72, "vec"), (72, "pairs"), (66, "pairs"), (63, "one")])
def test_float32_forward_store_modes(n, width, stores, monkeypatch):
    # the CPU forward writes float32 rows 8 values per vector store (72: a 64-column work item
    # and one of 8; only with ops.FUSED_VEC_STORES), two per store or one by one, as the output
    # allows: against F.conv2d
    monkeypatch.setattr(ops, "FUSED_VEC_STORES", stores == "vec")
    w = torch.randn(3, 5 * n, n, dtype=torch.float64)
    tiles, plan = split_kernel(w, n)
    x = torch.randn(2, 3, 9, width, dtype=torch.float64)
    assert ops._store_mode(x.float(), ops.FUSED_VEC_STORES) == stores
    expected = F.conv2d(x, w[:, None], padding=(5 * n // 2, n // 2), groups=3)
    got = shiftwise_conv2d(x.float(), tiles.float(), plan, backend="taichi_fused")
    assert_close(got, expected, torch.float32)


def test_slak_branches_float32_unrolled_kernels(style):
    # float32 with N = 5 runs the unrolled CPU kernels (all 25 taps in one loop body)
    branches = [(torch.randn(6, 31, 5), None), (torch.randn(6, 5, 31), None), (torch.randn(6, 5, 5), None)]
    tiles, _, plan = split_branches(branches, 5)
    x = torch.randn(2, 6, 17, 40)
    _check_against_reference(x, tiles, plan, "taichi_fused")
    keep = torch.rand(plan.num_tiles) < 0.4
    _check_against_reference(x, tiles[keep], plan.select(keep), "taichi_fused")


def test_float32_n3_and_float64_agree():
    tiles, plan = split_kernel(torch.randn(3, 21, 21, dtype=torch.float64), 3)
    x = torch.randn(1, 3, 24, 30, dtype=torch.float64)
    y64 = shiftwise_conv2d(x, tiles, plan, backend="taichi_fused")
    y32 = shiftwise_conv2d(x.float(), tiles.float(), plan, backend="taichi_fused")
    assert_close(y32, y64, torch.float32)


@pytest.mark.parametrize("per_chunk", [1, 2])
def test_many_channel_chunks(monkeypatch, per_chunk):
    # the CPU style pads the input in channel chunks; force 1 or 2 channels per chunk (5
    # channels: with 2, the last chunk is smaller and the buffer's zero columns move)
    x = torch.randn(2, 5, 9, 13, dtype=torch.float64)
    left, right = ops._column_padding(5)
    monkeypatch.setattr(ops, "_MIN_CHUNK", per_chunk * 2 * 9 * (13 + left + right))
    monkeypatch.setattr(ops, "CHUNK_SHARE", 10 ** 9)
    tiles, plan = split_kernel(torch.randn(5, 11, 11, dtype=torch.float64), 5)
    plan_keep = torch.arange(plan.num_tiles) % 3 != 1
    _check_against_reference(x, tiles[plan_keep], plan.select(plan_keep), "taichi_fused")


def test_channel_chunks_are_padded_copies_in_one_buffer(monkeypatch):
    x = torch.randn(3, 7, 4, 6)
    left, right = ops._column_padding(3)
    size = 3 * 3 * 4 * (6 + left + right)
    monkeypatch.setattr(ops, "_MIN_CHUNK", size)  # chunks of 3, 3, 1 channels
    monkeypatch.setattr(ops, "CHUNK_SHARE", 10 ** 9)
    # the buffer comes from new_empty: hand it NaN-filled memory, so that a zero column left
    # unwritten shows
    empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: empty(t, *a, **k).fill_(math.nan))
    seen, pointers = [], set()
    for c0, xp in ops._channel_chunks(x, 3):
        expected = F.pad(x[:, c0:c0 + 3], (left, right))
        assert xp.shape == expected.shape and torch.equal(xp, expected)
        seen.append(c0)
        pointers.add(xp.data_ptr())
    assert seen == [0, 3, 6]
    assert len(pointers) == 1  # one buffer: a single chunk alive at a time


def test_gradcheck_and_gradgradcheck(style):
    plan = TilePlan.from_lists([[(0, 0), (2, -3)], [(-4, 1)]], 3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(plan.num_tiles, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: shiftwise_conv2d(x, w, plan, b, backend="taichi_fused")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_layouts_dtypes_and_empty_inputs():
    tiles, plan = split_kernel(torch.randn(3, 9, 9, dtype=torch.float64), 3)
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    y = shiftwise_conv2d(x, tiles, plan, backend="taichi_fused")
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(shiftwise_conv2d(channels_last, tiles, plan, backend="taichi_fused"), y)
    strided = torch.randn(2, 3, 8, 20, dtype=torch.float64)[..., ::2]
    assert_close(shiftwise_conv2d(strided, tiles, plan, backend="taichi_fused"),
                 shiftwise_conv2d(strided, tiles, plan, backend="torch"))
    yb = shiftwise_conv2d(x.bfloat16(), tiles.bfloat16(), plan, backend="taichi_fused")
    assert yb.dtype == torch.bfloat16
    assert_close(yb, shiftwise_conv2d(x.bfloat16().double(), tiles.bfloat16().double(), plan, backend="torch"),
                 torch.bfloat16)
    assert shiftwise_conv2d(x[:0], tiles, plan, backend="taichi_fused").shape == (0, 3, 8, 10)
    none = TilePlan.from_lists([[], [], []], 3)
    bias = torch.randn(3, dtype=torch.float64)
    y0 = shiftwise_conv2d(x, tiles[:0], none, bias, backend="taichi_fused")
    assert torch.equal(y0, bias.view(1, 3, 1, 1).expand_as(x))


def test_deterministic_bitwise():
    tiles, _, plan = split_branches([(torch.randn(4, 25, 5), None), (torch.randn(4, 5, 25), None)], 5)
    x = torch.randn(2, 4, 20, 20, requires_grad=True)
    w = tiles.requires_grad_(True)
    runs = []
    for _ in range(2):
        y = shiftwise_conv2d(x, w, plan, backend="taichi_fused")
        runs.append((y, *torch.autograd.grad(y.square().sum(), (x, w))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_backend_names_and_choice():
    tiles, plan = split_kernel(torch.randn(2, 13, 13), 5)
    assert resolve_backend("taichi_fused", torch.device("cpu")) == "taichi_fused"
    assert resolve_backend("taichi_decomposed", torch.device("cpu")) == "taichi_decomposed"
    assert resolve_backend("auto", torch.device("cpu")) == "taichi"
    assert choose_taichi_path(torch.device("cpu"), plan, (8, 2, 56, 56)) == "taichi_fused"
    from shiftwise import _runtime
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
    assert choose_auto_path(cpu, slak, (4, 2, 56, 56)) == "taichi_fused"
    assert choose_auto_path(cpu, slak, (4, 2, 14, 14)) == "dense"  # 14x14 maps at full density
    # sparse SLaK tiles at stage 3: only 5 of 21 tiles per channel, the fused kernel's work is tiny
    keep = torch.zeros(slak.num_tiles, dtype=torch.bool)
    keep[::4] = True
    assert choose_auto_path(cpu, slak.select(keep), (4, 2, 14, 14)) == "taichi_fused"
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
    assert functional.cropped_extent(tiles32, plan) == (1, 1)
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


def test_tap_counts_match_a_convolution_of_ones():
    tiles, _, plan = _slak_plan(3, 13)
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
    real_merge = functional.merge_tiles
    monkeypatch.setattr(functional, "merge_tiles", lambda *a: merges.append(1) or real_merge(*a))
    with torch.no_grad():
        y = dense_conv(x, tiles, plan)
        kernel, pad = functional._merged_kernel(tiles, plan)
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
    assert sorted(k[0] for k in functional._CACHE if k[1] == ident) == ["extent", "merged"]
    del tiles
    assert not [k for k in functional._CACHE if k[1] == ident]  # the entries go with their weight


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
    assert functional.cropped_extent(tiles, plan) == _brute_cropped(tiles, plan)
    # sparse: zero out random tiles (whole outer ones too), and a NaN that must count as used
    for trial in range(4):
        t = tiles * (torch.rand(plan.num_tiles, 1, 1, generator=g) < 0.5)
        if trial == 3:
            t[0, 0, 0] = float("nan")
        got = functional.cropped_extent(t, plan)
        assert got == _brute_cropped(t.nan_to_num(1.0), plan), (kernel, trial)  # NaN: a non-zero for the brute force


def test_auto_rule_sizes_the_dense_kernel_as_it_runs():
    # RepLKNet-31B stage 4 in tiles of 5: a 15 x 15 extent, run as 13 x 13 on the NCHW kernel
    tiles, plan = split_kernel(torch.randn(64, 13, 13), 5)
    assert functional.cropped_extent(tiles, plan) == (13, 13)
    shape = (4, 64, 64, 64)
    extent_only = functional.choose_auto_path(torch.device("cpu"), plan, shape)
    with torch.no_grad():
        sized = functional.choose_auto_path(torch.device("cpu"), plan, shape, weight=tiles)
    # 13 columns qualify for the NCHW factor that 15 do not; the taps count 13 x 13
    threshold = functional.AUTO_RATIO_AT_1 * 64 ** -functional.AUTO_RATIO_EXP
    fused = plan.info.tile_taps(64, 64)
    assert (extent_only == "dense") == (plan.info.dense_taps(64, 64) < threshold * fused)
    want = plan.info.dense_taps(64, 64, (13, 13)) < threshold * functional.NCHW_RATIO_FACTOR * fused
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


@pytest.mark.skipif("cuda" not in DEVICES, reason="CUDA kernels need a GPU; not available here")
@pytest.mark.parametrize("backend", ["taichi_fused", "taichi_decomposed"])
def test_cuda_matches_reference(backend):
    tiles, _, plan = split_branches([(torch.randn(4, 31, 5), None), (torch.randn(4, 5, 31), None)], 5)
    x = torch.randn(2, 4, 28, 28)
    _check_against_reference(x.cuda(), tiles.cuda(), plan.to("cuda"), backend)
