"""Smoke test of ``shiftwise bench``: a tiny custom case runs and writes valid JSON (no timing asserted)."""
import json
import math

import pytest
import torch

from shiftwise import cli
from shiftwise.bench import FLOOR_REPEATS_MIN, IMPLS, PRESETS, Case, compact, make_layer


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
        else:
            lo, hi = r["floor_multiple_quartiles"]
            assert 0 < lo <= r["floor_multiple"] <= hi
    assert case["fastest_dense"]["fwd"]["impl"] in {r["impl"] for r in case["results"]}
    by = {r["impl"]: r for r in case["results"]}
    assert case["targets"]["t1_floor_multiple"] == by["sw_shift_add@1"]["floor_multiple"]
    assert case["targets"]["t1_d0.5_floor_multiple"] == by["sw_shift_add@0.5"]["floor_multiple"]


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


def test_settle_waits_on_cpu_only(monkeypatch):
    import time

    from shiftwise import bench

    t0 = time.perf_counter()
    bench.settle(torch.device("cpu"))
    assert time.perf_counter() - t0 >= bench.SETTLE_S
    monkeypatch.setattr(bench, "SETTLE_S", 60.0)  # would hang the test if a GPU device waited
    bench.settle(torch.device("meta"))
