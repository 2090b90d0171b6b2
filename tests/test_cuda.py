"""The CUDA path on a GPU: every backend against float64 references and cuDNN (TF32 off),
gradients, devices and streams, torch.compile, autocast, compacted plans, training steps and
the general shift-add.

These tests are marked ``cuda`` and run in a process of their own, ``pytest -m cuda tests``:
tests/conftest.py then starts Taichi on CUDA before any test runs (one arch per process). In any
other run, or without a GPU, they skip with the reason. ``scripts/gpu_check.sh`` runs them.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close, make_demo_model
from shiftwise import (ShiftAddPlan, ShiftWiseConv2d, _runtime, cli, plane_shift_add, shiftwise_conv2d,
                       split_branches)
from shiftwise.convert.swap import convert_model
from shiftwise.modules import set_backend
from shiftwise.sparse.compact import compact
from shiftwise.sparse.trainer import load_checkpoint
from shiftwise.tiling import merge_tiles

# cuDNN's convolutions (the decomposed path's small convs, the references, the models' other
# layers) in full float32: with TF32, allowed by default, they would round inputs to 10-bit mantissas
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("no_tf32")]

CUDA = torch.device("cuda", 0)
TAICHI_BACKENDS = ("taichi_fused", "taichi_decomposed")

# (branch kernels, tile N, map H x W, channels, batch): geometry that catches border and indexing
# errors: strips longer than the map, maps of 7 and 9 pixels, widths that are not a multiple of
# 32, tile sizes 1/3/5/7, a kernel smaller than its tile, tiles that never reach the map, batch 1.
SWEEP = [
    (((51, 5),), 5, (20, 33), 3, 2),
    (((5, 51),), 5, (9, 70), 2, 1),
    (((13, 13),), 3, (7, 7), 4, 2),
    (((13, 13),), 7, (9, 9), 3, 1),
    (((7, 9),), 1, (9, 37), 2, 2),
    (((31, 31), (5, 5)), 5, (14, 14), 2, 2),
    (((47, 5), (5, 47), (5, 5)), 5, (14, 14), 4, 2),  # SLaK stage 3: some tiles never reach the map
    (((3, 3),), 5, (5, 4), 2, 2),
]


def _case(branches, n, c, dtype=torch.float64, seed=0):
    """``(tiles, bias, plan)``: random parallel branches split into N x N tiles."""
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(c, kh, kw, dtype=dtype, generator=g), torch.randn(c, dtype=dtype, generator=g))
             for kh, kw in branches]
    return split_branches(parts, n)


def _dense(x, kernel, bias):
    """F.conv2d of a centred depthwise ``kernel`` ``(C, KH, KW)``: the independent reference."""
    kh, kw = kernel.shape[-2:]
    return F.conv2d(x, kernel[:, None], bias, padding=(kh // 2, kw // 2), groups=kernel.shape[0])


def _reference(x, tiles, plan, bias, gy):
    """``(y, dx, dtiles, dbias)`` in float64 on the CPU: F.conv2d of the merged kernel (the plan's
    whole extent; merging is a differentiable scatter, so the tile gradient comes from
    F.conv2d's kernel gradient)."""
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, tiles, bias)]
    kernel = merge_tiles(leaves[1], plan.to("cpu"))
    y = _dense(leaves[0], kernel, leaves[2])
    return (y, *torch.autograd.grad(y, leaves, gy.detach().cpu().double()))


def _on_cuda(x, tiles, plan, bias, gy, backend):
    """``(y, dx, dtiles, dbias)`` of ``shiftwise_conv2d`` on the GPU."""
    leaves = [t.detach().to(CUDA).requires_grad_(True) for t in (x, tiles, bias)]
    y = shiftwise_conv2d(leaves[0], leaves[1], plan, leaves[2], backend=backend)
    return (y, *torch.autograd.grad(y, leaves, gy.to(CUDA)))


@pytest.mark.parametrize("branches,n,hw,c,b", SWEEP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [*TAICHI_BACKENDS, "auto"])
def test_sweep_matches_float64_conv2d_and_cudnn(branches, n, hw, c, b, dtype, backend):
    tiles, bias, plan = _case(branches, n, c)
    tiles, bias = tiles.to(dtype), bias.to(dtype)
    x = torch.randn(b, c, *hw, dtype=dtype)
    gy = torch.randn(b, c, *hw, dtype=dtype)
    got = _on_cuda(x, tiles, plan, bias, gy, backend)
    want = _reference(x, tiles, plan, bias, gy)
    for name, g, w in zip(("output", "input grad", "tile grad", "bias grad"), got, want):
        assert g.device == CUDA and g.dtype == dtype, name
        assert_close(g.cpu(), w, dtype)
    # cuDNN on the same GPU agrees as closely
    merged = merge_tiles(tiles.to(CUDA), plan.to(CUDA))
    assert_close(got[0].cpu(), _dense(x.to(CUDA), merged, bias.to(CUDA)).cpu(), dtype)


@pytest.mark.parametrize("backend", TAICHI_BACKENDS)
def test_gradcheck_float64(backend):
    tiles, bias, plan = _case(((7, 5),), 3, 2)
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, device=CUDA, requires_grad=True)
    w = tiles.to(CUDA).requires_grad_(True)
    b = bias.to(CUDA).requires_grad_(True)

    def fn(x, w, b):
        return shiftwise_conv2d(x, w, plan, b, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_fused_runs_are_bitwise_equal():
    """The fused kernels sum in a fixed order without atomics: output and every gradient repeat
    bit for bit (the decomposed path's small convs are cuDNN's, whose determinism is cuDNN's)."""
    tiles, bias, plan = _case(((31, 5), (5, 31)), 5, 6, torch.float32)
    x = torch.randn(4, 6, 28, 28)
    gy = torch.randn(4, 6, 28, 28)
    first, second = (_on_cuda(x, tiles, plan, bias, gy, "taichi_fused") for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [*TAICHI_BACKENDS, "auto"])
def test_module_from_dense_on_cuda(backend):
    conv = nn.Conv2d(4, 4, (51, 5), padding=(25, 2), groups=4)
    sw = ShiftWiseConv2d.from_dense(conv, backend=backend).to("cuda")
    assert sw.tile_offsets.device == CUDA  # the plan's buffers move with the module
    x = torch.randn(2, 4, 20, 20)
    assert_close(sw(x.cuda()).cpu(), conv.double()(x.double()), torch.float32)


def test_devices_and_streams():
    tiles, bias, plan = _case(((13, 5),), 5, 3, torch.float32)
    x = torch.randn(2, 3, 12, 10)
    want = _dense(x.double(), merge_tiles(tiles.double(), plan), bias.double())
    for device in ("cuda", "cuda:0", CUDA):  # the plan may stay on the CPU: it follows the input
        y = shiftwise_conv2d(x.to(device), tiles.to(device), plan, bias.to(device), backend="taichi_fused")
        assert y.device == CUDA
        assert_close(y.cpu(), want, torch.float32)
    # Taichi launches on the default stream: under a side stream an explicit Taichi backend
    # refuses before launching, and auto runs a PyTorch path on that stream instead
    xc, tc, bc = x.to(CUDA), tiles.to(CUDA), bias.to(CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for backend in TAICHI_BACKENDS:
            with pytest.raises(_runtime.TaichiUnavailable, match="stream"):
                shiftwise_conv2d(xc, tc, plan, bc, backend=backend)
        y = shiftwise_conv2d(xc, tc, plan, bc, backend="auto")
    torch.cuda.current_stream().wait_stream(side)
    assert_close(y.cpu(), want, torch.float32)
    if torch.cuda.device_count() > 1:  # Taichi addresses the first visible GPU only
        other = torch.device("cuda", 1)
        with pytest.raises(_runtime.TaichiUnavailable, match="CUDA_VISIBLE_DEVICES"):
            shiftwise_conv2d(x.to(other), tiles.to(other), plan, bias.to(other), backend="taichi_fused")


@pytest.mark.parametrize("backend", (*TAICHI_BACKENDS, "auto"))
def test_torch_compile_inductor_in_one_graph(backend):
    torch._dynamo.reset()
    model = nn.Sequential(ShiftWiseConv2d(6, (13, 5), backend=backend), nn.GELU(),
                          ShiftWiseConv2d(6, (5, 13), small_kernel=3, backend=backend)).to(CUDA)
    x = torch.randn(2, 6, 16, 16, device=CUDA, requires_grad=True)
    expected = model(x)
    g_expected, = torch.autograd.grad(expected.square().sum(), x)
    compiled = torch.compile(model, fullgraph=True)  # inductor; fullgraph: a graph break raises
    y = compiled(x)
    g, = torch.autograd.grad(y.square().sum(), x)
    assert_close(y, expected)
    assert_close(g, g_expected)


@pytest.mark.parametrize("backend", TAICHI_BACKENDS)
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_module_is_a_float32_op_under_autocast(backend, amp):
    conv = ShiftWiseConv2d(6, kernel_size=(13, 7), small_kernel=5, backend=backend).to(CUDA)
    x = torch.randn(2, 6, 11, 9, device=CUDA).to(amp).requires_grad_(True)
    with torch.autocast("cuda", dtype=amp):
        y = conv(x)
    assert y.dtype == torch.float32
    gx, gw = torch.autograd.grad(y.square().sum(), (x, conv.weight))
    assert gx.dtype == amp and gw.dtype == torch.float32
    x32 = x.detach().float().requires_grad_(True)  # what autocast computes: the op on the input cast up
    expected = conv(x32)
    gx32, gw32 = torch.autograd.grad(expected.square().sum(), (x32, conv.weight))
    assert_close(y, expected)
    assert_close(gw, gw32)
    assert_close(gx.float(), gx32.to(amp).float(), amp)


def test_converted_model_under_autocast():
    model = make_demo_model()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        sw = convert_model(copy.deepcopy(model)).to(CUDA)
        with torch.autocast("cuda", dtype=torch.float16):
            got = sw(x.to(CUDA))
    # the bound tests/test_autocast.py sets for autocast logits of the embedded demo
    err = (got.float().cpu() - want).abs().max() / want.abs().max()
    assert err < 2e-2, f"float16 autocast logits differ by {err:.2e} of max |logit|"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [*TAICHI_BACKENDS, "auto"])
def test_compacted_plan_with_empty_channels(dtype, backend):
    tiles, bias, plan = _case(((31, 5), (5, 31), (5, 5)), 5, 5)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(plan.num_tiles, generator=g) < 0.4
    channel = plan.tile_channel().long()
    keep[channel == 1] = False  # channels left with no tile: the bias alone
    keep[channel == 3] = False
    keep[(channel == 4).nonzero()[0]] = True  # one channel with a single tile
    tiles, bias = tiles.to(dtype), bias.to(dtype)
    x = torch.randn(2, 5, 17, 23, dtype=dtype)
    gy = torch.randn(2, 5, 17, 23, dtype=dtype)
    small = plan.select(keep)
    assert small.num_tiles == int(keep.sum())
    got = _on_cuda(x, tiles[keep], small, bias, gy, backend)
    # the masked full plan (removed tiles zeroed) is the reference
    want = _reference(x, tiles * keep[:, None, None].to(dtype), plan, bias, gy)
    want = (want[0], want[1], want[2][keep], want[3])
    for a, b in zip(got, want):
        assert_close(a.cpu(), b, dtype)
    assert torch.equal(got[0][:, 1].cpu(), bias[1].expand(2, 17, 23))


def test_compacted_model_on_cuda():
    model = convert_model(make_demo_model())
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ShiftWiseConv2d)}
    g = torch.Generator().manual_seed(2)
    masks = {}
    with torch.no_grad():
        for name, m in layers.items():
            keep = torch.rand(m.weight.shape[0], generator=g) < 0.3
            keep[m.plan.tile_channel().long() == 0] = False  # an empty channel in every layer
            masks[name] = keep
            m.weight[~keep] = 0
    small = compact(model, masks).to(CUDA)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = set_backend(model.double(), "torch")(x.double())  # the masked model, PyTorch reference
        got = small(x.to(CUDA))
    # a whole network in float32 (cuDNN picks its algorithms for the stem and the other layers)
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=1e-4 * want.abs().max().item())


def _tiny_net(backend, dtype, device):
    torch.manual_seed(3)
    net = nn.Sequential(ShiftWiseConv2d(4, (13, 13), small_kernel=5, backend=backend), nn.BatchNorm2d(4), nn.GELU(),
                        ShiftWiseConv2d(4, (31, 5), small_kernel=3, backend=backend), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    return net.to(device, dtype)


@pytest.mark.parametrize("backend", [*TAICHI_BACKENDS, "auto"])
def test_training_steps_match_float64_reference(backend):
    """Three SGD steps on the GPU in float32 against the same steps on the CPU in float64 with the
    PyTorch reference backend."""
    nets = [_tiny_net(backend, torch.float32, CUDA), _tiny_net("torch", torch.float64, "cpu")]
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 4, 20, 20, generator=g), torch.randint(3, (8,), generator=g)) for _ in range(3)]
    for net in nets:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        dtype, device = next(net.parameters()).dtype, next(net.parameters()).device
        for x, t in batches:
            opt.zero_grad()
            F.cross_entropy(net(x.to(device, dtype)), t.to(device)).backward()
            opt.step()
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        # float32 steps amplified by BatchNorm: a few ulps of float32 per step
        torch.testing.assert_close(p.detach().cpu().double(), q.detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_train_command_float16_amp(tmp_path):
    """``shiftwise train`` on the GPU: float16 autocast with loss scaling, Taichi kernels, the
    masked tiles zero in the checkpoint."""
    args = ["train", "--model", "slak_demo", "--model-kwargs", '{"dims": [4, 8, 8, 8]}', "--image-size", "16",
            "--batch-size", "16", "--backend", "taichi", "--update-every", "2", "--quiet", "--eval-every", "100",
            "--steps", "4", "--amp", "--device", "cuda", "-o", str(tmp_path)]
    assert cli.main(args) == 0
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["scaler"] is not None
    assert ckpt["sparse"]["masks"]
    for name, mask in ckpt["sparse"]["masks"].items():
        weight = ckpt["model"][name + ".weight"].cpu()
        assert bool((weight[~mask.cpu()] == 0).all()) and bool(weight[mask.cpu()].ne(0).any())


def _random_entries(g, n, num_outputs, num_planes, reach):
    cols = [torch.randint(num_outputs, (n,), generator=g), torch.randint(num_planes, (n,), generator=g),
            torch.randint(-reach, reach + 1, (n,), generator=g), torch.randint(-reach, reach + 1, (n,), generator=g)]
    return [torch.cat([c, c[:8]]) for c in cols]  # exact repeats: each one counts again


@pytest.mark.parametrize("backend", ["taichi", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plane_shift_add_matches_cpu(backend, dtype):
    """The general shift-add on the GPU (Taichi kernels or their PyTorch twin) against the twin on
    the CPU, forward and gradient."""
    g = torch.Generator().manual_seed(5)
    plan = ShiftAddPlan.from_entries(*_random_entries(g, 60, 6, 10, 8), 6, 10)
    u = torch.randn(2, 10, 19, 23, dtype=dtype, generator=g)
    gy = torch.randn(2, 6, 17, 25, dtype=dtype, generator=g)
    results = []
    for device, run in ((CUDA, backend), ("cpu", "torch")):
        leaf = u.to(device).requires_grad_(True)
        y = plane_shift_add(leaf, plan.to(device), (17, 25), backend=run)
        results.append([t.cpu() for t in (y, *torch.autograd.grad(y, leaf, gy.to(device)))])
    for got, want in zip(*results):
        assert_close(got, want)
    if backend == "taichi":  # one thread per element, a fixed order: bitwise repeatable
        leaf = u.to(CUDA)
        assert torch.equal(plane_shift_add(leaf, plan, (17, 25), backend="taichi"),
                           plane_shift_add(leaf, plan, (17, 25), backend="taichi"))


@pytest.mark.parametrize("backend", TAICHI_BACKENDS)
def test_no_host_sync_after_the_first_call(backend):
    """A training step of a module whose plan is on the GPU waits for the GPU nowhere (the first
    call may: it caches what it reads off the plan)."""
    conv = ShiftWiseConv2d(8, (31, 5), small_kernel=5, backend=backend).to(CUDA)
    x = torch.randn(2, 8, 16, 16, device=CUDA, requires_grad=True)
    conv(x).sum().backward()
    torch.cuda.synchronize()
    # the debug mode sees PyTorch's syncs; a wait inside a Taichi launch shows as the GPU having
    # finished a sleep queued before the step by the time the step returns
    torch.cuda._sleep(1_000_000_000)
    torch.cuda.set_sync_debug_mode("error")
    try:
        conv(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy, "the host waited for the GPU during the step"
    assert x.grad is not None and torch.isfinite(x.grad).all()

