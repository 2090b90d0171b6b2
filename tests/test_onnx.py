"""The ONNX forms of a shift-wise conv (shiftwise.onnx_form) and plain torch.onnx.export on models
holding shift-wise layers, checked in onnxruntime against PyTorch."""
import io
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shiftwise import ShiftWiseConv2d, onnx_form, reference
from shiftwise.cli import main
from shiftwise.convert.swap import convert_model
from shiftwise.errors import ShiftwiseError
from shiftwise.export import EXTRA_HINT, export_onnx
from shiftwise.models import create_model, randomize_
from shiftwise.tiling import ShiftAddPlan, TilePlan, merge_tiles, split_kernel

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _plan(kind):
    """``(tiles, plan)`` float64 of a few plan shapes: dense grids, random subsets, channels
    without tiles, coincident tiles, no tiles at all."""
    g = torch.Generator().manual_seed(len(kind))
    if kind == "grid":
        return split_kernel(torch.randn(6, 13, 5, generator=g, dtype=torch.float64), 5)
    if kind == "square3":
        return split_kernel(torch.randn(5, 9, 9, generator=g, dtype=torch.float64), 3)
    if kind in ("sparse", "empty_channels"):
        tiles, plan = split_kernel(torch.randn(7, 15, 15, generator=g, dtype=torch.float64), 3)
        keep = torch.rand(plan.num_tiles, generator=g) < 0.3
        if kind == "empty_channels":
            keep &= (plan.tile_channel() % 3 != 1)  # channels 1 and 4 lose every tile
        return tiles[keep], plan.select(keep)
    if kind == "coincident":  # two tiles at one place in a channel, one channel with none
        plan = TilePlan.from_lists([[(0, 0), (4, -2), (0, 0)], [], [(-6, 3)]], 3)
        return torch.randn(plan.num_tiles, 3, 3, generator=g, dtype=torch.float64), plan
    plan = TilePlan.from_lists([[], [], []], 5)
    return torch.zeros(0, 5, 5, dtype=torch.float64), plan


KINDS = ("grid", "square3", "sparse", "empty_channels", "coincident", "none")


def _traced_shiftwise(x, weight, plan, bias=None):
    """What the dynamo exporter writes when the plan's values are hidden (a plan without tiles
    never gets there)."""
    if plan.num_tiles == 0:
        return onnx_form.shiftwise_graph(x, weight, plan, bias)
    return onnx_form._traced_shiftwise(x, weight, plan, bias)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("graph", [onnx_form.dense_graph, onnx_form.shiftwise_graph, _traced_shiftwise])
def test_forms_equal_the_dense_conv(kind, graph):
    tiles, plan = _plan(kind)
    c = plan.channels
    x = torch.randn(2, c, 11, 8, dtype=torch.float64)
    bias = torch.randn(c, dtype=torch.float64)
    expected = F.conv2d(x, merge_tiles(tiles, plan)[:, None], bias, padding=plan.info.padding, groups=c)
    torch.testing.assert_close(graph(x, tiles, plan, bias), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(graph(x, tiles, plan), expected - bias.view(1, c, 1, 1), rtol=1e-12, atol=1e-12)


def test_plane_graph_equals_the_reference():
    g = torch.Generator().manual_seed(0)
    e = 40
    out, plane = torch.randint(0, 6, (e,), generator=g), torch.randint(0, 5, (e,), generator=g)
    dy, dx = torch.randint(-4, 5, (e,), generator=g), torch.randint(-3, 4, (e,), generator=g)
    plan = ShiftAddPlan.from_entries(out, plane, dy, dx, num_outputs=7, num_planes=5)  # output 6 gets nothing
    planes = torch.randn(2, 5, 13, 12, dtype=torch.float64)
    torch.testing.assert_close(onnx_form.plane_graph(planes, plan, (9, 10)),
                               reference.plane_shift_add(planes, plan, (9, 10)), rtol=1e-12, atol=1e-12)


def test_choose_is_a_function_of_the_plan_and_the_map():
    dense_plan = TilePlan.grid(8, (13, 13), 3)
    assert onnx_form.choose(dense_plan, 32, 32)[0] == "dense"
    small = TilePlan.from_lists([[(0, 0)]] * 8, 5)  # one centred tile per channel: a 5 x 5 kernel
    wide = TilePlan.from_lists([[(24, 0)]] + [[] for _ in range(7)], 5)  # one tile, 49 rows from centre
    assert onnx_form.choose(wide, 128, 128)[0] == "shiftwise"
    form, reason = onnx_form.choose(small, 128, 128)
    assert form == "dense" and "dense taps" in reason  # nothing to save
    with pytest.raises(ValueError, match="form"):
        with onnx_form.forced("sparse"):
            pass


def _layer(density=0.5, channels=8, kernel=(21, 5), seed=0):
    """A sparse strip layer with a channel without tiles, then a dense square one."""
    g = torch.Generator().manual_seed(seed)
    tiles, plan = split_kernel(torch.randn(channels, *kernel, generator=g), 5)
    keep = torch.rand(plan.num_tiles, generator=g) < density
    keep &= plan.tile_channel() != 2
    return nn.Sequential(ShiftWiseConv2d.from_tiles(tiles[keep], plan.select(keep), torch.randn(channels)),
                         nn.ReLU(), ShiftWiseConv2d(channels, (7, 7), 3)).eval()


def _run(data, x):
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _convs(data):
    return [list(a.ints) for n in onnx.load_from_string(data).graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "kernel_shape"]


@pytest.mark.parametrize("dynamo", [False, True])
def test_plain_torch_onnx_export(dynamo):
    model = _layer() if not dynamo else _layer()[:1]  # the dynamo exporter is slow: one layer
    x = torch.randn(2, 8, 24, 20)
    f = io.BytesIO()
    with onnx_form.forced("shiftwise"):
        if dynamo:
            pytest.importorskip("onnxscript")
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: "batch"},))
            data = program.model_proto.SerializeToString()
        else:
            torch.onnx.export(model, (x,), f, dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})
            data = f.getvalue()
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load_from_string(data).graph.node)  # no custom op
    assert max(max(k) for k in _convs(data)) <= 5
    x3 = torch.randn(3, 8, 24, 20)  # another batch size
    with torch.no_grad():
        torch.testing.assert_close(_run(data, x3), model(x3), rtol=1e-4, atol=1e-4)


def test_plain_dynamo_export_is_the_same_graph_in_a_fresh_process_state():
    # the layout comes from the plan's info (read when the plan was made), not from an earlier
    # eager run: a first plain dynamo export writes what the TorchScript exporter writes
    pytest.importorskip("onnxscript")
    model, x = _layer()[:1], torch.randn(1, 8, 24, 20)
    graphs = []
    for dynamo in (True, False):
        onnx_form._LAYOUTS.clear()
        with onnx_form.forced("shiftwise"):
            if dynamo:
                data = torch.onnx.export(model, (x,), dynamo=True).model_proto.SerializeToString()
            else:
                f = io.BytesIO()
                torch.onnx.export(model, (x,), f, dynamo=False)
                data = f.getvalue()
        graphs.append(data)
    assert sorted(map(str, _convs(graphs[0]))) == sorted(map(str, _convs(graphs[1])))
    assert not {"TopK", "ScatterND"} & {n.op_type for n in onnx.load_from_string(graphs[0]).graph.node}


@pytest.mark.parametrize("form, dynamo", [("dense", False), ("shiftwise", False), ("shiftwise", True)])
def test_export_onnx_forms_with_dynamic_sizes(form, dynamo, tmp_path):
    if dynamo:
        pytest.importorskip("onnxscript")
    model = _layer() if not dynamo else _layer()[:1]
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, (1, 8, 24, 20), form=form, dynamic_hw=True, dynamo=dynamo)
    assert result["onnxruntime_max_abs_diff"] < 1e-4
    assert [(r["form"], r["map"]) for r in result["layers"]] == [(form, [24, 20])] * len(model[::2])
    kernels = _convs(path.read_bytes())
    assert (max(max(k) for k in kernels) <= 5) == (form == "shiftwise")
    for shape in ((2, 8, 24, 20), (3, 8, 17, 33)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(_run(path.read_bytes(), x), model(x), rtol=1e-4, atol=1e-4)


def test_export_onnx_auto_follows_the_rule(tmp_path):
    model = _layer()
    result = export_onnx(model, tmp_path / "m.onnx", (1, 8, 24, 20))
    plans = [m.plan for m in model.modules() if isinstance(m, ShiftWiseConv2d)]
    assert [(r["form"], r["reason"]) for r in result["layers"]] == [onnx_form.choose(p, 24, 20) for p in plans]


FAMILIES = {  # tiny models of every family and the input side they run at
    "slak": (lambda: randomize_(create_model("slak_demo"), seed=1).eval(), 32),
    "replknet": (lambda: randomize_(create_model("replknet", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64),
                                                 large_kernel_sizes=(13, 11, 9, 7), num_classes=10),
                                    seed=2, calibrate=32).eval(), 32),
    "unireplknet": (lambda: randomize_(create_model("unireplknet", depths=(1, 1, 2, 1), dims=(8, 16, 32, 64),
                                                    kernel_sizes=((3,), (13,), (13, 3), (7,)), num_classes=10),
                                       seed=3, calibrate=32).eval(), 32),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_models_of_every_family(family, tmp_path):
    build, size = FAMILIES[family]
    model = build()
    sw = convert_model(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    for form in ("dense", "shiftwise"):
        result = export_onnx(sw, tmp_path / f"{form}.onnx", (1, 3, size, size), form=form)
        assert result["onnxruntime_max_abs_diff"] is not None and {r["form"] for r in result["layers"]} == {form}
        got = _run((tmp_path / f"{form}.onnx").read_bytes(), x)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("path, dynamo", [("weights", False), ("planes", False), ("planes", True)])
def test_sw_network_exports_as_it_is(path, dynamo):
    net = randomize_(create_model("sw", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=(9, 7, 5, 3),
                                  num_classes=10), seed=0, calibrate=32).eval()
    for m in net.modules():
        if hasattr(m, "path_weights"):
            m.path = path
    x = torch.randn(2, 3, 32, 32)
    if dynamo:
        pytest.importorskip("onnxscript")
        data = torch.onnx.export(net, (x,), dynamo=True).model_proto.SerializeToString()
    else:
        f = io.BytesIO()
        torch.onnx.export(net, (x,), f, dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
        data = f.getvalue()
    with torch.no_grad():
        expected = net(x)
    got = _run(data, x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_torch_export_program_runs():
    model = _layer()[:1]
    x = torch.randn(1, 8, 24, 20)
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_package_names_the_extra(missing, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    with pytest.raises(ShiftwiseError, match=missing) as info:
        export_onnx(_layer(), tmp_path / "m.onnx", (1, 8, 24, 20))
    assert EXTRA_HINT in str(info.value) and "\n" not in str(info.value)
    assert main(["export", "demo", "-o", str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and EXTRA_HINT in err[0]
    assert not list(tmp_path.iterdir())


def _mixed_plan(n, seed):
    """A SLaK-like plan of ``n x n`` tiles: a column and a row of tiles through the centre, the
    centre tile twice, tiles off both axes further than a tile's half-width, one channel without
    tiles, some tiles dropped."""
    g = torch.Generator().manual_seed(seed)
    reach = 3 * n
    lists = []
    for ch in range(11):
        places = [(d, 0) for d in range(-reach, reach + 1, n)] + [(0, d) for d in range(-reach, reach + 1, n)]
        places += [(0, 0), (n + 1, -n - 1), (-2, n + 2)]
        keep = torch.rand(len(places), generator=g) < 0.6
        lists.append([] if ch == 4 else [p for p, k in zip(places, keep.tolist()) if k])
    plan = TilePlan.from_lists(lists, n)
    return torch.randn(plan.num_tiles, n, n, generator=g), plan


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_shiftwise_form_in_onnxruntime_with_dynamic_sizes(n):
    tiles, plan = _mixed_plan(n, n)
    bias = torch.randn(plan.channels)
    model = ShiftWiseConv2d.from_tiles(tiles, plan, bias).eval()
    f = io.BytesIO()
    with onnx_form.forced("shiftwise"):
        torch.onnx.export(model, (torch.randn(1, plan.channels, 12, 10),), f, dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "b", 2: "h", 3: "w"}})
    data = f.getvalue()
    assert max(max(k) for k in _convs(data)) <= n
    kernel = merge_tiles(tiles.double(), plan)[:, None]
    for shape in [(2, plan.channels, 12, 10), (1, plan.channels, 3, 2), (3, plan.channels, 1, 17)]:
        x = torch.randn(shape)  # maps smaller than the kernel too
        expected = F.conv2d(x.double(), kernel, bias.double(), padding=plan.info.padding, groups=plan.channels)
        torch.testing.assert_close(_run(data, x).double(), expected, rtol=1e-5, atol=1e-5)


def test_tiles_grouped_by_a_shared_offset():
    tiles, plan = split_kernel(torch.zeros(3, 51, 51), 5)  # SLaK's 51 x 5 + 5 x 51 + 5 x 5 on a 51 x 51 grid
    keep = (plan.dx == 0) | (plan.dy == 0)
    lay = onnx_form._Layout(plan.select(keep))
    assert [(g.mode, g.shift) for g in lay.groups] == [("rows", 0), ("columns", 0)]
    square = onnx_form._Layout(TilePlan.grid(2, (15, 15), 5))  # three columns of tiles
    assert sorted((g.mode, g.shift) for g in square.groups) == [("rows", -5), ("rows", 0), ("rows", 5)]


def test_shiftwise_form_keeps_channels_apart():
    tiles, plan = _plan("empty_channels")  # zero tiles and dummy channels fill its convs
    c = plan.channels
    x = torch.randn(1, c, 9, 9, dtype=torch.float64)
    x[:, 0] = float("nan")
    expected = F.conv2d(x, merge_tiles(tiles, plan)[:, None], padding=plan.info.padding, groups=c)
    got = onnx_form.shiftwise_graph(x, tiles, plan)
    assert got[:, 0].isnan().any() and not got[:, 1:].isnan().any()
    torch.testing.assert_close(got[:, 1:], expected[:, 1:], rtol=1e-12, atol=1e-12)
