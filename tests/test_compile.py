"""Custom ops: opcheck, torch.compile without graph breaks, meta-device construction."""
import warnings

import pytest
import torch
from torch import nn

from conftest import make_demo_model
from shiftwise.convert.swap import convert_model
from shiftwise import ShiftWiseConv2d, ops, split_kernel
from shiftwise.models import create_model


@pytest.fixture(scope="module")
def plan_args():
    tiles, plan = split_kernel(torch.randn(2, 7, 5, dtype=torch.float64), 3)
    return tiles, plan


def test_opcheck_fused_ops(plan_args):
    tiles, plan = plan_args
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    w = tiles.clone().requires_grad_(True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    index = (plan.offsets, plan.dy, plan.dx, plan.tile_channel())
    torch.library.opcheck(ops.fused_conv, (x, w, b, *index, 1))
    torch.library.opcheck(ops.fused_conv, (x, w, None, *index, 1))
    gy = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.fused_conv_weight_grad, (x, gy, *index, 1, 3))


def test_opcheck_shift_add_ops():
    u = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 2, 3], dtype=torch.int32)
    tile_channel = torch.tensor([0, 0, 1], dtype=torch.int32)
    sy = torch.tensor([0, 2, -1], dtype=torch.int32)
    sx = torch.tensor([1, 0, 3], dtype=torch.int32)
    torch.library.opcheck(ops.shift_add, (u, offsets, tile_channel, sy, sx, 5, 4))
    gy = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.shift_add_transpose, (gy, offsets, tile_channel, sy, sx, 7, 6))


@pytest.mark.parametrize("backend", ["taichi_fused", "taichi_decomposed"])
def test_compile_converted_slak_in_one_graph(backend):
    torch._dynamo.reset()
    model = convert_model(make_demo_model())
    for m in model.modules():
        if isinstance(m, ShiftWiseConv2d):
            m.backend = backend
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    expected = model(x)
    g_expected, = torch.autograd.grad(expected.sum(), x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    y = compiled(x)
    g, = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_expected, rtol=1e-5, atol=1e-5)


def test_compile_auto_inference_in_one_graph():
    # backend "auto" under no_grad: the dense conv for these small maps, chosen at trace time
    torch._dynamo.reset()
    model = convert_model(make_demo_model())
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. dynamo tracing through a cache wrapper
        y = compiled(x)
        expected = model(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_auto_inference_with_dynamic_sizes():
    # sizes that change between calls become symbolic: auto must not need them as Python ints
    torch._dynamo.reset()
    m = ShiftWiseConv2d(4, 13, 5).eval()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for side in (16, 20, 24):
            x = torch.randn(2, 4, side, side + 1)
            torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)
        h = torch.export.Dim("h", min=8, max=64)
        program = torch.export.export(m, (torch.randn(2, 4, 16, 16),), dynamic_shapes=({2: h},))
        x = torch.randn(2, 4, 20, 16)
        torch.testing.assert_close(program.module()(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiles_a_shiftwise_layer():
    torch._dynamo.reset()
    layer = ShiftWiseConv2d.from_dense(nn.Conv2d(8, 8, (13, 5), padding=(6, 2), groups=8))
    block = nn.Sequential(nn.Conv2d(8, 8, 1), layer, nn.GELU())
    x = torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(torch.compile(block)(x), block(x), rtol=1e-5, atol=1e-5)


def test_meta_device_construction():
    layer = ShiftWiseConv2d(64, (51, 5), device="meta")
    assert layer.weight.is_meta and layer.tile_offsets.is_meta
    assert layer.plan.info.uniform == 11
    y = layer(torch.empty(2, 64, 56, 56, device="meta"))
    assert y.shape == (2, 64, 56, 56) and y.is_meta
    with torch.device("meta"):
        model = create_model("slak_tiny")
        built_under_context = ShiftWiseConv2d(16, 13)
    assert built_under_context.weight.is_meta and built_under_context.tile_dy.is_meta
    assert sum(p.numel() for p in model.parameters()) > 20_000_000
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")  # materialise, as one would before loading a checkpoint
