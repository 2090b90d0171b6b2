"""Smoke test of ``shiftwise bench``: a tiny custom case runs and writes valid JSON (no timing asserted)."""
import json
import math

import pytest
import torch

from shiftwise import cli
from shiftwise.bench import FLOOR_REPEATS_MIN, IMPLS, PRESETS, Case, compact, make_layer
from shiftwise.reference import shiftwise_conv2d as _ref_conv  # bound here: one test breaks the module's


def test_bench_tiny_custom_case_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--preset", "custom", "--shape", "4,12,14", "--kernels", "9x5,5x9,5x5",
                   "--batch", "2", "--repeats", "2", "--warmup", "0", "--densities", "1,0.5", "--quiet",
                   "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "custom.c4.12x14" in text and "*" in text
    report = json.loads(out.read_text())  # strict JSON: no NaN/Infinity literals
    assert report["versions"]["torch"] and report["copy_bandwidth_gbs"] > 0
    (case,) = report["cases"]
    got = {r["impl"] for r in case["results"]}
    expected = {n for n in IMPLS if not n.startswith("sw_")}
    expected |= {f"sw_{kind}@{d}" for kind in ("decomposed", "fused", "auto", "shift_add") for d in ("1", "0.5")}
    assert got == expected
    for r in case["results"]:
        assert "error" not in r and r["max_rel_err"] <= 1e-4
        # stages timed against their floor run in rounds of 3: at least FLOOR_REPEATS_MIN runs
        runs = r["fwd"]["runs"]
        assert (runs >= FLOOR_REPEATS_MIN if r["impl"].startswith("sw_shift_add") else runs == 2)
        assert math.isfinite(r["fwd"]["median_ms"])
        if not r["impl"].startswith("sw_shift_add"):
            assert r["fwd_bwd"]["median_ms"] > 0 and r["peak_step_bytes"] > 0
            assert r["grad_max_rel_err"] <= 1e-4  # the training step was checked before it was timed
        else:
            lo, hi = r["floor_multiple_quartiles"]
            assert 0 < lo <= r["floor_multiple"] <= hi
            # the control: PyTorch's sum of as many inputs as the stage reads planes per output
            assert r["sum_inputs"] >= 1 and r["sum_multiple"] > 0 and r["sum_floor_multiple"] > 0
            assert f"PyTorch's {r['sum_inputs']}-input sum" in text
    assert report["complete"] is True and report["versions"]["git"]
    assert case["fastest_dense"]["fwd"]["impl"] in {r["impl"] for r in case["results"]}
    by = {r["impl"]: r for r in case["results"]}
    assert case["targets"]["t1_floor_multiple"] == by["sw_shift_add@1"]["floor_multiple"]
    assert case["targets"]["t1_d0.5_floor_multiple"] == by["sw_shift_add@0.5"]["floor_multiple"]
    assert "t1_floor_multiple" in text and "(<= 1.3: " in text  # the targets line carries verdicts


def test_compaction_keeps_the_requested_share_with_varying_counts():
    layer = make_layer(Case("t", 6, 8, 8, ((21, 5), (5, 21)), 5), "cpu", torch.float64)
    tiles, plan = compact(layer.tiles, layer.plan, 0.5)
    assert plan.num_tiles == round(0.5 * layer.plan.num_tiles) and tiles.shape[0] == plan.num_tiles
    assert plan.info.uniform is None  # per-channel counts differ
    assert set(PRESETS) == {"slak_t", "replknet_31b", "paper", "replk_stack"}


@pytest.mark.parametrize("argv,message", [
    (["--preset", "custom"], "--shape C,H,W"),
    (["--preset", "custom", "--shape", "4,8", "--kernels", "5x5"], "--shape wants"),
    (["--preset", "custom", "--shape", "4,8,8", "--kernels", "4x5"], "odd"),
    (["--preset", "paper", "--impls", "nope"], "unknown --impls"),
    (["--preset", "slak_t", "--cases", "s9"], "matches none"),
    (["--preset", "paper", "--densities", "0"], "densities"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_paired_floor_rounds_settle_and_ratio_medians(monkeypatch):
    """The floor comparison's rounds, with the clock replaced (nothing is timed): each stage
    starts after a settle and SETTLE_CALLS untimed calls, and the multiple is the median of the
    per-round ratios."""
    from shiftwise import bench

    events = []
    fn_times = iter([5.0] + [2.0] * 3 + [9.0] * 3 + [3.0] * 3)  # the first call, then rounds of 3

    def fn():
        events.append("fn")

    def time_once(stage, device, clock):
        stage()
        if stage is fn:
            events[-1] = "fn timed"
            return next(fn_times)
        return 1.0  # the copy and the sum: 1 ms (before scaling to the stage's bytes)

    monkeypatch.setattr(bench, "_time_once", time_once)
    monkeypatch.setattr(bench, "settle", lambda device: events.append("settle"))
    got = bench.paired_floor(fn, moved=bench.FLOOR_BUFFER_MIN, device=torch.device("cpu"), repeats=9, warmup=0)
    one_round = ["settle"] + ["fn"] * bench.SETTLE_CALLS + ["fn timed"] * 3 + ["settle", "settle"]
    assert events == ["fn timed"] + one_round * 3
    assert got["fwd"]["runs"] == 9 and got["fwd"]["first_ms"] == 5.0
    assert got["floor_ms"] == 1.0 and got["floor_multiple"] == 3.0  # rounds 2, 9, 3: median 3 (mean 4.7)
    assert got["floor_multiple_quartiles"][0] <= 2.5 and got["floor_multiple_quartiles"][1] >= 6.0


def test_paired_floor_sum_control(monkeypatch):
    """With the written bytes, each round also times PyTorch's k-input sum of the same bytes:
    k is the read-to-write ratio rounded, its time is scaled to the stage's bytes like the
    floors', and its multiples are medians of per-round ratios. The clock is replaced (nothing
    is timed); the stages themselves run."""
    from shiftwise import bench

    sums = []
    real_sum = torch.sum

    def recording_sum(t, dim, out):
        sums.append((tuple(t.shape), tuple(out.shape)))
        return real_sum(t, dim, out=out)

    fn_times = iter([5.0] + [4.0] * 3 + [8.0] * 3 + [6.0] * 3)  # the first call, then rounds of 3
    sum_times = iter([2.0] * 3 + [2.0] * 3 + [4.0] * 3)

    def fn():
        pass

    def time_once(stage, device, clock):
        before = len(sums)
        stage()
        if stage is fn:
            return next(fn_times)
        return next(sum_times, 1.0) if len(sums) > before else 1.0  # the copy and the read: 1 ms

    monkeypatch.setattr(bench, "_time_once", time_once)
    monkeypatch.setattr(bench, "settle", lambda device: None)
    monkeypatch.setattr(bench, "SETTLE_CALLS", 0)
    buffer = 1_000_000  # not a multiple of 4 (k + 1): the sum moves a little less than the copy
    monkeypatch.setattr(bench, "FLOOR_BUFFER_MIN", buffer)
    monkeypatch.setattr(bench.torch, "sum", recording_sum)
    moved, written = 900_001, 300_000  # reads 2 bytes per byte written; less than the floors move
    got = bench.paired_floor(fn, moved=moved, device=torch.device("cpu"), repeats=9, warmup=0, written=written)
    assert len(sums) == 9 and len(set(sums)) == 1  # three rounds of three timed sums
    (k, n_out), out_shape = sums[0]
    assert k == 2 == got["sum_inputs"] and out_shape == (n_out,)
    assert 4 * (k + 1) * n_out <= buffer < 4 * (k + 1) * (n_out + 1)  # the floors' size, in float32
    scale, copy_scale = moved / (4 * (k + 1) * n_out), moved / buffer
    assert abs(scale / copy_scale - 1) > 1e-6  # (so the checks below tell the two scales apart)
    # per round: fn 4 / 8 / 6 ms against the sum's 2 / 2 / 4 ms (times scale): ratios 2, 4, 1.5
    assert got["sum_multiple"] == pytest.approx(2.0 / scale, rel=1e-9)
    assert got["sum_ms"] == pytest.approx(2.0 * scale, rel=1e-9)
    assert got["sum_floor_multiple"] == pytest.approx(2.0 * scale / copy_scale, rel=1e-9)  # the copy: 1 ms
    assert got["floor_multiple"] == pytest.approx(6.0 / copy_scale, rel=1e-9)
    plain = bench.paired_floor(lambda: None, moved=moved, device=torch.device("cpu"), repeats=1, warmup=0)
    assert "sum_multiple" not in plain and len(sums) == 9  # no written bytes: no control
    halves = bench.paired_floor(lambda: None, moved=7 * 100, device=torch.device("cpu"), repeats=1, warmup=0,
                                written=2 * 100)  # reads 2.5 bytes per byte written: k rounds half up to 3
    assert halves["sum_inputs"] == 3 and sums[-1][0][0] == 3


def test_settle_waits_on_cpu_only(monkeypatch):
    import time

    from shiftwise import bench

    t0 = time.perf_counter()
    bench.settle(torch.device("cpu"))
    assert time.perf_counter() - t0 >= bench.SETTLE_S
    monkeypatch.setattr(bench, "SETTLE_S", 60.0)  # would hang the test if a GPU device waited
    bench.settle(torch.device("meta"))


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
    from shiftwise import bench

    case = Case("fake", 3, 6, 6, ((5, 5),), 5, (1.0,))
    monkeypatch.setattr(bench, "build_impls", lambda case, layer, names: impls(make_layer(case, "cpu",
                                                                                          torch.float32)))
    return bench, case


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
                _time.sleep(0.08)
            return dense(x)
        return [bench.Impl("slow_first", fn, [])]

    bench, case = _fake_case(monkeypatch, impls)
    rec = bench.run_case(case, 2, torch.device("cpu"), torch.float32, ["x"], repeats=3, warmup=0)
    (r,) = rec["results"]
    assert "error" not in r
    for key in ("fwd", "fwd_bwd"):
        assert r[key]["first_ms"] >= 80 and r[key]["compile_ms"] >= 70 > r[key]["median_ms"]


def test_failures_are_recorded_and_the_other_implementations_still_run(monkeypatch):
    def impls(layer):
        dense = _dense_fn(layer)

        def broken(x):
            raise ValueError("kernel exploded\nsecond line")
        return [bench.Impl("broken", broken, []), bench.Impl("bad_grad", lambda x: HalfGrad.apply(dense(x)), []),
                bench.Impl("good", dense, [])]

    bench, case = _fake_case(monkeypatch, impls)
    rec = bench.run_case(case, 2, torch.device("cpu"), torch.float32, ["x"], repeats=2, warmup=0)
    by = {r["impl"]: r for r in rec["results"]}
    assert by["broken"]["error"] == "ValueError: kernel exploded"
    assert "input gradient differs" in by["bad_grad"]["error"] and by["bad_grad"]["max_rel_err"] <= 1e-4
    assert "fwd_bwd" not in by["bad_grad"]
    assert "error" not in by["good"] and by["good"]["fwd_bwd"]["median_ms"] > 0


def test_out_of_memory_while_building_a_case_is_recorded(monkeypatch):
    from shiftwise import bench

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")
    monkeypatch.setattr(bench, "make_layer", oom)
    rec = bench.run_case(Case("big", 3, 6, 6, ((5, 5),), 5), 2, torch.device("cpu"), torch.float32,
                         ["torch_depthwise"], repeats=2, warmup=0)
    assert "out of memory" in rec["error"] and rec["results"] == []
    report = {"cases": [rec], "repeats": 2}
    assert "out of memory" in bench.format_table(report)


def test_json_is_written_after_every_case(monkeypatch, tmp_path, capsys):
    """An interrupted run keeps the cases it finished, marked incomplete."""
    from shiftwise import bench

    done = []

    def run_case(case, *a, **k):
        if done:
            raise KeyboardInterrupt
        done.append(case.name)
        return {"case": {"name": case.name}, "batch": 1, "results": []}
    monkeypatch.setattr(bench, "run_case", run_case)
    monkeypatch.setattr(bench, "bandwidths", lambda *a, **k: {"copy": 1e9, "read": 1e9})
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--preset", "slak_t", "--quiet", "--json", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert [c["case"]["name"] for c in report["cases"]] == done == ["slak_t.s1"] and report["complete"] is False


def test_winner_is_the_fastest_implementation_of_the_whole_layer():
    from shiftwise import bench

    def row(name, ms):
        return {"impl": name, "fwd": {"median_ms": ms, "iqr_ms": 0.0}}
    rec = {"case": {"name": "c", "branches": [[5, 5]], "channels": 1, "height": 4, "width": 4, "tile_size": 5},
           "batch": 1, "results": [row("torch_depthwise", 4.0), row("sw_fused@1", 3.0), row("sw_fused@0.25", 1.0)]}
    lines = bench.format_table({"cases": [rec]}).splitlines()
    marked = [ln.split()[0] for ln in lines if "*" in ln]
    assert marked == ["sw_fused@1"]


def test_device_tags_and_from_json_with_json(monkeypatch, tmp_path, capsys):
    from shiftwise import bench

    for name, tag in (("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("NVIDIA H100 80GB HBM3", "h100")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, name=name: name)
        assert bench.device_tag(torch.device("cuda")) == tag
    saved = tmp_path / "a.json"
    saved.write_text("{}")
    assert cli.main(["bench", "--from-json", str(saved), "--json", str(tmp_path / "b.json")]) == 2
    assert "nothing new for --json" in capsys.readouterr().err


def test_tile_and_bias_gradients_are_checked_and_a_failing_reference_is_named(monkeypatch):
    """An implementation that trains the tiles must get their gradients right, not only the
    input's; a reference that cannot be computed is reported as the reference's failure; an
    implementation with an error is never the fastest dense path."""
    from shiftwise import bench, reference

    def impls(layer):
        def make(scale_tiles):
            w, b = bench._leaf(layer.tiles), bench._leaf(layer.bias)

            def fn(x):
                return _ref_conv(x, HalfGrad.apply(w) if scale_tiles else w, layer.plan, b)
            return bench.Impl("torch_depthwise" if not scale_tiles else "bad_tiles", fn, [w, b], tile_params=True)
        return [make(True), make(False), bench.Impl("other", _dense_fn(layer), [], ref_key="broken")]

    bench_, case = _fake_case(monkeypatch, impls)
    rec = bench_.run_case(case, 2, torch.device("cpu"), torch.float32, ["x"], repeats=2, warmup=0)
    by = {r["impl"]: r for r in rec["results"]}
    assert "tile gradient differs" in by["bad_tiles"]["error"] and "fwd_bwd" not in by["bad_tiles"]
    assert "error" not in by["torch_depthwise"] and by["torch_depthwise"]["grad_max_rel_err"] <= 1e-4
    assert rec["fastest_dense"]["fwd"]["impl"] == "torch_depthwise"

    def broken_reference(x, w, plan, b):
        raise RuntimeError("reference exploded")
    monkeypatch.setattr(reference, "shiftwise_conv2d", broken_reference)
    rec = bench_.run_case(case, 2, torch.device("cpu"), torch.float32, ["x"], repeats=2, warmup=0)
    assert all("the torch reference failed (RuntimeError: reference exploded)" in r["error"] for r in rec["results"])
    assert rec["fastest_dense"]["fwd"] is None  # rows with errors are never the fastest


def test_target_verdicts_follow_the_issue_thresholds():
    """Each target ratio is judged against the issue's bound, on the right side of it; context
    ratios (the read-bandwidth multiple, T2 outside SLaK-T stage 1) get no verdict."""
    from shiftwise.bench import T2_CASE, _target_text, target_bound

    for case in (T2_CASE, "paper"):
        assert target_bound("t1_floor_multiple", case) == (1.3, "max")
        assert target_bound("t1_d0.25_floor_multiple", case) == (1.3, "max")
        assert target_bound("t1_read_floor_multiple", case) is None
        assert target_bound("t3_d0.25_vs_dense_fwd", case) == (2.0, "min")
        assert target_bound("t4_peak_ratio", case) == (1.25, "max")
    assert target_bound("t2_vs_branches_fwd_bwd", T2_CASE) == (2.0, "min")
    assert target_bound("t2_vs_pad_slice_fwd", T2_CASE) == (3.0, "min")
    assert target_bound("t2_vs_branches_fwd", "slak_t.s4") is None
    assert _target_text("t1_floor_multiple", 1.29, "paper").endswith("(<= 1.3: met)")
    assert _target_text("t1_d0.25_floor_multiple", 1.31, "paper").endswith("(<= 1.3: NOT met)")
    assert _target_text("t2_vs_pad_slice_fwd", 2.9, T2_CASE).endswith("(>= 3: NOT met)")
    assert _target_text("t2_vs_pad_slice_fwd", 2.9, "slak_t.s4") == "t2_vs_pad_slice_fwd 2.90"
    assert _target_text("t3_d0.5_vs_dense_fwd_bwd", 2.0, "paper").endswith("(>= 2: met)")
    assert _target_text("t4_peak_ratio", 1.3, "paper").endswith("(<= 1.25: NOT met)")
    assert _target_text("t1_read_floor_multiple", 1.5, "paper") == "t1_read_floor_multiple 1.50"
