"""Backend choice: names, the environment variable, the auto rule and the dense conv it runs; auto
on CUDA (the committed rule, its script, the fallback where Taichi cannot run)."""
import importlib.util
import json
import types
from pathlib import Path

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


# --- auto on CUDA ----------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _cuda_input(index, shape=(1, 2, 7, 7)):
    """What conv_path reads of an input on ``cuda:index`` (no GPU here)."""
    return types.SimpleNamespace(device=torch.device("cuda", index), shape=shape, dtype=torch.float32,
                                 requires_grad=False)


def test_auto_on_a_gpu_taichi_cannot_address_runs_the_dense_conv_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(_runtime, "_arch_device", None)
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv("TI_ARCH", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    tiles, plan = split_kernel(torch.randn(2, 13, 13), 5)
    x = _cuda_input(1)
    with caplog.at_level("DEBUG", logger="shiftwise.dispatch"):
        assert dispatch.conv_path("auto", x, tiles, plan) == "dense"
        assert dispatch.conv_path(None, x, tiles, plan) == "dense"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "falling back to PyTorch" in warnings[0]
    assert "cuda:1" in warnings[0] and "CUDA_VISIBLE_DEVICES=1" in warnings[0]
    for backend in ("taichi", "taichi_fused", "taichi_decomposed"):
        with pytest.raises(_runtime.WrongCudaDevice, match="run one process per GPU with CUDA_VISIBLE_DEVICES=1"):
            dispatch.conv_path(backend, x, tiles, plan)
    # Taichi started on the CPU, then CUDA tensors: auto runs the dense conv there too, explicit backends raise
    monkeypatch.setattr(_runtime, "_arch_device", "cpu")
    assert dispatch.conv_path("auto", _cuda_input(0), tiles, plan) == "dense"
    with pytest.raises(_runtime.TaichiUnavailable, match="initialised for cpu in this process and cannot also run on "
                                                         "cuda"):
        dispatch.conv_path("taichi", _cuda_input(0), tiles, plan)


def test_the_committed_cuda_rule_is_valid_and_fused_until_measured():
    rule = dispatch.cuda_auto_rule()  # checked on reading
    if rule["measured"] is not None:
        pytest.skip("the committed rule holds a GPU measurement")
    assert rule["default"] == "fused" and not rule["forward"] and not rule["training"]
    plan = split_kernel(torch.randn(2, 51, 5), 5)[1]
    for needs_grad in (False, True):
        path, fmt, *args = dispatch.cuda_rule_choice(plan, 128, 128, needs_grad)
        assert path == "taichi_fused" and "not measured" in fmt % tuple(args)
        assert choose_auto_path(torch.device("cuda"), plan, (4, 2, 128, 128), needs_grad=needs_grad) == "taichi_fused"
    assert choose_auto_path(torch.device("cuda", 0), plan, (4, 2, 9, 9), dtype=torch.float64) == "taichi_fused"


def _rule(**points):
    rule = {"format": 1, "measured": {"device_name": "test"}, "default": "fused", "margin": 1.1,
            "max_distance": 1.0, "forward": [], "training": []}
    for pass_, pts in points.items():
        rule[pass_] = [{"case": f"c{i}", "side": side, "taps": taps, "path": path}
                       for i, (side, taps, path) in enumerate(pts)]
    dispatch.check_cuda_rule(rule)
    return rule


def test_cuda_rule_takes_the_nearest_measured_case_of_the_pass():
    rule = _rule(forward=[(128, 275, "fused"), (128, 68.75, "decomposed"), (7, 125, "decomposed")],
                 training=[(128, 68.75, "fused")])
    tiles, plan = split_kernel(torch.randn(4, 51, 5), 5)  # 11 tiles per channel: taps 275
    keep = torch.zeros(plan.num_tiles, dtype=torch.bool)
    keep[::4] = True
    quarter = plan.select(keep)  # 11 tiles over 4 channels: taps 68.75
    assert dispatch.rule_features(plan, 128, 128) == (128.0, 275.0)
    assert dispatch.rule_features(quarter, 128, 128) == (128.0, 68.75)

    def path(p, side, grad=False):
        return dispatch.cuda_rule_choice(p, side, side, grad, rule)[0]

    assert path(plan, 128) == "taichi_fused" and path(quarter, 128) == "taichi_decomposed"
    assert path(quarter, 96) == "taichi_decomposed"  # log2(128 / 96) = 0.42 away
    assert path(quarter, 56) == "taichi_fused"  # 1.19 away from every case: the default
    assert path(quarter, 128, grad=True) == "taichi_fused"  # the training case says fused
    small = split_kernel(torch.randn(4, 13, 5), 5)[1]  # 5 tiles per channel, taps 125, on 7 x 7
    assert path(small, 7) == "taichi_decomposed"
    assert path(small, 7, grad=True) == "taichi_fused"  # nearest training case is 4.2 away
    # reasons name the case and the distance
    fmt, *args = dispatch.cuda_rule_choice(quarter, 128, 128, False, rule)[1:]
    assert fmt % tuple(args) == "auto on CUDA (forward rule): as the nearest measured case c1 (0.00 away), the " \
                                "decomposed path"


@pytest.mark.parametrize("change, message", [
    ({"format": 2}, "format 2"),
    ({"default": "dense"}, "default 'dense'"),
    ({"max_distance": -1}, "max_distance -1"),
    ({"forward": [{"side": 0, "taps": 3, "path": "fused"}]}, "forward case"),
    ({"training": [{"side": 7, "taps": 3, "path": "planes"}]}, "training case"),
    ({"training": None}, "training is not a list"),
])
def test_damaged_cuda_rules_are_refused(change, message, tmp_path):
    rule = {**_rule(), **change}
    with pytest.raises(ValueError, match=message):
        dispatch.check_cuda_rule(rule)
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(rule))
    with pytest.raises(ValueError, match=f"{path} is not a CUDA auto rule"):
        dispatch.cuda_auto_rule(str(path))


def _bench_result(impl, fwd, fwd_bwd):
    def timing(ms):
        return {"median_ms": ms, "iqr_ms": 0.1, "runs": 10}
    out = {"impl": impl, "max_rel_err": 1e-7}
    if fwd == "error":
        return {**out, "error": "RuntimeError: boom"}
    out["fwd"] = timing(fwd)
    if fwd_bwd == "oom":  # as the bench records a training step out of memory
        return {**out, "oom": True, "fwd_bwd": {"median_ms": "inf"}, "peak_step_bytes": "inf"}
    return {**out, "fwd_bwd": timing(fwd_bwd)}


def _bench_file(path, device="h200", name="NVIDIA H200", cases=None):
    paper = {"case": {"name": "paper", "channels": 124, "height": 128, "width": 128, "branches": [[51, 5]],
                      "tile_size": 5, "densities": [1.0, 0.25]},
             "batch": 64, "tiles": 1364, "tiles_per_channel": 11.0,
             "results": [_bench_result("torch_depthwise", 11.85, 40.0),
                         _bench_result("sw_fused@1", 10.0, 30.0), _bench_result("sw_decomposed@1", 12.0, "oom"),
                         _bench_result("sw_fused@0.25", 5.0, 12.0), _bench_result("sw_decomposed@0.25", 3.0, 11.5)]}
    s4 = {"case": {"name": "slak_t.s4", "channels": 998, "height": 7, "width": 7,
                   "branches": [[13, 5], [5, 13], [5, 5]], "tile_size": 5, "densities": [1.0]},
          "batch": 64, "tiles": 4990, "tiles_per_channel": 5.0,
          "results": [_bench_result("sw_fused@1", 1.0, 3.0), _bench_result("sw_decomposed@1", "error", None)]}
    report = {"preset": "paper", "device": device, "device_name": name, "dtype": "float32",
              "versions": {"shiftwise": "0.1.0", "torch": "2.11.0+cu130", "taichi": "1.7.4", "git": "abc"},
              "cases": cases if cases is not None else [paper, s4], "complete": True}
    path.write_text(json.dumps(report))
    return str(path)


def _load_script():
    spec = importlib.util.spec_from_file_location("cuda_auto_rule", ROOT / "benchmarks" / "cuda_auto_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RULE_SCRIPT = _load_script()


def _rule_script(capsys, *args):
    """``(exit code, stderr)`` of ``python benchmarks/cuda_auto_rule.py ARGS``."""
    code = RULE_SCRIPT.main(list(args))
    return code, capsys.readouterr().err


def test_cuda_rule_script_turns_bench_results_into_the_rule(tmp_path, capsys):
    bench = _bench_file(tmp_path / "bench-paper-h200.json")
    out = tmp_path / "rule.json"
    code, err = _rule_script(capsys, bench, "-o", str(out))
    assert code == 0, err
    rule = dispatch.cuda_auto_rule(str(out))
    measured = rule["measured"]
    assert measured["device_name"] == "NVIDIA H200" and measured["files"] == ["bench-paper-h200.json"]
    assert measured["versions"]["torch"] == "2.11.0+cu130" and measured["batches"] == [64]
    fwd = {p["case"]: p for p in rule["forward"]}
    train = {p["case"]: p for p in rule["training"]}
    # decomposed only where faster by the margin (1.1): 3.0 against 5.0 forward at a quarter of the tiles
    assert fwd["paper@1"]["path"] == "fused" and fwd["paper@0.25"]["path"] == "decomposed"
    assert train["paper@0.25"]["path"] == "fused"  # 11.5 against 12.0: within the margin
    assert train["paper@1"]["path"] == "fused" and train["paper@1"]["decomposed_ms"] is None  # out of memory
    assert fwd["paper@1"]["decomposed_ms"] == 12.0  # its forward ran
    assert "slak_t.s4@1" not in fwd and "skipped" in err and "slak_t.s4@1" in err  # an error
    assert fwd["paper@0.25"]["side"] == 128 and fwd["paper@0.25"]["taps"] == pytest.approx(341 / 124 * 25)
    assert fwd["paper@1"]["taps"] == pytest.approx(11 * 25)
    # the rule acts as measured on plans with those features
    tiles, plan = split_kernel(torch.randn(4, 51, 5), 5)
    keep = torch.zeros(plan.num_tiles, dtype=torch.bool)
    keep[::4] = True
    assert dispatch.cuda_rule_choice(plan.select(keep), 128, 128, False, rule)[0] == "taichi_decomposed"
    assert dispatch.cuda_rule_choice(plan, 128, 128, False, rule)[0] == "taichi_fused"
    # an existing rule is kept without --force
    code, err = _rule_script(capsys, bench, "-o", str(out))
    assert code == 2 and "exists; pass --force" in err
    assert _rule_script(capsys, bench, "-o", str(out), "--force")[0] == 0


def test_cuda_rule_script_refuses_what_it_cannot_use(tmp_path, capsys):
    cpu = _bench_file(tmp_path / "cpu.json", device="cpu2", name="AMD EPYC (2 cores)")
    other = _bench_file(tmp_path / "a100.json", device="a100", name="NVIDIA A100")
    h200 = _bench_file(tmp_path / "h200.json")
    empty = _bench_file(tmp_path / "empty.json", cases=[])
    for args, message in [((cpu,), "holds results of cpu2; the rule is for CUDA"),
                          ((h200, other), "results of several GPUs"),
                          ((empty,), "no case with clean times of both sw_fused and sw_decomposed"),
                          ((h200, "--margin", "0.5"), "--margin must be at least 1")]:
        code, err = _rule_script(capsys, *args, "-o", str(tmp_path / "rule.json"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "rule.json").exists()


def test_auto_on_cuda_compiles_into_one_graph(monkeypatch):
    # the rule (a file, a nearest-case search) is a constant of the graph: no break, no file read
    plan = split_kernel(torch.randn(2, 51, 5), 5)[1]
    rule = _rule(forward=[(8.0, 275.0, "decomposed")])
    monkeypatch.setattr(dispatch, "cuda_auto_rule", lambda path=None: rule)
    torch._dynamo.reset()

    def step(x):
        path = dispatch._auto_choice(torch.device("cuda"), plan, x.shape, torch.float32, False, None)[0]
        return x + (1.0 if path == "taichi_decomposed" else 2.0)

    got = torch.compile(step, fullgraph=True, backend="eager")(torch.zeros(1, 2, 8, 8))
    assert torch.equal(got, torch.ones(1, 2, 8, 8))
    assert choose_auto_path(torch.device("cuda"), plan, (1, 2, 8, 8)) == "taichi_decomposed"
