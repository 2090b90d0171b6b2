"""The fused Taichi conv (and the decomposed path) against F.conv2d and the torch reference.

Both kernel styles run here: "cpu" (padded channel chunks, vectorised rows) and "gpu" (one
thread per element, the CUDA kernels' code) forced onto the CPU arch.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from shiftwise import TilePlan, ops, shiftwise_conv2d, split_branches, split_kernel
from shiftwise.taichi_kernels import fused
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
@pytest.mark.parametrize("width,stores", [(72, "pairs"), (66, "pairs"), (63, "one")])
def test_float32_forward_store_modes(n, width, stores):
    # the CPU forward writes float32 rows two values per store where the output allows (even
    # width), else one by one: against F.conv2d
    w = torch.randn(3, 5 * n, n, dtype=torch.float64)
    tiles, plan = split_kernel(w, n)
    x = torch.randn(2, 3, 9, width, dtype=torch.float64)
    assert ops._flat_output(torch.empty(x.shape))[0] == stores
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


# The GPU-style weight gradient: a blocked reduction in two passes (taichi_kernels.fused). The
# reference is the weight gradient of F.conv2d with the merged kernel, in float64.
def _wgrad_reference(x, tiles, plan, gy):
    t = tiles.detach().to(torch.float64).requires_grad_(True)
    y = F.conv2d(x.to(torch.float64), merge_tiles(t, plan)[:, None], padding=plan.info.padding,
                 groups=plan.channels)
    return torch.autograd.grad(y, t, gy.to(torch.float64))[0]


def _wgrad(x, plan, gy):
    # straight to the op: tiles that never reach the map are not dropped (the functional does)
    return ops.fused_conv_wgrad(x, gy, plan.offsets, plan.dy, plan.dx, plan.tile_channel(), plan.tile_size // 2,
                                plan.tile_size)


@pytest.fixture
def small_blocks(request, monkeypatch):
    """Blocks of at least ``request.param`` products, whatever the taps per channel."""
    monkeypatch.setattr(fused, "BLOCK_TERMS", request.param)
    monkeypatch.setattr(fused, "PARTIAL_SHARE", 0)
    return request.param


def _wgrad_cases():
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    cases = []
    tiles, plan = split_kernel(rnd(3, 13, 5), 5)  # tall strip, longer than the 9-row map
    cases.append(("strip-longer-than-map", tiles, plan, (2, 9, 11)))
    tiles, plan = split_kernel(rnd(2, 5, 51), 5)  # wide strip on a 7 x 33 map
    cases.append(("wide-strip-7x33", tiles, plan, (1, 7, 33)))
    tiles, plan = split_kernel(rnd(3, 7, 9), 1)  # 1 x 1 tiles
    cases.append(("n1", tiles, plan, (3, 5, 4)))
    tiles, plan = split_kernel(rnd(2, 21, 21), 7)  # N = 7 on a 9 x 9 map
    cases.append(("n7-9x9", tiles, plan, (2, 9, 9)))
    # compacted: channels without tiles, tiles that never reach the map
    plan = TilePlan.from_lists([[(0, 0), (3, -4), (-9, 2)], [], [(5, 5), (40, 0)], [], [(-1, 7)]], 3)
    cases.append(("n3-empty-channels", rnd(plan.num_tiles, 3, 3), plan, (1, 7, 70)))
    return cases


WGRAD_CASES = _wgrad_cases()


DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])


@pytest.mark.parametrize("small_blocks", [1, 25], indirect=True)  # one row a block; 25+ products
@pytest.mark.parametrize("case", WGRAD_CASES, ids=[c[0] for c in WGRAD_CASES])
@DTYPES
def test_gpu_wgrad_matches_float64_reference(case, dtype, small_blocks, monkeypatch):
    monkeypatch.setattr(ops, "FORCE_STYLE", "gpu")
    _, tiles, plan, (b, h, w) = case
    x = torch.randn(b, plan.channels, h, w, dtype=torch.float64)
    gy = torch.randn_like(x)
    rows, nblocks = fused.wgrad_blocks(b, plan.channels, h, w, plan.num_tiles * plan.tile_size ** 2)
    assert nblocks > 1 and rows * w >= small_blocks
    got = _wgrad(x.to(dtype), plan, gy.to(dtype))
    assert got.dtype == dtype
    assert_close(got, _wgrad_reference(x, tiles, plan, gy), dtype)


def test_gpu_wgrad_blocks():
    # the paper's case at batch 64 (C = 124, 128 x 128, 51 x 5 in 1364 5 x 5 tiles)
    assert fused.wgrad_blocks(64, 124, 128, 128, 341 * 25) == (16, 512)  # density 0.25: 2048 products a block
    assert fused.wgrad_blocks(64, 124, 128, 128, 1364 * 25) == (18, 456)  # partials <= 1/8 of the input
    assert 456 * 1364 * 25 <= 64 * 124 * 128 * 128 / fused.PARTIAL_SHARE
    assert fused.wgrad_blocks(1, 4, 7, 9, 9 * 49) == (7, 1)  # a small input: one block of every row
    assert fused.wgrad_blocks(3, 1, 5, 4096, 9) == (1, 15)  # a row of more products is a block of its own


def test_gpu_wgrad_float32_error_does_not_grow_with_the_sum(monkeypatch):
    # positive products, 8 x 256 x 256 a tap: one float32 accumulator per tap drifted to
    # ~3e-6 of the sum; the blocked sums stay near float32's resolution (4e-8 measured), below
    # the forward's own float32 error (5e-7 to 2e-6 on the paper layer and RepLKNet's 31 x 31)
    monkeypatch.setattr(ops, "FORCE_STYLE", "gpu")
    plan = TilePlan.from_lists([[(0, 0)]], 3)
    x = torch.rand(8, 1, 256, 256, dtype=torch.float64)
    gy = torch.rand_like(x)
    want = _wgrad_reference(x, torch.zeros(1, 3, 3), plan, gy)
    got = _wgrad(x.float(), plan, gy.float())
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 5e-7


@pytest.mark.parametrize("small_blocks", [40], indirect=True)
def test_gpu_wgrad_bitwise_deterministic(small_blocks, monkeypatch):
    monkeypatch.setattr(ops, "FORCE_STYLE", "gpu")
    tiles, _, plan = split_branches([(torch.randn(4, 25, 5), None), (torch.randn(4, 5, 25), None)], 5)
    x, gy = torch.randn(2, 4, 20, 19), torch.randn(2, 4, 20, 19)
    first = _wgrad(x, plan, gy)
    assert torch.equal(first, _wgrad(x, plan, gy))
    assert_close(first, _wgrad_reference(x, tiles, plan, gy), torch.float32)


@pytest.mark.parametrize("small_blocks", [1], indirect=True)
def test_gpu_wgrad_gradcheck(small_blocks, monkeypatch):
    # one row per block: 5 blocks, a tree over a count that is not a power of two
    monkeypatch.setattr(ops, "FORCE_STYLE", "gpu")
    plan = TilePlan.from_lists([[(0, 0), (2, -3)], [], [(-4, 1)]], 3)
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(plan.num_tiles, 3, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w: shiftwise_conv2d(x, w, plan, backend="taichi_fused")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


@pytest.mark.cuda
@pytest.mark.parametrize("small_blocks", [1, 25], indirect=True)
@pytest.mark.parametrize("case", WGRAD_CASES, ids=[c[0] for c in WGRAD_CASES])
@DTYPES
def test_cuda_wgrad_matches_float64_reference(case, dtype, small_blocks):
    _, tiles, plan, (b, h, w) = case
    x = torch.randn(b, plan.channels, h, w, dtype=torch.float64)
    gy = torch.randn_like(x)
    want = _wgrad_reference(x, tiles, plan, gy)
    got = _wgrad(x.to("cuda", dtype), plan.to("cuda"), gy.to("cuda", dtype))
    assert got.device.type == "cuda" and got.dtype == dtype
    assert_close(got.cpu(), want, dtype)
    assert torch.equal(got, _wgrad(x.to("cuda", dtype), plan.to("cuda"), gy.to("cuda", dtype)))


@pytest.mark.cuda
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend", ["taichi_fused", "taichi_decomposed"])
def test_cuda_matches_reference(backend):
    tiles, _, plan = split_branches([(torch.randn(4, 31, 5), None), (torch.randn(4, 5, 31), None)], 5)
    x = torch.randn(2, 4, 28, 28)
    _check_against_reference(x.cuda(), tiles.cuda(), plan.to("cuda"), backend)
