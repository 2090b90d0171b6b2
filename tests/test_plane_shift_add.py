"""The general shift-add (several entries per plane) against a loop oracle, F.conv2d and its twin."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from shiftwise import ShiftAddPlan, ops, plane_shift_add
from shiftwise import reference

STYLES = ["cpu", "gpu"]


@pytest.fixture(params=STYLES)
def style(request, monkeypatch):
    monkeypatch.setattr(ops, "FORCE_STYLE", request.param)
    return request.param


def _naive(planes, entries, num_outputs, hw):
    """The defining sum, one entry and one output pixel at a time."""
    b, _, hu, wu = planes.shape
    y = torch.zeros(b, num_outputs, *hw, dtype=planes.dtype)
    for o, p, dy, dx in entries:
        for h in range(hw[0]):
            for w in range(hw[1]):
                if 0 <= h + dy < hu and 0 <= w + dx < wu:
                    y[:, o, h, w] += planes[:, p, h + dy, w + dx]
    return y


def _naive_transpose(gy, entries, num_planes, planes_hw):
    """The adjoint of :func:`_naive`: every output pixel's gradient sent back to the planes."""
    b, _, h, w = gy.shape
    gu = torch.zeros(b, num_planes, *planes_hw, dtype=gy.dtype)
    for o, p, dy, dx in entries:
        for r in range(h):
            for c in range(w):
                if 0 <= r + dy < planes_hw[0] and 0 <= c + dx < planes_hw[1]:
                    gu[:, p, r + dy, c + dx] += gy[:, o, r, c]
    return gu


def _random_entries(g, n, num_outputs, num_planes, reach, repeats=0):
    entries = [(int(torch.randint(num_outputs, (), generator=g)), int(torch.randint(num_planes, (), generator=g)),
                int(torch.randint(-reach, reach + 1, (), generator=g)),
                int(torch.randint(-reach, reach + 1, (), generator=g))) for _ in range(n)]
    return entries + entries[:repeats]  # exact repeats: each one counts again


def _plan(entries, num_outputs, num_planes):
    cols = list(zip(*entries)) if entries else ([], [], [], [])
    return ShiftAddPlan.from_entries(*(torch.tensor(c, dtype=torch.int64) for c in cols), num_outputs, num_planes)


# (entries, repeats, outputs, planes, shift reach, planes Hu x Wu, output H x W, batch)
CASES = [
    (12, 4, 3, 4, 3, (6, 7), (6, 7), 2),  # repeated entries, several entries per plane
    (10, 0, 4, 2, 9, (5, 5), (5, 6), 1),  # shifts beyond the map, batch 1
    (9, 2, 2, 3, 4, (3, 4), (8, 9), 2),  # planes smaller than the output
    (9, 0, 3, 3, 2, (10, 12), (4, 5), 1),  # planes larger than the output
    (3, 0, 6, 2, 1, (4, 4), (4, 4), 2),  # outputs without entries
    (0, 0, 2, 2, 1, (4, 4), (3, 3), 1),  # no entries at all
    (5, 1, 2, 2, 2, (4, 4), (0, 3), 2),  # empty output
]


@pytest.mark.parametrize("n,repeats,outs,planes,reach,uhw,hw,b", CASES)
@pytest.mark.parametrize("backend", ["taichi", "torch"])
def test_matches_loop_oracle_forward_and_adjoint(n, repeats, outs, planes, reach, uhw, hw, b, backend, style):
    g = torch.Generator().manual_seed(n * 31 + outs)
    entries = _random_entries(g, n, outs, planes, reach, repeats)
    plan = _plan(entries, outs, planes)
    u = torch.randn(b, planes, *uhw, dtype=torch.float64, generator=g, requires_grad=True)
    y = plane_shift_add(u, plan, hw, backend=backend)
    assert_close(y, _naive(u.detach(), entries, outs, hw))
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    gu, = torch.autograd.grad(y, u, gy)
    assert_close(gu, _naive_transpose(gy, entries, planes, uhw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_taichi_matches_twin_rows_and_chunks(dtype, style):
    # outputs taller than one work item's rows and wider than one column chunk, planes of other
    # sizes, float32 rows of even and odd width (two stores per value pair, one by one)
    g = torch.Generator().manual_seed(7)
    for uhw, hw in (((40, 70), (37, 66)), ((35, 66), (41, 71))):
        entries = _random_entries(g, 40, 5, 6, 12, repeats=6)
        plan = _plan(entries, 5, 6)
        u = torch.randn(2, 6, *uhw, dtype=dtype, generator=g, requires_grad=True)
        gy = torch.randn(2, 5, *hw, dtype=dtype, generator=g)
        results = []
        for backend in ("taichi", "torch"):
            y = plane_shift_add(u, plan, hw, backend=backend)
            results.append((y, *torch.autograd.grad(y, u, gy)))
        for got, want in zip(*results):
            assert_close(got, want)


@pytest.mark.parametrize("backend", ["taichi", "torch"])
def test_gradcheck_first_and_second_order(backend, style):
    entries = [(0, 0, 0, 1), (0, 1, -1, 0), (1, 0, 2, -2), (1, 0, 0, 1), (2, 1, 5, 0), (0, 0, 0, 1)]
    plan = _plan(entries, 3, 2)
    u = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda u: plane_shift_add(u, plan, (3, 4), backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (u,))
    assert torch.autograd.gradgradcheck(fn, (u,))


def test_deterministic_bitwise(style):
    g = torch.Generator().manual_seed(3)
    entries = _random_entries(g, 300, 12, 30, 6, repeats=20)
    plan = _plan(entries, 12, 30)
    u = torch.randn(2, 30, 20, 20, generator=g, requires_grad=True)
    gy = torch.randn(2, 12, 18, 18, generator=g)
    runs = []
    for _ in range(2):
        y = plane_shift_add(u, plan, (18, 18), backend="taichi")
        runs.append((y, *torch.autograd.grad(y, u, gy)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _sw_like(channels, nk, n_rep, big, small, g):
    """Entries of three sums per channel over its ``nk`` shared planes, as a shift-wise layer
    with ``n_rep`` shuffled copies reads them: horizontal (plane ``j`` of copy ``i`` shifted
    along the columns to slot ``perm_i^-1[j]``), vertical (the same along rows), identity picks."""
    pad = [big // 2 - q * small - (small - 1) for q in range(nk)]  # slot offsets
    extra = (small - 1) - small // 2
    entries = []
    for c in range(channels):
        for i in range(n_rep):
            for axis in (0, 1):
                slot = torch.argsort(torch.randperm(nk, generator=g))
                for j in range(nk):
                    p, s = c * nk + j, -pad[int(slot[j])]
                    entries.append((axis * channels + c, p, extra, s) if axis == 0 else
                                   (axis * channels + c, p, s, extra))
            entries.append((2 * channels + c, c * nk + int(torch.randint(nk, (), generator=g)), extra, extra))
    return entries


def _merged_kernels(kernels, entries, num_outputs, small):
    """One dense kernel per output: each entry's plane kernel at its offset (entries are linear in
    the plane kernels), centred, large enough for every entry."""
    # the plane of a "full" (padding small - 1) conv, read at (h + dy, w + dx), is the small kernel
    # centred at (dy - small // 2, dx - small // 2) from the output pixel
    centres = [(dy - small // 2, dx - small // 2) for _, _, dy, dx in entries]
    r = max(max(abs(a), abs(b)) for a, b in centres) + small // 2
    big = kernels.new_zeros(num_outputs, 2 * r + 1, 2 * r + 1)
    for (o, p, _, _), (cy, cx) in zip(entries, centres):
        top, left = r + cy - small // 2, r + cx - small // 2
        big[o, top:top + small, left:left + small] += kernels[p]
    return big


@pytest.mark.parametrize("big,small,hw", [(13, 3, (9, 11)), (11, 5, (6, 7)), (7, 3, (4, 4))])
@pytest.mark.parametrize("backend", ["taichi", "torch"])
def test_shared_planes_equal_one_merged_kernel(big, small, hw, backend):
    # nk small kernels per channel give nk shared planes; sums of their shifted copies are the
    # depthwise conv of one M x N kernel per sum (maps smaller than the kernel included)
    g = torch.Generator().manual_seed(big * small)
    channels, n_rep = 2, 3
    nk = math.ceil(big / small)
    entries = _sw_like(channels, nk, n_rep, big, small, g)
    num_outputs = 3 * channels
    plan = _plan(entries, num_outputs, channels * nk)
    x = torch.randn(2, channels, *hw, dtype=torch.float64, generator=g, requires_grad=True)
    kernels = torch.randn(channels * nk, small, small, dtype=torch.float64, generator=g, requires_grad=True)
    planes = F.conv2d(x, kernels[:, None], padding=small - 1, groups=channels)
    y = plane_shift_add(planes, plan, hw, backend=backend)
    merged = _merged_kernels(kernels, entries, num_outputs, small)
    x_out = x.repeat(1, 3, 1, 1)  # output o = a * channels + c reads channel c
    expected = F.conv2d(x_out, merged[:, None], padding=merged.shape[-1] // 2, groups=num_outputs)
    assert_close(y, expected)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    for got, want in zip(torch.autograd.grad(y, (x, kernels), gy), torch.autograd.grad(expected, (x, kernels), gy)):
        assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype):
    plan = _plan([(0, 0, 1, 0), (0, 1, 0, -1), (1, 1, 0, 0)], 2, 2)
    u = torch.randn(2, 2, 5, 5).to(dtype)
    y = plane_shift_add(u, plan, (5, 5), backend="taichi")
    assert y.dtype == dtype
    assert_close(y, plane_shift_add(u.double(), plan, (5, 5), backend="torch"), dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = plane_shift_add(u, plan, (5, 5), backend="taichi")
    assert ya.dtype == torch.float32
    assert_close(ya, plane_shift_add(u.float(), plan, (5, 5), backend="torch"))


def test_non_contiguous_planes():
    plan = _plan([(0, 0, 1, 0), (0, 1, 0, -1), (1, 1, 2, 1), (1, 0, 0, 0)], 2, 2)
    u = torch.randn(2, 6, 7, 2, dtype=torch.float64).transpose(1, 3)  # (2, 2, 7, 6), strided
    assert not u.is_contiguous()
    assert_close(plane_shift_add(u, plan, (6, 6), backend="taichi"), _naive(u, [(0, 0, 1, 0), (0, 1, 0, -1),
                                                                                 (1, 1, 2, 1), (1, 0, 0, 0)], 2, (6, 6)))


def test_plan_views():
    # given out of order: each view groups the entries, keeping their given order within a group
    entries = [(1, 2, 0, 3), (0, 2, -1, 0), (1, 0, 0, 3), (0, 1, 2, 2), (1, 2, 0, 3)]
    plan = _plan(entries, 3, 4)
    assert (plan.num_outputs, plan.num_planes, plan.num_entries) == (3, 4, 5)
    assert plan.out_offsets.tolist() == [0, 2, 5, 5]
    assert plan.out_channel.tolist() == [0, 0, 1, 1, 1]
    assert list(zip(plan.plane.tolist(), plan.dy.tolist(), plan.dx.tolist())) == \
        [(2, -1, 0), (1, 2, 2), (2, 0, 3), (0, 0, 3), (2, 0, 3)]
    assert plan.plane_offsets.tolist() == [0, 1, 2, 5, 5]
    assert list(zip(plan.plane_out.tolist(), plan.plane_dy.tolist(), plan.plane_dx.tolist())) == \
        [(1, 0, 3), (0, 2, 2), (1, 0, 3), (0, -1, 0), (1, 0, 3)]
    assert plan.shift_groups == ((-1, 0, 0, 1), (0, 3, 1, 4), (2, 2, 4, 5))
    assert plan.shift_out.tolist() == [0, 1, 1, 1, 0] and plan.shift_plane.tolist() == [2, 2, 0, 2, 1]
    assert all(getattr(plan, n).dtype == torch.int32 for n in ("out_offsets", "plane", "dy", "plane_offsets",
                                                               "plane_out", "plane_dx"))
    assert plan.to("cpu") is plan and plan == _plan(entries, 3, 4) and plan != _plan(entries[:4], 3, 4)
    assert "entries=5" in repr(plan)


@pytest.mark.parametrize("args,match", [
    (([0, 3], [0, 0], [0, 0], [0, 0], 3, 1), r"out_channel values must lie in \[0, num_outputs=3\)"),
    (([0, 0], [0, -1], [0, 0], [0, 0], 3, 1), r"plane values must lie in \[0, num_planes=1\)"),
    (([0, 0], [0], [0, 0], [0, 0], 3, 1), "one value per entry"),
    (([[0]], [0], [0], [0], 3, 1), "out_channel must be 1-D"),
    (([0], [0], [0.5], [0], 3, 1), "dy must be an integer tensor"),
    (([0], [0], [0], [2 ** 31], 3, 1), r"dx values must lie in"),
    (([], [], [], [], -1, 1), "must be >= 0"),
])
def test_plan_errors(args, match):
    with pytest.raises(ValueError, match=match):
        ShiftAddPlan.from_entries(*args)


def test_argument_errors():
    plan = _plan([(0, 0, 0, 0)], 1, 2)
    u = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="has 3 planes"):
        plane_shift_add(torch.randn(1, 3, 4, 4), plan, (4, 4))
    with pytest.raises(ValueError, match=r"must be \(B, P, H, W\)"):
        plane_shift_add(u[0], plan, (4, 4))
    with pytest.raises(TypeError, match="float tensor"):
        plane_shift_add(u.long(), plan, (4, 4))
    with pytest.raises(TypeError, match="ShiftAddPlan"):
        plane_shift_add(u, None, (4, 4))
    with pytest.raises(ValueError, match="non-negative"):
        plane_shift_add(u, plan, (4, -1))
    with pytest.raises(ValueError, match="unknown backend"):
        plane_shift_add(u, plan, (4, 4), backend="nope")


def test_opcheck_meta_and_compile():
    entries = [(0, 0, 0, 1), (0, 1, -1, 0), (1, 0, 2, -2), (1, 0, 0, 1)]
    plan = _plan(entries, 2, 2)
    index = (plan.out_offsets, plan.plane, plan.dy, plan.dx, plan.plane_offsets, plan.plane_out, plan.plane_dy,
             plan.plane_dx)
    u = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.plane_shift_add, (u, *index, 4, 3))
    gy = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.plane_shift_add_transpose, (gy, *index, 6, 5))
    assert plane_shift_add(u.detach().to("meta"), plan, (4, 3)).shape == (2, 2, 4, 3)
    torch._dynamo.reset()
    for backend in ("taichi", "torch"):
        def fn(t):
            return plane_shift_add(t, plan, (4, 3), backend=backend).sin()

        y = torch.compile(fn, backend="aot_eager", fullgraph=True)(u)
        g, = torch.autograd.grad(y.sum(), u)
        y_ref = fn(u)
        g_ref, = torch.autograd.grad(y_ref.sum(), u)
        assert_close(y, y_ref)
        assert_close(g, g_ref)
