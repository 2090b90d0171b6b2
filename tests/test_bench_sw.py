"""``shiftwise bench`` for SW networks: the SW layer cases (the official computation against
shiftwise's two paths, checked before timing) and whole SW models side by side with another
network (no timing asserted)."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import sw_oracle
from shiftwise import cli
from shiftwise.bench import (PRESETS, SW_IMPLS, BenchModel, Case, ModelForms, SWSpec, build_impls, default_batch,
                             format_model_report, format_report, make_sw_layer, official_plan, run_bench,
                             run_model_bench, sw_reference)
from shiftwise.bench import impls as bench_impls
from shiftwise.models import create_model, randomize_
from shiftwise.models.sw import TABLE_BUFFERS
from shiftwise.modules import ShiftWiseConv2d

# K larger than the map in both directions, N_rep 2, 8 channels of which 6 shift-wise
TINY = Case("tiny_sw", 8, 9, 7, ((13, 13),), 3, (1.0,), SWSpec(13, 3, 0.23, 2, 2))
SMALL = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=(9, 7, 5, 3), num_classes=10)
FAST = dict(repeats=1, warmup=0)


def _strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


@pytest.fixture
def torch_backend(monkeypatch):
    """The PyTorch twins in place of the Taichi kernels (no compilation), on one thread."""
    monkeypatch.setenv("SHIFTWISE_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _oracle(layer, x):
    """The official layer's output (tests/sw_oracle.py), BatchNorms on batch statistics."""
    bns = [lambda t, bn=bn: F.batch_norm(t, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
           for bn in (layer.bn_lora1, layer.bn_lora2, layer.bn_small)]
    return sw_oracle.official_layer(x, list(layer.path_weights()), layer.channels, layer.big_kernel,
                                    layer.small_kernel, layer.ghost_ratio, layer.n_rep, bns)


@pytest.mark.parametrize("k,n_path,n_rep,hw", [(3, 2, 2, (9, 7)), (5, 1, 3, (4, 6)), (3, 3, 1, (1, 1))])
def test_official_computation_and_reference_equal_the_oracle(k, n_path, n_rep, hw):
    case = Case("t", 10, *hw, ((17, 17),), k, (1.0,), SWSpec(17, k, 0.3, n_path, n_rep))
    layer = make_sw_layer(case, "cpu", torch.float64, seed=3)
    x = torch.randn(2, 10, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = _oracle(layer, x)
    (official,) = build_impls(case, layer, ["sw_official"])
    torch.testing.assert_close(official.fn(x), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sw_reference(layer)(x, None), want, rtol=1e-10, atol=1e-10)
    # gradients: of the input and of every parameter, in the order the implementations list them
    gy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    leaves = [x.clone().requires_grad_(True)] + official.params
    oracle_grads = torch.autograd.grad(_oracle(layer, leaves[0]), [leaves[0]] + list(layer.path_weights())
                                       + [p for bn in (layer.bn_lora1, layer.bn_lora2, layer.bn_small)
                                          for p in (bn.weight, bn.bias)], gy)
    for got, ref in zip(sw_reference(layer)(x, gy), oracle_grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_the_official_plan_reads_every_plane_n_rep_times_per_direction():
    layer = make_sw_layer(TINY, "cpu", torch.float32)
    plan = official_plan(layer)
    n, p, nr = layer.rep_n, layer.num_planes, layer.n_rep
    assert (plan.num_outputs, plan.num_planes, plan.num_entries) == (3 * n, p, 2 * p * nr + n * nr)
    counts = torch.bincount(plan.plane.long(), minlength=p)
    picked = torch.bincount(layer.idx_identity.long().flatten(), minlength=p)
    assert torch.equal(counts, 2 * nr + picked)


def test_sw_layer_case_all_paths_agree_then_are_timed_with_peak_memory(torch_backend):
    report = run_bench([TINY], batch=2, names=list(SW_IMPLS), **FAST)
    (rec,) = report["cases"]
    assert (rec["shift_channels"], rec["planes_per_channel"], rec["planes"]) == (6, 5, 30)
    results = {r["impl"]: r for r in rec["results"]}
    assert list(results) == ["sw_official", "sw_weights", "sw_planes"]
    for name, r in results.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["max_rel_err"] <= 1e-4 and r["grad_max_rel_err"] <= 1e-4, name
        assert r["fwd"]["median_ms"] > 0 and r["fwd_bwd"]["median_ms"] > 0 and r["peak_step_bytes"] > 0
    text = format_report(report)
    assert "tiny_sw: B=2 C=8 9x7 SW layer K=13 k=3 ghost ratio 0.23 N_path 2 N_rep 2" in text
    assert "6 shift-wise channels x 5 planes" in text
    official = next(ln for ln in text.splitlines() if ln.strip().startswith("sw_official"))
    assert official.split()[3] == "1.00"  # the ratios of an SW case refer to the official computation


def test_the_taichi_shift_add_is_checked_forward_and_backward_before_timing():
    # the shift-wise convs of sw_weights run the kernels of tests/test_bench.py; the general
    # shift-add of sw_planes is the SW layer's own
    report = run_bench([TINY], batch=1, names=["sw_planes"], memory=False, **FAST)
    official, planes = report["cases"][0]["results"]
    assert (official["impl"], planes["impl"]) == ("sw_official", "sw_planes")
    for r in (official, planes):
        assert "error" not in r and r["max_rel_err"] <= 1e-4 and r["grad_max_rel_err"] <= 1e-4


def test_a_wrong_shift_is_caught_before_timing(monkeypatch, torch_backend):
    def shifted(layer):
        plan = official_plan(layer)
        return type(plan).from_entries(plan.out_channel, plan.plane, plan.dy + 1, plan.dx, plan.num_outputs,
                                       plan.num_planes)
    monkeypatch.setattr(bench_impls, "official_plan", shifted)
    report = run_bench([TINY], batch=1, names=["sw_official", "sw_planes"], memory=False, **FAST)
    results = {r["impl"]: r for r in report["cases"][0]["results"]}
    assert "output differs from the reference" in results["sw_official"]["error"]
    assert "fwd" not in results["sw_official"]
    assert "error" not in results["sw_planes"] and results["sw_planes"]["fwd_bwd"]["median_ms"] > 0


def test_branch_cases_skip_the_sw_implementations_and_sw_cases_the_others(torch_backend):
    report = run_bench([Case("b", 2, 8, 8, ((7, 5),), 5, (1.0,)), TINY], batch=1,
                       names=["torch_fft", "sw_planes"], backward=False, memory=False, **FAST)
    got = [[r["impl"] for r in rec["results"]] for rec in report["cases"]]
    assert got == [["torch_depthwise", "torch_fft"], ["sw_official", "sw_planes"]]


def test_sw_t_preset_and_its_batch():
    s1, s2, s3, s4 = PRESETS["sw_t"]
    assert (s1.channels, s1.height, s1.sw) == (80, 56, SWSpec(51, 3, 0.23, 2, 4))
    assert (s3.channels, s3.height, s3.sw.big_kernel, s4.sw.big_kernel) == (320, 14, 47, 13)
    assert default_batch("sw_t", torch.device("cpu")) == 8 and default_batch("sw_t", torch.device("cuda")) == 64
    assert default_batch("paper", torch.device("cpu")) == 4


def test_cli_sw_preset_writes_json_and_shows_it_again(monkeypatch, tmp_path, capsys, torch_backend):
    monkeypatch.setitem(PRESETS, "sw_t", (TINY,))
    out = tmp_path / "sw.json"
    assert cli.main(["bench", "--preset", "sw_t", "--batch-size", "1", "--repeats", "1", "--warmup", "0",
                     "--no-memory", "--quiet", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("shiftwise bench --preset sw_t") and "SW layer K=13" in table
    saved = _strict(out.read_text())
    assert saved["cases"][0]["case"]["sw"] == {"big_kernel": 13, "small_kernel": 3, "ghost_ratio": 0.23,
                                               "n_path": 2, "n_rep": 2}
    assert [r["impl"] for r in saved["cases"][0]["results"]] == list(SW_IMPLS)
    assert cli.main(["bench", "--from-json", str(out)]) == 0
    assert capsys.readouterr().out == table


# whole models --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sw_file(tmp_path_factory):
    """A small SW network saved as the official main.py saves one (``model`` and ``args``; no
    table buffers)."""
    model = randomize_(create_model("sw", **SMALL), seed=0, calibrate=32).eval()
    weights = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in TABLE_BUFFERS}
    args = argparse.Namespace(model="ShiftWise_v2_tiny", kernel_size=[9, 7, 5, 3, 3], ghost_ratio=0.23, N_path=2,
                              N_rep=4, width_factor=1.0, bn=True, input_size=32, nb_classes=10)
    path = tmp_path_factory.mktemp("swbench") / "sw_small.pth"
    torch.save({"model": weights, "epoch": 0, "args": args}, path)
    return str(path)


def test_models_side_by_side_sw_training_form_and_converted(sw_file, tmp_path, capsys, torch_backend):
    out = tmp_path / "models.json"
    assert cli.main(["bench", "--model", sw_file, "slak_demo", "--image-size", "32", "--batch-size", "2",
                     "--repeats", "1", "--warmup", "0", "--no-memory", "--quiet", "--json", "-o", str(out)]) == 0
    report = _strict(capsys.readouterr().out)
    assert report == _strict(out.read_text())
    sw, slak = report["models"]
    forms = {f["form"]: f for f in sw["forms"]}
    assert list(forms) == ["original", "shiftwise", "floor"]  # no dense form for an SW network
    assert (sw["kind"], sw["family"], sw["inference_form"], sw["train_form"]) == ("official", "sw", "shiftwise",
                                                                                  "original")
    assert forms["shiftwise"]["check"] == {"against": "original", "max_rel_diff": forms["shiftwise"]["check"][
        "max_rel_diff"], "tolerance": 1e-4} and forms["shiftwise"]["check"]["max_rel_diff"] <= 1e-4
    assert "train" not in forms["shiftwise"] and forms["original"]["train"]["median_ms"] > 0
    assert (slak["inference_form"], slak["train_form"]) == ("shiftwise", "shiftwise")
    slak_forms = {f["form"]: f for f in slak["forms"]}
    (pair,) = report["comparison"]["pairs"]
    assert (pair["model"], pair["against"]) == (sw_file, "slak_demo")
    assert pair["fwd_throughput"] == pytest.approx(forms["shiftwise"]["fwd_images_s"]
                                                   / slak_forms["shiftwise"]["fwd_images_s"])
    assert pair["train_time"] == pytest.approx(forms["original"]["train"]["median_ms"]
                                               / slak_forms["shiftwise"]["train"]["median_ms"])
    assert pair["train_peak"] is None  # --no-memory
    assert cli.main(["bench", "--from-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "side by side, B=2" in text
    assert f"{sw_file} / slak_demo: converted forward throughput {pair['fwd_throughput']:.2f}x, training step " \
           f"time {pair['train_time']:.2f}x" in text
    assert text == format_model_report(report) + "\n"


def test_forms_of_an_sw_training_checkpoint():
    model = randomize_(create_model("sw", **SMALL), seed=1, calibrate=32).eval()
    forms = ModelForms(BenchModel("ckpt.pt", "train", "sw", "sw", model, 32), densities=[0.5])
    assert [f.name for f in forms.forms] == ["train", "shiftwise", "sparse@0.5", "floor"]
    assert (forms.inference_form, forms.train_form) == ("shiftwise", "train")
    assert [f.against for f in forms.forms[:2]] == [None, "train"]
    assert not forms.forms[1].train and forms.forms[0].train
    converted = forms.shiftwise_model()
    assert any(isinstance(m, ShiftWiseConv2d) for m in converted.modules())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4 * float(model(x).abs().max()))


def test_a_single_model_has_no_comparison(torch_backend):
    report = run_model_bench(["slak_demo"], batch=1, backward=False, memory=False, backend="torch", **FAST)
    assert "comparison" not in report and "side by side" not in format_model_report(report)
