"""The shift-wise operator against F.conv2d and the torch reference, every pixel, both backends."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import assert_close
from shiftwise import ShiftWiseConv2d, TilePlan, shift_add, shiftwise_conv2d, split_kernel
from shiftwise import reference
from shiftwise.tiling import extract_tiles, merge_tiles

# (kernel, tile N, map H x W, channels, batch): SLaK strips, RepLKNet squares, K % N == 0,
# maps smaller than the kernel, H != W, batch 1, one channel.
CASES = [
    ((51, 5), 5, (20, 17), 3, 2),
    ((49, 5), 5, (16, 16), 2, 2),
    ((47, 5), 5, (14, 14), 2, 1),
    ((13, 5), 5, (9, 12), 3, 2),
    ((5, 51), 5, (12, 30), 2, 2),
    ((31, 31), 5, (14, 14), 2, 2),
    ((31, 31), 3, (20, 9), 1, 1),
    ((29, 29), 7, (14, 14), 2, 2),
    ((27, 27), 5, (14, 13), 2, 1),
    ((27, 27), 3, (7, 7), 2, 2),
    ((13, 13), 5, (7, 7), 3, 2),
    ((13, 13), 7, (7, 9), 1, 1),
    ((25, 25), 5, (11, 11), 2, 1),  # K % N == 0
    ((21, 21), 7, (8, 10), 2, 1),
    ((15, 5), 5, (6, 6), 1, 1),
    ((3, 3), 5, (5, 4), 2, 2),  # kernel smaller than the tile
    ((51, 5), 3, (4, 4), 2, 1),
]


# tile sizes the property tests draw from: a fixed few, so that few Taichi kernels compile
TILE_SIZES = (1, 3, 4, 5)


def _dense_conv(c, kernel, dtype, bias=True):
    conv = nn.Conv2d(c, c, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=c, bias=bias, dtype=dtype)
    return conv


@pytest.mark.parametrize("kernel,n,hw,c,b", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["taichi", "torch"])
def test_from_dense_matches_conv2d_forward_backward(kernel, n, hw, c, b, dtype, backend):
    conv = _dense_conv(c, kernel, dtype)
    sw = ShiftWiseConv2d.from_dense(conv, small_kernel=n, backend=backend)
    x = torch.randn(b, c, *hw, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = conv(x), sw(x2)
    assert_close(y, y_ref)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    assert_close(x2.grad, x.grad)
    assert_close(sw.bias.grad, conv.bias.grad)
    # weight gradient: tile entries map one-to-one onto a dense kernel of the plan's extent
    ext = sw.plan.info.extent
    big = merge_tiles(sw.weight.detach(), sw.plan, ext).unsqueeze(1).requires_grad_(True)
    F.conv2d(x.detach(), big, padding=(ext[0] // 2, ext[1] // 2), groups=c).backward(g)
    assert_close(sw.weight.grad, extract_tiles(big.grad[:, 0], sw.plan))


@pytest.mark.parametrize("n", [3, 5, 7])
@pytest.mark.parametrize("k", [31, 29, 27, 13])
def test_replknet_square_kernels(k, n):
    conv = _dense_conv(2, (k, k), torch.float64)
    sw = ShiftWiseConv2d.from_dense(conv, small_kernel=n, backend="taichi")
    x = torch.randn(1, 2, 15, 16, dtype=torch.float64)
    assert_close(sw(x), conv(x))


def test_gradcheck_taichi_float64():
    tiles, plan = split_kernel(torch.randn(2, 7, 5, dtype=torch.float64), 3)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = tiles.clone().requires_grad_(True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, bias: shiftwise_conv2d(x, w, plan, bias, backend="taichi")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, bias))
    assert torch.autograd.gradgradcheck(fn, (x, w, bias))


def test_gradcheck_shift_add_variable_tiles():
    u = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 3, 3, 5], dtype=torch.int32)  # channel 1 owns no tile
    sy = torch.tensor([0, 3, -2, 1, 9], dtype=torch.int32)  # some shifts leave the input entirely
    sx = torch.tensor([1, -3, 0, 2, 0], dtype=torch.int32)
    fn = lambda u: shift_add(u, offsets, sy, sx, (5, 4), backend="taichi")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (u,))
    assert torch.autograd.gradgradcheck(fn, (u,))


def _naive_shift_add(u, offsets, sy, sx, hw):
    b, _, hu, wu = u.shape
    c = len(offsets) - 1
    y = torch.zeros(b, c, *hw, dtype=u.dtype)
    for ch in range(c):
        for t in range(offsets[ch], offsets[ch + 1]):
            for h in range(hw[0]):
                for w in range(hw[1]):
                    r, s = h + sy[t], w + sx[t]
                    if 0 <= r < hu and 0 <= s < wu:
                        y[:, ch, h, w] += u[:, t, r, s]
    return y


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_shift_add_property(data):
    c = data.draw(st.integers(1, 3))
    counts = data.draw(st.lists(st.integers(0, 3), min_size=c, max_size=c))
    t = sum(counts)
    hu, wu = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7))
    h, w = data.draw(st.integers(0, 6)), data.draw(st.integers(1, 6))
    sy = data.draw(st.lists(st.integers(-8, 8), min_size=t, max_size=t))
    sx = data.draw(st.lists(st.integers(-8, 8), min_size=t, max_size=t))
    offsets = [0]
    for k in counts:
        offsets.append(offsets[-1] + k)
    u = torch.randn(2, t, hu, wu, dtype=torch.float64)
    args = (torch.tensor(offsets, dtype=torch.int32), torch.tensor(sy, dtype=torch.int32),
            torch.tensor(sx, dtype=torch.int32), (h, w))
    expected = _naive_shift_add(u, offsets, sy, sx, (h, w))
    assert torch.equal(shift_add(u, *args, backend="taichi"), expected)
    assert torch.equal(shift_add(u, *args, backend="torch"), expected)


@pytest.mark.parametrize("counts", [[11, 11, 11], [0, 3, 9, 1, 20]])
@pytest.mark.parametrize("h,w,stores", [(33, 64, "pairs"), (40, 136, "pairs"), (70, 130, "pairs"), (65, 63, "one")])
@pytest.mark.parametrize("covering", [True, False])
def test_shift_add_rows_blocks_and_store_modes(counts, h, w, stores, covering):
    # work items of ROWS output rows (heights crossing their boundaries); float32 outputs written
    # two values per store when rows are of even width (136: a last chunk of 8 columns), one by
    # one when odd; tiles that cover every output column and shifts beyond the plane's edges:
    # against the torch reference
    from shiftwise import ops
    from shiftwise.taichi_kernels.shift_add import ROWS
    assert h > ROWS
    g = torch.Generator().manual_seed(h * w)
    t = sum(counts)
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    sy = torch.randint(-40, 40, (t,), generator=g, dtype=torch.int32)
    sx = torch.randint(0, 5, (t,), generator=g, dtype=torch.int32) if covering else \
        torch.randint(-30, 30, (t,), generator=g, dtype=torch.int32)
    u = torch.randn(2, t, h + 4, w + 4, generator=g)
    assert ops._flat_output(u.new_empty(1, 1, h, w))[0] == stores
    expected = shift_add(u.double(), offsets, sy, sx, (h, w), backend="torch")
    got = shift_add(u, offsets, sy, sx, (h, w), backend="taichi")
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_shift_add_fwd_out():
    from shiftwise import ops
    offsets = torch.tensor([0, 2, 3], dtype=torch.int32)
    sy, sx = torch.tensor([-3, 2, 0], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
    u = torch.randn(2, 3, 12, 12)
    expected = shift_add(u.double(), offsets, sy, sx, (10, 10), backend="torch")
    out = torch.full((2, 2, 10, 10), float("nan"))
    assert ops.shift_add_fwd(u, offsets, sy, sx, (10, 10), out=out) is out
    assert torch.allclose(out.double(), expected, atol=1e-5)
    # outputs at offsets into a buffer (torch allocates 64-byte aligned): 16 columns are stored as
    # pairs where the output is 8-byte aligned, else one by one
    u16 = torch.randn(2, 3, 18, 18)
    expected16 = shift_add(u16.double(), offsets, sy, sx, (16, 16), backend="torch")
    for skip, stores in ((0, "pairs"), (1, "one"), (2, "pairs")):
        shifted = torch.full((2 * 2 * 16 * 16 + skip,), float("nan"))[skip:].view(2, 2, 16, 16)
        assert ops._flat_output(shifted)[0] == stores
        ops.shift_add_fwd(u16, offsets, sy, sx, (16, 16), out=shifted)
        assert torch.allclose(shifted.double(), expected16, atol=1e-5), stores
    for bad in (torch.empty(2, 2, 10, 9), torch.empty(2, 2, 10, 10, dtype=torch.float64),
                torch.empty(2, 2, 10, 20)[..., ::2]):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            ops.shift_add_fwd(u, offsets, sy, sx, (10, 10), out=bad)


def test_shift_add_keeps_off_map_nan_out():
    offsets = torch.tensor([0, 3], dtype=torch.int32)
    sy, sx = torch.tensor([-4, 0, 4], dtype=torch.int32), torch.tensor([0, 2, 4], dtype=torch.int32)
    u = torch.randn(1, 3, 12, 14, dtype=torch.float64)
    u[0, 0, 9, 5] = float("nan")  # tile 0 reads rows h - 4: row 9 only for h = 13, off the 8-row map
    u[0, 2, 11, 6] = float("inf")  # tile 2 reads row 11 for h = 7: reaches output (7, 2)
    y = shift_add(u, offsets, sy, sx, (8, 10), backend="taichi")
    bad = ~y.isfinite()
    assert bad.sum() == 1 and bad[0, 0, 7, 2]
    assert torch.equal(y.isfinite(), shift_add(u, offsets, sy, sx, (8, 10), backend="torch").isfinite())


def test_decomposed_tall_strip_float32_compacted():
    # the decomposed path on a centred tall strip, float32, maps 16 wide: cropped planes, a
    # compacted plan (tile counts differ per channel), against F.conv2d in float64, forward and
    # the input and tile gradients
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 51, 5, generator=g, dtype=torch.float64)
    w[1, :30] = 0  # channel 1 keeps fewer tiles
    tiles, plan = split_kernel(w, 5)
    x = torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, w.unsqueeze(1), padding=(25, 2), groups=3)
    keep = tiles.flatten(1).abs().sum(1) > 0
    tiles, plan = tiles[keep], plan.select(keep)
    assert len(set((plan.offsets[1:] - plan.offsets[:-1]).tolist())) > 1
    xf = x.float().requires_grad_(True)
    tf = tiles.float().requires_grad_(True)
    y = shiftwise_conv2d(xf, tf, plan, backend="taichi_decomposed")
    assert_close(y, ref, torch.float32)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gx, gt = torch.autograd.grad(y, (xf, tf), gy.float())
    x64, t64 = x.clone().requires_grad_(True), tiles.clone().requires_grad_(True)
    want = torch.autograd.grad(shiftwise_conv2d(x64, t64, plan, backend="torch"), (x64, t64), gy)
    assert_close(gx, want[0], torch.float32)
    assert_close(gt, want[1], torch.float32)


def test_decomposed_planes_are_cropped_to_what_tiles_read():
    # tall strips: every tile in one column, so the planes are exactly W wide (their rows start
    # at the window); the cropped planes are the full ones sliced,
    # and the shift-add of either is the same, in the forward and the input gradient
    from shiftwise.functional import decomposed_planes
    g = torch.Generator().manual_seed(0)
    for kernel, n, hw in (((51, 5), 5, (24, 16)), ((5, 51), 5, (16, 24)), ((5, 5), 5, (9, 7)), ((7, 3), 3, (8, 8)),
                          ((31, 31), 5, (14, 14)), ((9, 3), 4, (8, 8))):
        w = torch.randn(2, *kernel, generator=g, dtype=torch.float64)
        tiles, plan = split_kernel(w, n)
        x = torch.randn(2, 2, *hw, generator=g, dtype=torch.float64, requires_grad=True)
        u, sy, sx = decomposed_planes(x, tiles, plan)
        (ph, pw), (oy, ox) = plan.info.plane_layout
        full = F.conv2d(x.index_select(1, plan.tile_channel().long()), tiles.unsqueeze(1), padding=n - 1,
                        groups=plan.num_tiles)
        ay, ax = n - 1 - ph, n - 1 - pw
        cropped = full[..., ay:full.shape[2] - ay, ax:full.shape[3] - ax]
        assert torch.allclose(u, cropped, rtol=1e-12, atol=1e-12)  # (conv algorithms differ per padding)
        assert torch.equal(sy, plan.dy + n - 1 - n // 2 - ay) and torch.equal(sx, plan.dx + n - 1 - n // 2 - ax)
        if kernel[1] <= n and n % 2:  # one column of tiles, centred
            assert u.shape[3] == hw[1] and bool((sx == 0).all())
        o0 = plan.dy.new_tensor(n - 1 - n // 2)
        want = shift_add(full, plan.offsets, plan.dy + o0, plan.dx + o0, hw, backend="torch")
        assert torch.equal(shift_add(cropped, plan.offsets, sy, sx, hw, backend="torch"), want)
        ref = F.conv2d(x, w.unsqueeze(1), padding=(kernel[0] // 2, kernel[1] // 2), groups=2)
        got = shiftwise_conv2d(x, tiles, plan, backend="taichi_decomposed")
        assert_close(got, ref, torch.float64)
        gx, = torch.autograd.grad(got.sum(), x)
        gref, = torch.autograd.grad(ref.sum(), x)
        assert_close(gx, gref, torch.float64)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_shiftwise_conv_property_random_geometry(data):
    c = data.draw(st.integers(1, 3))
    n = data.draw(st.sampled_from(TILE_SIZES))
    per_channel = [data.draw(st.lists(st.tuples(st.integers(-12, 12), st.integers(-12, 12)), max_size=4))
                   for _ in range(c)]
    plan = TilePlan.from_lists(per_channel, n)
    hw = (data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12)))
    x = torch.randn(data.draw(st.integers(1, 2)), c, *hw, dtype=torch.float64)
    tiles = torch.randn(plan.num_tiles, n, n, dtype=torch.float64)
    bias = torch.randn(c, dtype=torch.float64) if data.draw(st.booleans()) else None
    # independent oracle: the equation summed tile by tile with explicit zero padding
    p = 30
    xp = F.pad(x, (p, p, p, p))
    expected = torch.zeros_like(x) + (bias.view(1, c, 1, 1) if bias is not None else 0)
    off = plan.offsets.tolist()
    for ch in range(c):
        for t in range(off[ch], off[ch + 1]):
            dy, dx = int(plan.dy[t]), int(plan.dx[t])
            for i in range(n):
                for j in range(n):
                    r0, c0 = p + dy + i - n // 2, p + dx + j - n // 2
                    expected[:, ch] += tiles[t, i, j] * xp[:, ch, r0:r0 + hw[0], c0:c0 + hw[1]]
    for backend in ("taichi", "torch"):
        assert_close(shiftwise_conv2d(x, tiles, plan, bias, backend=backend), expected)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(layout):
    conv = _dense_conv(4, (13, 5), torch.float64)
    sw = ShiftWiseConv2d.from_dense(conv, backend="taichi")
    x = torch.randn(2, 4, 12, 10, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(2, 4, 10, 12, dtype=torch.float64).transpose(2, 3)
    else:
        x = torch.randn(2, 8, 12, 20, dtype=torch.float64)[:, ::2, :, ::2]
    assert not x.is_contiguous()
    assert_close(sw(x), conv(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype):
    conv = _dense_conv(3, (13, 13), torch.float32)
    sw = ShiftWiseConv2d.from_dense(conv, backend="taichi").to(dtype)
    x = torch.randn(1, 3, 10, 10)
    y = sw(x.to(dtype))
    assert y.dtype == dtype
    assert_close(y.float(), conv.to(dtype).float()(x.to(dtype).float()), dtype)


def test_variable_tiles_and_empty_cases():
    conv = _dense_conv(3, (15, 15), torch.float64)
    with torch.no_grad():
        conv.weight[1, :, :5] = 0  # top tile row of channel 1 is zero
        conv.weight[2] = 0
    sw = ShiftWiseConv2d.from_dense(conv, drop_zero=True, backend="taichi")
    assert sw.plan.counts().tolist() == [9, 6, 0]
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    assert_close(sw(x), conv(x))
    empty = torch.randn(0, 3, 8, 9, dtype=torch.float64)
    assert sw(empty).shape == (0, 3, 8, 9)
    none = ShiftWiseConv2d.from_tiles(torch.zeros(0, 5, 5, dtype=torch.float64),
                                      TilePlan.from_lists([[], [], []], 5), torch.ones(3, dtype=torch.float64))
    assert torch.equal(none(x), torch.ones_like(x))


def test_deterministic_bitwise():
    conv = _dense_conv(8, (51, 5), torch.float32)
    sw = ShiftWiseConv2d.from_dense(conv, backend="taichi")
    x = torch.randn(2, 8, 24, 24, requires_grad=True)
    y1 = sw(x)
    g1, = torch.autograd.grad(y1.sum(), x)
    y2 = sw(x)
    g2, = torch.autograd.grad(y2.sum(), x)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)


def test_reference_matches_loop_oracle():
    tiles, plan = split_kernel(torch.randn(2, 11, 3, dtype=torch.float64), 3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    kernel = merge_tiles(tiles, plan, (11, 3))
    assert_close(reference.shiftwise_conv2d(x, tiles, plan), F.conv2d(x, kernel[:, None], padding=(5, 1), groups=2))


# bad inputs ---------------------------------------------------------------------------------
def test_op_argument_errors():
    tiles, plan = split_kernel(torch.randn(3, 13, 5), 5)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        shiftwise_conv2d(x[0], tiles, plan)
    with pytest.raises(ValueError, match="4 channels but the plan has 3"):
        shiftwise_conv2d(torch.randn(1, 4, 8, 8), tiles, plan)
    with pytest.raises(ValueError, match=r"weight must have shape \(T, N, N\) = \(9, 5, 5\)"):
        shiftwise_conv2d(x, tiles[:4], plan)
    with pytest.raises(TypeError, match="weight dtype"):
        shiftwise_conv2d(x, tiles.double(), plan)
    with pytest.raises(TypeError, match="float tensor"):
        shiftwise_conv2d(x.long(), tiles.long(), plan)
    with pytest.raises(ValueError, match="bias must have shape"):
        shiftwise_conv2d(x, tiles, plan, torch.zeros(4))
    with pytest.raises(ValueError, match="one device"):
        shiftwise_conv2d(x, tiles.to("meta"), plan)
    with pytest.raises(TypeError, match="TilePlan"):
        shiftwise_conv2d(x, tiles, "plan")
    with pytest.raises(ValueError, match="unknown backend"):
        shiftwise_conv2d(x, tiles, plan, backend="cuda")


def test_shift_add_argument_errors():
    u = torch.randn(1, 2, 4, 4)
    s = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="end at T=2"):
        shift_add(u, torch.tensor([0, 1], dtype=torch.int32), s, s, (4, 4))
    with pytest.raises(ValueError, match="one per input plane"):
        shift_add(u, torch.tensor([0, 2], dtype=torch.int32), s[:1], s, (4, 4))
    with pytest.raises(ValueError, match=r"\(B, T, H, W\)"):
        shift_add(u[0], torch.tensor([0, 2], dtype=torch.int32), s, s, (4, 4))
