"""``shiftwise bench``: the harness's checks and bookkeeping on tiny cases (no timing asserted),
the FFT baseline against ``F.conv2d``, and the command's outputs."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shiftwise import cli
from shiftwise.bench import FLOOR_REPEATS_MIN, IMPLS, Case, compact, fft_depthwise_conv2d, make_layer
from shiftwise.bench import ort, runner, timing
from shiftwise.export import EXTRA_HINT
from shiftwise.reference import shiftwise_conv2d as _ref_conv  # bound here: one test breaks the module's

ROOT = Path(__file__).resolve().parents[1]
TINY = ["bench", "--preset", "custom", "--shape", "2,8,8", "--kernels", "7x5", "--batch-size", "1", "--repeats", "1",
        "--warmup", "0", "--densities", "1", "--impls", "torch_depthwise,torch_fft", "--no-backward", "--no-memory",
        "--quiet"]


def test_bench_tiny_custom_case_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--preset", "custom", "--shape", "4,12,14", "--kernels", "9x5,5x9,5x5",
                   "--batch-size", "2", "--repeats", "2", "--warmup", "0", "--densities", "1,0.5", "-o", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("shiftwise bench --preset custom")  # the table, nothing before it
    assert "custom.c4.12x14" in captured.out and "*" in captured.out
    assert f"wrote results {out}" in captured.err and "wrote" not in captured.out
    report = json.loads(out.read_text())  # strict JSON: no NaN/Infinity literals
    assert report["versions"]["torch"] and report["copy_bandwidth_gbs"] > 0
    (case,) = report["cases"]
    got = {r["impl"] for r in case["results"]}
    expected = {n for n in IMPLS if not n.startswith(("sw_", "onnx_"))}
    expected |= {f"sw_{kind}@{d}" for kind in ("decomposed", "fused", "auto", "shift_add") for d in ("1", "0.5")}
    expected |= {f"onnx_{form}@{d}" for form in ("dense", "shiftwise") for d in ("1", "0.5")}
    assert got == expected
    for r in case["results"]:
        if r["impl"].startswith("onnx_") and ort.unavailable(torch.device("cpu")):
            assert r["skipped"] == ort.unavailable(torch.device("cpu")) and "fwd" not in r
            continue
        assert "error" not in r and r["max_rel_err"] <= 1e-4
        runs = r["fwd"]["runs"]  # stages timed against their floor run in rounds of 3
        assert (runs >= FLOOR_REPEATS_MIN if r["impl"].startswith("sw_shift_add") else runs == 2)
        if r["impl"].startswith("onnx_"):  # inference only
            assert "fwd_bwd" not in r and "peak_step_bytes" not in r and r["ort_threads"] == report["threads"]
        elif not r["impl"].startswith("sw_shift_add"):
            assert r["fwd_bwd"]["median_ms"] > 0 and r["peak_step_bytes"] > 0
            assert r["grad_max_rel_err"] <= 1e-4  # the training step was checked before it was timed
        else:
            lo, hi = r["floor_multiple_quartiles"]
            assert 0 < lo <= r["floor_multiple"] <= hi and r["bytes_moved"] > 0
    assert report["complete"] is True and report["versions"]["git"]
    assert case["fastest_dense"]["fwd"]["impl"] in {r["impl"] for r in case["results"]}


@pytest.mark.parametrize("shape,kernel", [
    ((2, 3, 9, 11), (5, 5)),     # odd, smaller than the map
    ((1, 2, 8, 8), (4, 6)),      # even: one row / column more than the input, as F.conv2d
    ((2, 2, 6, 5), (15, 11)),    # larger than the map
    ((1, 3, 7, 16), (51, 4)),    # long and thin, odd by even, larger than the map
    ((1, 1, 1, 1), (3, 2)),
])
def test_fft_depthwise_conv2d_matches_conv2d(shape, kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(shape[1], *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64)
    want = F.conv2d(x, w.unsqueeze(1), b, padding=(kernel[0] // 2, kernel[1] // 2), groups=shape[1])
    got = fft_depthwise_conv2d(x, w, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fft_depthwise_conv2d(x, w.unsqueeze(1)), want - b.view(1, -1, 1, 1),
                               rtol=1e-10, atol=1e-10)


def test_fft_depthwise_conv2d_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_depthwise_conv2d, (x, w, b))
    with pytest.raises(ValueError, match="weight"):
        fft_depthwise_conv2d(x, w[:1])


def test_json_switch_prints_only_json_on_stdout(tmp_path, capsys):
    assert cli.main([*TINY, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # nothing else on stdout: no progress, no table
    assert [r["impl"] for r in report["cases"][0]["results"]] == ["torch_depthwise", "torch_fft"]
    assert all("error" not in r for r in report["cases"][0]["results"])
    assert list(tmp_path.iterdir()) == []  # a switch: it writes no file


def test_output_is_claimed_before_any_work_and_kept_unless_forced(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    out.write_text("user data")

    def no_work(*a, **k):
        raise AssertionError("measured before refusing the output")
    monkeypatch.setattr("shiftwise.bench.run_bench", no_work)
    assert cli.main([*TINY, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "pass --force" in err and out.read_text() == "user data"
    monkeypatch.undo()
    assert cli.main([*TINY, "--output", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["cases"][0]["case"]["name"] == "custom.c2.8x8"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left


def test_compaction_keeps_the_requested_share_with_varying_counts():
    layer = make_layer(Case("t", 6, 8, 8, ((21, 5), (5, 21)), 5), "cpu", torch.float64)
    tiles, plan = compact(layer.tiles, layer.plan, 0.5)
    assert plan.num_tiles == round(0.5 * layer.plan.num_tiles) and tiles.shape[0] == plan.num_tiles
    assert plan.info.uniform is None  # per-channel counts differ


@pytest.mark.parametrize("argv,message", [
    (["--preset", "custom"], "--shape C,H,W"),
    (["--preset", "custom", "--shape", "4,8", "--kernels", "5x5"], "shape: want"),
    (["--preset", "custom", "--shape", "4,8,8", "--kernels", "4x5"], "odd"),
    (["--preset", "paper", "--impls", "nope"], "unknown implementations nope"),
    (["--preset", "slak_t", "--cases", "s9"], "match none"),
    (["--preset", "paper", "--densities", "0"], "densities"),
    (["--preset", "paper", "--densities", "half"], "--densities wants"),
    (["--preset", "paper", "--batch-size", "0"], "batch size"),
    (["--preset", "paper", "--device", "tpu0"], "unknown device 'tpu0'"),
    (["--preset", "paper", "--device", "cuda:0", "--clock", "cpu"], "clock"),
])
def test_bad_arguments_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # reach the clock check without a GPU
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("old", [["--batch", "2"], ["--json", "x.json"], ["--system-malloc"]])
def test_removed_spellings_are_refused(old, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *old])
    assert exc.value.code == 2


def test_paired_floor_rounds_settle_and_ratio_medians(monkeypatch):
    """The floor comparison's rounds, with the clock replaced (nothing is timed): each stage
    starts after a settle and SETTLE_CALLS untimed calls, and the multiple is the median of the
    per-round ratios."""
    events = []
    fn_times = iter([5.0] + [2.0] * 3 + [9.0] * 3 + [3.0] * 3)  # the first call, then rounds of 3

    def fn():
        events.append("fn")

    def time_once(stage, device, clock):
        stage()
        if stage is fn:
            events[-1] = "fn timed"
            return next(fn_times)
        return 1.0  # the copy: 1 ms (before scaling to the stage's bytes)

    monkeypatch.setattr(timing, "time_once", time_once)
    monkeypatch.setattr(timing, "settle", lambda device: events.append("settle"))
    got = timing.paired_floor(fn, moved=timing.FLOOR_BUFFER_MIN, device=torch.device("cpu"), repeats=9, warmup=0)
    one_round = ["settle"] + ["fn"] * timing.SETTLE_CALLS + ["fn timed"] * 3 + ["settle"]
    assert events == ["fn timed"] + one_round * 3
    assert got["fwd"]["runs"] == 9 and got["fwd"]["first_ms"] == 5.0
    assert got["floor_ms"] == 1.0 and got["floor_multiple"] == 3.0  # rounds 2, 9, 3: median 3 (mean 4.7)
    assert got["floor_multiple_quartiles"][0] <= 2.5 and got["floor_multiple_quartiles"][1] >= 6.0
    half = timing.paired_floor(lambda: None, moved=timing.FLOOR_BUFFER_MIN // 2, device=torch.device("cpu"),
                               repeats=1, warmup=0)
    assert half["floor_ms"] == 0.5  # the copy's time scaled to the stage's bytes


def test_settle_waits_on_cpu_only(monkeypatch):
    import time

    t0 = time.perf_counter()
    timing.settle(torch.device("cpu"))
    assert time.perf_counter() - t0 >= timing.SETTLE_S
    monkeypatch.setattr(timing, "SETTLE_S", 60.0)  # would hang the test if a GPU device waited
    timing.settle(torch.device("meta"))


# the harness's bookkeeping, with implementations replaced (nothing here is a timing claim) -------
class HalfGrad(torch.autograd.Function):
    """The identity whose backward halves the gradient: a right forward with a wrong gradient."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return 0.5 * g


def _fake_case(monkeypatch, impls):
    case = Case("fake", 3, 6, 6, ((5, 5),), 5, (1.0,))
    monkeypatch.setattr(runner, "build_impls", lambda case, layer, names: impls(make_layer(case, "cpu",
                                                                                           torch.float32)))
    return case


def _dense_fn(layer):
    tiles, bias = layer.tiles.detach(), layer.bias.detach()
    return lambda x: _ref_conv(x, tiles, layer.plan, bias)


def test_first_call_is_timed_as_compile_for_forward_and_training_step(monkeypatch):
    """The correctness check's call is the implementation's first: its time (a compile, here a
    sleep) must be what ``compile_ms`` reports, for the forward and for the training step."""
    import time as _time

    calls = {"fwd": 0}

    def impls(layer):
        dense = _dense_fn(layer)

        def fn(x):
            calls["fwd"] += 1
            if calls["fwd"] == 1 or (x.requires_grad and calls.setdefault("bwd", 0) == 0):
                if x.requires_grad:
                    calls["bwd"] = 1
                _time.sleep(0.3)
            return dense(x)
        return [runner.Impl("slow_first", fn, [])]

    case = _fake_case(monkeypatch, impls)
    rec = runner.run_case(case, 2, torch.device("cpu"), torch.float32, ["x"], repeats=3, warmup=0)
    (r,) = rec["results"]
    assert "error" not in r
    for key in ("fwd", "fwd_bwd"):
        assert r[key]["first_ms"] >= 300 and r[key]["compile_ms"] >= 250 > r[key]["median_ms"]


def test_failures_are_recorded_and_the_other_implementations_still_run(monkeypatch):
    def impls(layer):
        dense = _dense_fn(layer)

        def broken(x):
            raise ValueError("kernel exploded\nsecond line")
        return [runner.Impl("broken", broken, []), runner.Impl("bad_grad", lambda x: HalfGrad.apply(dense(x)), []),
                runner.Impl("good", dense, [])]

    case = _fake_case(monkeypatch, impls)
    rec = runner.run_case(case, 2, torch.device("cpu"), torch.float32, ["x"], repeats=2, warmup=0)
    by = {r["impl"]: r for r in rec["results"]}
    assert by["broken"]["error"] == "ValueError: kernel exploded"
    assert "input gradient differs" in by["bad_grad"]["error"] and by["bad_grad"]["max_rel_err"] <= 1e-4
    assert "fwd_bwd" not in by["bad_grad"]
    assert "error" not in by["good"] and by["good"]["fwd_bwd"]["median_ms"] > 0
    from shiftwise.bench import failures
    assert failures({"cases": [rec]}) == ["fake broken", "fake bad_grad"]


def test_out_of_memory_while_building_a_case_is_recorded(monkeypatch):
    from shiftwise.bench import format_table

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")
    monkeypatch.setattr(runner, "make_layer", oom)
    rec = runner.run_case(Case("big", 3, 6, 6, ((5, 5),), 5), 2, torch.device("cpu"), torch.float32,
                          ["torch_depthwise"], repeats=2, warmup=0)
    assert "out of memory" in rec["error"] and rec["results"] == []
    assert "out of memory" in format_table({"cases": [rec], "repeats": 2})


def test_json_is_written_after_every_case(monkeypatch, tmp_path, capsys):
    """An interrupted run keeps the cases it finished, marked incomplete, and says so."""
    done = []

    def run_case(case, *a, **k):
        if done:
            raise KeyboardInterrupt
        done.append(case.name)
        return {"case": {"name": case.name}, "batch": 1, "results": []}
    monkeypatch.setattr(runner, "run_case", run_case)
    monkeypatch.setattr(runner, "copy_bandwidth", lambda *a, **k: 1e9)
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--preset", "slak_t", "--quiet", "-o", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"wrote results of the finished layers {out}" in err
    report = json.loads(out.read_text())
    assert [c["case"]["name"] for c in report["cases"]] == done == ["slak_t.s1"] and report["complete"] is False


def test_winner_is_the_fastest_implementation_of_the_whole_layer():
    from shiftwise.bench import format_table

    def row(name, ms):
        return {"impl": name, "fwd": {"median_ms": ms, "iqr_ms": 0.0}}
    rec = {"case": {"name": "c", "branches": [[5, 5]], "channels": 1, "height": 4, "width": 4, "tile_size": 5},
           "batch": 1, "results": [row("torch_depthwise", 4.0), row("sw_fused@1", 3.0), row("sw_fused@0.25", 1.0)]}
    lines = format_table({"cases": [rec]}).splitlines()
    marked = [ln.split()[0] for ln in lines if "*" in ln]
    assert marked == ["sw_fused@1"]


def test_device_tags(monkeypatch):
    from shiftwise.bench import device_tag

    for name, tag in (("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("NVIDIA H100 80GB HBM3", "h100"),
                      ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "4090")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, name=name: name)
        assert device_tag(torch.device("cuda")) == tag


@pytest.mark.parametrize("preset", ["paper", "slak_t", "replknet_31b", "replk_stack"])
def test_from_json_shows_a_committed_run(preset, tmp_path, capsys):
    (saved,) = (ROOT / "benchmarks" / "results").glob(f"bench-{preset}-cpu*.json")
    assert cli.main(["bench", "--from-json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"shiftwise bench --preset {preset} on ") and "sw_fused@1" in out
    assert cli.main(["bench", "--from-json", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == preset
    assert cli.main(["bench", "--from-json", str(saved), "-o", str(tmp_path / "b.json")]) == 2
    assert "nothing new for --output" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert cli.main(["bench", "--from-json", str(bad)]) == 2
    assert "not a bench results file" in capsys.readouterr().err


def test_tile_and_bias_gradients_are_checked_and_a_failing_reference_is_named(monkeypatch):
    """An implementation that trains the tiles must get their gradients right, not only the
    input's; a reference that cannot be computed is reported as the reference's failure; an
    implementation with an error is never the fastest dense path."""
    from shiftwise import reference
    from shiftwise.bench.impls import _leaf

    def impls(layer):
        def make(scale_tiles):
            w, b = _leaf(layer.tiles), _leaf(layer.bias)

            def fn(x):
                return _ref_conv(x, HalfGrad.apply(w) if scale_tiles else w, layer.plan, b)
            return runner.Impl("torch_depthwise" if not scale_tiles else "bad_tiles", fn, [w, b], tile_params=True)
        return [make(True), make(False), runner.Impl("other", _dense_fn(layer), [], ref_key="broken")]

    case = _fake_case(monkeypatch, impls)
    rec = runner.run_case(case, 2, torch.device("cpu"), torch.float32, ["x"], repeats=2, warmup=0)
    by = {r["impl"]: r for r in rec["results"]}
    assert "tile gradient differs" in by["bad_tiles"]["error"] and "fwd_bwd" not in by["bad_tiles"]
    assert "error" not in by["torch_depthwise"] and by["torch_depthwise"]["grad_max_rel_err"] <= 1e-4
    assert rec["fastest_dense"]["fwd"]["impl"] == "torch_depthwise"

    def broken_reference(x, w, plan, b):
        raise RuntimeError("reference exploded")
    monkeypatch.setattr(reference, "shiftwise_conv2d", broken_reference)
    rec = runner.run_case(case, 2, torch.device("cpu"), torch.float32, ["x"], repeats=2, warmup=0)
    assert all("the torch reference failed (RuntimeError: reference exploded)" in r["error"] for r in rec["results"])
    assert rec["fastest_dense"]["fwd"] is None  # rows with errors are never the fastest


def test_keep_freed_memory_on_glibc():
    # process-wide: run it in a child, not in the test process
    code = "from stage_controls import keep_freed_memory; print(keep_freed_memory())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.strip()
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert got == ("glibc: freed memory kept" if glibc else "system")


@pytest.mark.parametrize("name", ["shiftwise.bench.impls", "shiftwise.bench.timing", "shiftwise.bench.runner",
                                  "shiftwise.bench.ort"])
def test_docstring_examples(name):
    import doctest
    import importlib

    if name.endswith(".ort"):
        pytest.importorskip("onnxruntime")
    assert doctest.testmod(importlib.import_module(name)).failed == 0


# onnxruntime rows -----------------------------------------------------------------------------------
def _conv_kernels(ops):
    """``[(kh, kw), ...]`` of the Conv nodes counted in ``ops`` (:func:`ort.op_counts`)."""
    return [tuple(int(v) for v in name.split()[1].split("x")) for name in ops if name.startswith("Conv ")]


def test_onnx_rows_run_both_forms_and_match_the_reference():
    """Both ONNX forms of a compacted layer with empty channels give the reference's output in
    onnxruntime (checked by the harness before timing), forward only; the dense form is one
    conv of the merged kernel, the shift-wise form has no conv larger than a tile."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    case = Case("ort", 6, 11, 9, ((13, 5), (5, 13)), 5, (1.0, 0.25))
    layer = make_layer(case, "cpu", torch.float32)
    _, sparse = compact(layer.tiles, layer.plan, 0.25)
    assert (sparse.counts() == 0).any()  # some channels keep no tile: bias only
    names = ["onnx_dense", "onnx_shiftwise"]
    rec = runner.run_case(case, 2, torch.device("cpu"), torch.float32, names, repeats=2, warmup=1, memory=False)
    by = {r["impl"]: r for r in rec["results"]}
    assert set(by) == {f"{n}@{d}" for n in names for d in ("1", "0.25")}
    for name, r in by.items():
        assert "error" not in r and r["max_rel_err"] <= 1e-5, (name, r.get("error"))
        assert "fwd_bwd" not in r and r["fwd"]["runs"] == 2 and r["onnx_form"] == name[5:].split("@")[0]
        assert r["ort_threads"] == torch.get_num_threads() and r["export_ms"] > 0
        kernels = _conv_kernels(r["onnx_ops"])
        if name.startswith("onnx_dense"):
            assert len(kernels) == 1 and 5 < max(kernels[0]) and max(kernels[0]) <= 13  # merged (maybe cropped)
        else:
            assert kernels and all(kh <= 5 and kw <= 5 for kh, kw in kernels)
    assert runner.failures({"cases": [rec]}) == []


def test_onnx_rows_are_skipped_with_the_reason(monkeypatch):
    from shiftwise.bench import format_table

    assert "--device cpu" in ort.unavailable(torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    reason = ort.unavailable(torch.device("cpu"))
    assert reason.startswith("onnxruntime is not installed") and EXTRA_HINT in reason
    case = Case("ort", 2, 6, 6, ((7, 5),), 5, (1.0,))
    rec = runner.run_case(case, 1, torch.device("cpu"), torch.float32, ["onnx_dense", "onnx_shiftwise"], repeats=1,
                          warmup=0)
    assert [(r["impl"], r["skipped"]) for r in rec["results"]] == [("onnx_dense@1", reason),
                                                                   ("onnx_shiftwise@1", reason)]
    assert runner.failures({"cases": [rec]}) == []  # not a failure: exit status 0
    assert reason in format_table({"cases": [rec]})
    monkeypatch.undo()
    if ort.unavailable(torch.device("cpu")) is None:  # float64 runs: the ONNX rows are float32 only
        rec = runner.run_case(case, 1, torch.device("cpu"), torch.float64, ["onnx_dense"], repeats=1, warmup=0)
        assert "float32 only" in rec["results"][0]["skipped"]


def test_committed_onnx_runs_show_both_forms(capsys):
    saved = sorted((ROOT / "benchmarks" / "results").glob("bench-*-onnx-*.json"))
    assert len(saved) >= 3
    for path in saved:
        assert cli.main(["bench", "--from-json", str(path)]) == 0
        out = capsys.readouterr().out
        assert "onnxruntime " in out.splitlines()[0]
        for form in ("onnx_dense", "onnx_shiftwise"):
            assert f"  {form}" in out
