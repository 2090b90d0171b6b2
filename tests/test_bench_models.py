"""``shiftwise bench --model``: the forms of a whole model, their checks, the sparse and floor
models, and the command's outputs, on the embedded demo at 32 x 32 (no timing asserted)."""
import json
import math

import pytest
import torch
from torch import nn

from shiftwise import cli
from shiftwise.bench import (ModelCheckError, ModelForms, floor_model, format_model_report, load_bench_model,
                             magnitude_masks, run_model_bench, to_json)
from shiftwise.bench import models as bench_models
from shiftwise.convert.io import convert_checkpoint, demo_path, describe, read_checkpoint, save_converted, tile_size_of
from shiftwise.modules import ShiftWiseConv2d

FAST = dict(batch=2, repeats=1, warmup=0, backend="torch")  # the torch backend: no kernel compilation
CLI_FAST = ["--batch-size", "2", "--repeats", "1", "--warmup", "0", "--backend", "torch", "--quiet"]


def _strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_forms_of_an_official_file_are_checked_timed_and_compared(one_thread):
    report = run_model_bench([demo_path()], densities=[0.25, 1, 0.5], backward=False, memory=False, **FAST)
    (rec,) = report["models"]
    assert (rec["kind"], rec["family"], rec["image_size"], rec["num_classes"]) == ("official", "slak", 32, 10)
    forms = {f["form"]: f for f in rec["forms"]}
    assert list(forms) == ["original", "dense", "shiftwise", "sparse@0.5", "sparse@0.25", "floor"]
    assert forms["dense"]["layout"] == "channels_last" and forms["shiftwise"]["backend"] == "torch"
    against = {name: f["check"]["against"] for name, f in forms.items()}
    assert against == {"original": None, "dense": "original", "shiftwise": "original", "sparse@0.5": "masked@0.5",
                       "sparse@0.25": "masked@0.25", "floor": None}
    for name, f in forms.items():
        if f["check"]["against"]:
            assert f["check"]["max_rel_diff"] <= 1e-4, name
        med = f["fwd"]["median_ms"]
        assert f["fwd_images_s"] == pytest.approx(2 / (med / 1e3))
        assert f["speedup_vs_original"]["fwd"] == pytest.approx(forms["original"]["fwd"]["median_ms"] / med)
        assert f["floor_multiple"]["fwd"] == pytest.approx(med / forms["floor"]["fwd"]["median_ms"])
        assert "train" not in f and "peak_fwd_bytes" not in f
    assert forms["shiftwise"]["tiles"] == rec["dense_tiles"] and forms["shiftwise"]["tile_density"] == 1
    assert forms["dense"]["tiles"] is None and forms["floor"]["tiles"] is None
    assert forms["sparse@0.25"]["tiles"] < forms["sparse@0.5"]["tiles"] < rec["dense_tiles"]
    assert report["complete"] is True


def test_training_step_and_peak_memory_of_a_registered_name(one_thread):
    report = run_model_bench(["slak_demo"], densities=[0.5], **FAST)
    (rec,) = report["models"]
    assert (rec["kind"], rec["path"], rec["image_size"], rec["num_classes"]) == ("registered", None, 32, 10)
    for f in rec["forms"]:
        assert f["train"]["median_ms"] > 0 and f["train"]["runs"] == 1
        assert f["train_images_s"] == pytest.approx(2 / (f["train"]["median_ms"] / 1e3))
        assert f["peak_train_bytes"] > 0 and f["peak_fwd_bytes"] > 0
        assert set(f["speedup_vs_original"]) == set(f["floor_multiple"]) == {"fwd", "train"}


def _perturb_one_tile(convert):
    def wrapped(model, *args, **kwargs):
        out = convert(model, *args, **kwargs)
        layer = next(m for m in out.modules() if isinstance(m, ShiftWiseConv2d))
        with torch.no_grad():
            layer.weight[0] += 0.5 * layer.weight.abs().max()
        return out
    return wrapped


def test_a_corrupted_conversion_is_refused_naming_the_form(monkeypatch, one_thread):
    monkeypatch.setattr(bench_models, "convert_model", _perturb_one_tile(bench_models.convert_model))
    with pytest.raises(ModelCheckError, match=r"slak_demo: form dense: .* differ from the original model's") as exc:
        run_model_bench(["slak_demo"], backward=False, memory=False, **FAST)
    rec = exc.value.report["models"][0]
    assert [f["form"] for f in rec["forms"]] == ["original"] and "form dense" in rec["error"]
    assert exc.value.report["complete"] is False


def test_a_corrupted_compaction_is_refused(monkeypatch, one_thread):
    compact = bench_models.compact

    def drops_one_more(model, masks, inplace=False):
        masks = dict(masks)
        name, keep = next(iter(masks.items()))
        keep = keep.clone()
        keep[keep.nonzero()[0]] = False  # a kept tile lost in compaction
        masks[name] = keep
        return compact(model, masks, inplace=inplace)
    monkeypatch.setattr(bench_models, "compact", drops_one_more)
    with pytest.raises(ModelCheckError, match=r"form sparse@0.5: .*masked@0.5"):
        run_model_bench(["slak_demo"], densities=[0.5], backward=False, memory=False, **FAST)


def test_the_cli_exits_1_on_a_failed_check_and_keeps_what_it_measured(monkeypatch, tmp_path, capsys, one_thread):
    monkeypatch.setattr(bench_models, "convert_model", _perturb_one_tile(bench_models.convert_model))
    out = tmp_path / "models.json"
    assert cli.main(["bench", "--model", "demo", "--no-backward", "--no-memory", "-o", str(out), *CLI_FAST]) == 1
    captured = capsys.readouterr()
    assert "error: demo: form dense" in captured.err and "\n  original " in captured.out
    assert "stopped: demo: form dense" in captured.out
    saved = _strict(out.read_text())
    assert [f["form"] for f in saved["models"][0]["forms"]] == ["original"]


@pytest.fixture(scope="module")
def demo_sw():
    """The registered demo architecture with random weights, converted."""
    return ModelForms(load_bench_model("slak_demo")).shiftwise_model()


def test_a_form_out_of_memory_is_recorded_and_the_others_run(monkeypatch, one_thread):
    def oom(model):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    monkeypatch.setattr(bench_models, "densify", oom)
    report = run_model_bench(["demo"], backward=False, memory=False, **FAST)
    forms = {f["form"]: f for f in report["models"][0]["forms"]}
    assert forms["dense"]["oom"] and forms["dense"]["fwd"]["median_ms"] == math.inf
    assert forms["shiftwise"]["check"]["max_rel_diff"] <= 1e-4 and forms["floor"]["fwd"]["median_ms"] > 0
    assert "inf" in format_model_report(report)
    assert _strict(to_json(report))["models"][0]["forms"][1]["fwd"]["median_ms"] == "inf"


@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_magnitude_masks_keep_the_largest_share_of_every_channel(density, demo_sw):
    model = demo_sw
    masks = magnitude_masks(model, density)
    for name, layer in model.named_modules():
        if not isinstance(layer, ShiftWiseConv2d):
            continue
        off = layer.plan.offsets.tolist()
        norms = layer.weight.detach().abs().sum((1, 2)).tolist()
        for c in range(layer.in_channels):
            tiles = range(off[c], off[c + 1])
            want = max(1, math.floor(density * len(tiles) + 0.5))
            kept = [t for t in tiles if masks[name][t]]
            assert len(kept) == want
            dropped = [t for t in tiles if not masks[name][t]]
            assert not dropped or min(norms[t] for t in kept) >= max(norms[t] for t in dropped)


def test_sparse_forms_hold_the_masked_tiles_only(one_thread):
    forms = ModelForms(load_bench_model(demo_path()), densities=[0.5])
    sparse, masked = forms.sparse_model(0.5), forms.masked_model(0.5)
    full = forms.shiftwise_model()
    got = sum(m.weight.shape[0] for m in sparse.modules() if isinstance(m, ShiftWiseConv2d))
    want = sum(int(k.sum()) for k in forms.masks(0.5).values())
    assert got == want and 0.45 < got / sum(m.weight.shape[0] for m in full.modules()
                                            if isinstance(m, ShiftWiseConv2d)) < 0.65
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), masked(x), rtol=0, atol=1e-5)


def test_the_floor_is_the_network_without_its_large_kernel_layers(monkeypatch, demo_sw):
    sw = demo_sw
    floor = floor_model(sw)
    assert not any(isinstance(m, ShiftWiseConv2d) for m in floor.modules())
    assert all(max(m.kernel_size) <= 2 for m in floor.modules() if isinstance(m, nn.Conv2d))  # stem and downsampling
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = floor(x)
        monkeypatch.setattr(ShiftWiseConv2d, "forward", lambda self, inp: inp)  # reference: the layers pass through
        torch.testing.assert_close(got, sw(x), rtol=0, atol=0)


def test_a_converted_file_is_timed_as_it_is_and_against_its_origin(tmp_path, one_thread):
    path = tmp_path / "demo_sw.pth"
    convert_checkpoint(demo_path(), path)
    report = run_model_bench([str(path)], densities=[0.5], backward=False, memory=False, **FAST)
    (rec,) = report["models"]
    forms = {f["form"]: f for f in rec["forms"]}
    assert list(forms) == ["converted", "dense", "sparse@0.5", "floor"] and rec["kind"] == "converted"
    assert forms["converted"]["tile_density"] == 1 and forms["converted"]["check"]["against"] is None
    assert forms["dense"]["check"]["against"] == "converted" and forms["dense"]["check"]["max_rel_diff"] <= 1e-4
    assert "speedup_vs_original" not in forms["dense"] and forms["converted"]["floor_multiple"]["fwd"] > 0
    # with the official file it came from in the same run: compared with that file's original form
    report = run_model_bench([str(path), "demo"], backward=False, memory=False, **FAST)
    converted, demo = report["models"]
    assert converted["original_from"] == "demo" and "original_from" not in demo
    original = demo["forms"][0]["fwd"]["median_ms"]
    for f in converted["forms"]:
        assert f["speedup_vs_original"]["fwd"] == pytest.approx(original / f["fwd"]["median_ms"])
    with pytest.raises(ValueError, match="already shift-wise"):
        run_model_bench([str(path)], tile_size=3, backward=False, memory=False, **FAST)


def test_a_compact_file_is_labelled_with_its_kind_and_tile_share(tmp_path, one_thread):
    forms = ModelForms(load_bench_model("demo"), densities=[0.5])
    small = forms.sparse_model(0.5)
    path = tmp_path / "compact.pt"
    save_converted(small, path, describe(small, "compact", read_checkpoint("demo"), dense_tiles=forms.dense_tiles))
    report = run_model_bench([str(path)], backward=False, memory=False, **FAST)
    got = {f["form"]: f for f in report["models"][0]["forms"]}
    assert list(got) == ["compact", "dense", "floor"]
    kept = sum(int(k.sum()) for k in forms.masks(0.5).values())
    assert got["compact"]["tiles"] == kept and got["compact"]["tile_density"] == pytest.approx(kept / forms.dense_tiles)
    assert got["dense"]["check"]["max_rel_diff"] <= 1e-4


def test_onnx_forms_of_a_compact_file_match_it_in_onnxruntime(tmp_path, one_thread):
    """The compacted demo exported in both ONNX forms and run in onnxruntime: checked against the
    file's own model, forward only; the dense form holds the merged large kernels, the shift-wise
    form no conv larger than a tile."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    forms = ModelForms(load_bench_model("demo"), densities=[0.25])
    small = forms.sparse_model(0.25)
    path = tmp_path / "compact.pt"
    save_converted(small, path, describe(small, "compact", read_checkpoint("demo"), dense_tiles=forms.dense_tiles))
    report = run_model_bench([str(path)], onnx=True, **FAST)
    assert report["onnx"] is True
    got = {f["form"]: f for f in report["models"][0]["forms"]}
    assert list(got) == ["compact", "dense", "onnx_dense", "onnx_shiftwise", "floor"]
    tile = tile_size_of(small)
    for name in ("onnx_dense", "onnx_shiftwise"):
        f = got[name]
        assert f["runtime"] == "onnxruntime" and f["onnx"]["onnx_form"] == name[5:]
        assert f["check"]["against"] == "compact" and f["check"]["max_rel_diff"] <= 1e-4
        assert f["fwd"]["median_ms"] > 0 and "train" not in f and "peak_fwd_bytes" not in f
        convs = [op.split()[1] for op in f["onnx"]["onnx_ops"] if op.startswith("Conv ")]
        sides = [max(int(v) for v in kernel.split("x")) for kernel in convs]
        assert (max(sides) > tile) == (name == "onnx_dense")
    assert "onnxruntime " in format_model_report(report).splitlines()[0]


def test_cli_table_json_plot_and_saved_run(tmp_path, capsys, one_thread):
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "models.json", tmp_path / "models.png"
    argv = ["bench", "--model", "demo", "--density", "0.5", "--no-backward", "--no-memory", *CLI_FAST]
    assert cli.main([*argv, "-o", str(out), "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("shiftwise bench --model on ")
    for form in ("original", "dense", "shiftwise", "sparse@0.5", "floor"):
        assert f"\n  {form} " in captured.out
    assert f"wrote results {out}" in captured.err and f"wrote plot {plot}" in captured.err
    assert plot.read_bytes().startswith(b"\x89PNG")
    saved = _strict(out.read_text())
    assert saved["kind"] == "models" and saved["models"][0]["model"] == "demo"
    assert cli.main([*argv, "--json"]) == 0
    assert _strict(capsys.readouterr().out)["models"][0]["forms"][0]["form"] == "original"
    assert cli.main(["bench", "--from-json", str(out)]) == 0
    assert "sparse@0.5" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--model", "nope"], "model 'nope': no such file, and not a registered name"),
    (["--model", "demo", "--density", "0"], "densities must lie in (0, 1]"),
    (["--model", "demo", "--density", "half"], "invalid float value"),
    (["--model", "demo", "--preset", "paper"], "--preset: options that time layers"),
    (["--density", "0.5"], "--density: options that need --model"),
    (["--preset", "paper", "--onnx"], "--onnx: options that need --model"),
    (["--preset", "paper", "--image-size", "64"], "--image-size: options that need --model"),
    (["--model", "demo", "--image-size", "0"], "image size must be >= 1"),
    (["--model", "demo", "--from-json", "x.json"], "leave out --model"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    try:
        rc = cli.main(["bench", *argv])
    except SystemExit as exc:  # argparse's own checks
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_docstring_examples(one_thread):
    import doctest

    assert doctest.testmod(bench_models).failed == 0
