"""``shiftwise selftest``: passes on this machine's CPU, names a wrong backend, refuses an absent device."""
import doctest
import io
import json
import sys

import pytest
import torch

from shiftwise import _runtime, reference, selftest
from shiftwise.cli import main
from shiftwise.dispatch import BACKENDS

KINDS = {"forward", "grad_input", "grad_tiles", "grad_bias", "gradcheck", "determinism", "host_sync"}


def _strict(text):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def quick_cpu():
    """One quick CPU run through the command (its kernels then stay compiled for the other tests)."""
    with pytest.MonkeyPatch.context() as mp:
        out, err = io.StringIO(), io.StringIO()
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        code = main(["selftest", "--device", "cpu", "--quick", "--json"])
    return code, out.getvalue(), err.getvalue()


def test_quick_cpu_run_passes_every_check(quick_cpu):
    code, out, _ = quick_cpu
    assert code == 0
    report = _strict(out)
    assert report["passed"] is True and report["failed"] == [] and report["device"] == "cpu"
    checks = report["checks"]
    assert {c["status"] for c in checks} <= {"pass", "n/a"}
    # every backend, both dtypes, every kind of check; host sync is a CUDA check
    assert {c["backend"] for c in checks} >= set(BACKENDS)
    assert {c["kind"] for c in checks} >= KINDS
    for backend in BACKENDS:
        for dtype in ("float32", "float64"):
            kinds = {c["kind"] for c in checks if c["backend"] == backend and c["dtype"] == dtype}
            assert {"forward", "grad_input", "grad_tiles", "grad_bias"} <= kinds, (backend, dtype)
    assert all(c["status"] == "n/a" for c in checks if c["kind"] == "host_sync")
    for c in checks:
        if c["error"] is not None:
            assert c["error"] <= c["tolerance"], c
    assert report["tolerances"] == {"float32": selftest.TOLERANCES[torch.float32],
                                    "float64": selftest.TOLERANCES[torch.float64]}
    env = report["environment"]
    assert env["taichi_arch"] == "x64" or env["taichi_arch"] == "arm64"
    assert {"shiftwise", "torch", "taichi", "python"} <= set(env)
    rows = report["timing"]
    assert {(r["case"].split(" ")[0], r["density"]) for r in rows} == {
        ("paper", 1.0), ("paper", 0.25), ("slak_t.s1", 1.0), ("slak_t.s1", 0.25)}
    assert all(r["depthwise_forward_ms"] > 0 and r["fused_step_ms"] > 0 for r in rows)


def test_table_states_tolerances_and_result(quick_cpu, capsys):
    code, out, _ = quick_cpu
    report = _strict(out)
    result = selftest.SelftestResult(report["device"], True, report["environment"],
                                     [selftest.Check(**{k: v for k, v in c.items() if k != "name"})
                                      for c in report["checks"]], report["timing"])
    text = selftest.format_report(result)
    assert "tolerance float32 2e-05, float64 1e-12" in text
    assert text.splitlines()[-1].startswith("all ") and "passed" in text.splitlines()[-1]
    for backend in BACKENDS:
        assert any(line.startswith(backend + " ") and line.endswith("pass") for line in text.splitlines())


def test_wrong_backend_fails_by_name(quick_cpu, monkeypatch, capsys):
    right = reference.shiftwise_conv2d
    monkeypatch.setattr(reference, "shiftwise_conv2d", lambda *a, **k: right(*a, **k) * 1.001)
    monkeypatch.setattr(selftest, "QUICK_GEOMETRIES", selftest.QUICK_GEOMETRIES[:1])
    monkeypatch.setattr(selftest, "TIMING_CASES", ())
    assert main(["selftest", "--device", "cpu", "--quick"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert any(line.startswith("torch ") and line.endswith("FAIL") for line in lines)
    assert any(line.startswith("taichi_fused ") and line.endswith("pass") for line in lines)
    failed = lines[lines.index(next(line for line in lines if line.startswith("FAILED:"))) + 1:]
    assert failed and all(line.lstrip().split(" ")[1] == "torch" for line in failed)
    assert any(line.lstrip().startswith("forward torch float32 [") for line in failed)
    assert "check(s) failed" in captured.err


def test_no_cuda_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["selftest", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("shiftwise selftest: error: ") and "CUDA" in err


def test_taichi_that_cannot_start_is_one_line_exit_2(monkeypatch, capsys):
    def refuse(device):
        raise _runtime.TaichiUnavailable("Taichi could not start on CUDA (it fell back to the CPU)\nmore")
    monkeypatch.setattr(_runtime, "launch", refuse)
    assert main(["selftest", "--device", "cpu", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Taichi cannot start on cpu" in err and "fell back" in err


def test_tf32_settings_are_restored():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    seen = []
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with selftest.no_tf32():
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        assert seen == [(False, False)]
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_geometries_hold_what_they_promise():
    full = selftest.GEOMETRIES
    assert {g.tile_size for g in full} == {1, 3, 5, 7}
    assert any(g.height in (7, 9) for g in full) and any(g.width % 32 for g in full)
    assert any(g.batch == 1 for g in full)
    assert any(max(k[0] for k in g.branches) > g.height for g in full)  # a strip longer than the map
    for g in full + (selftest.GRADCHECK_GEOMETRY,):
        tiles, plan = g.build(0)
        counts = plan.counts()
        assert tiles.shape == (plan.num_tiles, g.tile_size, g.tile_size)
        assert [c for c in range(g.channels) if int(counts[c]) == 0] == list(g.empty), g.name


def test_docstring_example():
    assert doctest.testmod(selftest, optionflags=doctest.ELLIPSIS).failed == 0


def test_timing_that_raises_is_a_failed_check(monkeypatch):
    def out_of_memory(case, density, device, quick):
        raise RuntimeError("out of memory\ndetails")
    monkeypatch.setattr(selftest, "_time_case", out_of_memory)
    result = selftest.run_selftest("cpu", quick=True, backends=["torch"], show_progress=False)
    assert not result.passed and result.timing == []
    assert [c.kind for c in result.failed] == ["forward_timed"] * 4
    assert result.failed[0].detail == "RuntimeError: out of memory"
    assert "FAILED: 4 of" in selftest.format_report(result)
