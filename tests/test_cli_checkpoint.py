"""``shiftwise convert / eval / verify`` and the library functions they run: the embedded demo
passes, bad input is one line and exit 2."""
import json
import os

import pytest
import torch
from PIL import Image

from shiftwise.cli import main
from shiftwise import evaluate
from shiftwise.convert.io import convert_checkpoint
from shiftwise.data import Digits, package_file
from shiftwise.models import create_model, randomize_

DEMO = str(package_file("slak_demo.pth"))


def _one_line_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    return err


def test_verify_embedded_default_passes(capsys):
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "SLaK slak_demo" in out and "PASS" in out and "prediction agreement: 100.00%" in out


def test_verify_json_is_the_only_stdout(capsys):
    assert main(["verify", "--json", "--limit", "64", "--tile-size", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["tile_size"] == 3 and result["original"]["images"] == 64
    assert result["original"]["top1"] == result["converted"]["top1"] and result["max_abs_diff"] <= 1e-3


def test_verify_runs_the_taichi_kernels_unless_told_otherwise(capsys, monkeypatch):
    from shiftwise import functional, ops
    calls = []
    real_fused, real_dense, real_cross = ops.fused_conv, functional.dense_conv, functional.cross_conv
    monkeypatch.setattr(ops, "fused_conv", lambda *a: calls.append("fused") or real_fused(*a))
    monkeypatch.setattr(functional, "dense_conv", lambda *a: calls.append("dense") or real_dense(*a))
    monkeypatch.setattr(functional, "cross_conv", lambda *a: calls.append("cross") or real_cross(*a))
    assert main(["verify", "--json", "--limit", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "taichi"
    assert set(calls) == {"fused"}
    calls.clear()
    # the demo's strips on small maps: two dense strips on a CPU
    assert main(["verify", "--json", "--limit", "16", "--backend", "auto"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "auto" and set(calls) == {"cross"}


def test_verify_exit_code_1_when_the_conversion_is_wrong(capsys, monkeypatch):
    real = evaluate.convert_model

    def broken(model, **kwargs):
        converted = real(model, **kwargs)
        with torch.no_grad():
            converted.head.bias.add_(torch.arange(10.0))  # shifts the predictions
        return converted

    monkeypatch.setattr(evaluate, "convert_model", broken)
    assert main(["verify", "--limit", "32"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """The first 40 test digits as PNG and JPEG files in an ImageFolder."""
    root = tmp_path_factory.mktemp("digits")
    test = Digits("test")
    for i in range(40):
        label = int(test.targets[i])
        (root / str(label)).mkdir(exist_ok=True)
        image = Image.fromarray(test.images[i].permute(1, 2, 0).numpy())
        image.save(root / str(label) / (f"{i}.png" if i % 2 else f"{i}.jpg"), quality=100)
    return root


def test_convert_then_eval_on_an_image_folder(tmp_path, capsys, digit_folder):
    dst = tmp_path / "demo_sw.pth"
    assert main(["convert", DEMO, "-o", str(dst)]) == 0
    captured = capsys.readouterr()
    assert "ShiftWiseConv2d, tile 5" in captured.out
    assert captured.err.splitlines() == [f"wrote converted checkpoint {dst}"]
    assert main(["eval", str(dst), "--data", str(digit_folder), "--workers", "0", "--json"]) == 0
    converted = json.loads(capsys.readouterr().out)
    assert main(["eval", DEMO, "--data", str(digit_folder), "--workers", "0", "--json"]) == 0
    original = json.loads(capsys.readouterr().out)
    assert converted["converted"] and not original["converted"]
    assert converted["images"] == 40 and converted["top1"] == original["top1"] >= 70.0
    assert main(["verify", DEMO, "--data", str(digit_folder), "--workers", "0"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_truncated_file_is_one_line_exit_2(tmp_path, capsys):
    src = tmp_path / "cut.pth"
    data = open(DEMO, "rb").read()
    src.write_bytes(data[: len(data) // 2])
    err = _one_line_error(capsys, ["convert", str(src), "-o", str(tmp_path / "out.pth")])
    assert "truncated or corrupt" in err
    assert not (tmp_path / "out.pth").exists()
    _one_line_error(capsys, ["verify", str(src), "--data", str(tmp_path)])


def test_wrong_family_is_one_line_exit_2(tmp_path, capsys):
    src = tmp_path / "replknet.pth"
    model = randomize_(create_model("replknet", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64),
                                    large_kernel_sizes=(7, 7, 7, 7), num_classes=10))
    torch.save(model.state_dict(), src)
    err = _one_line_error(capsys, ["convert", str(src), "-o", str(tmp_path / "out.pth"), "--family", "slak"])
    assert "is a RepLKNet checkpoint, not SLaK" in err
    not_a_model = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, not_a_model)
    assert "not a SLaK, RepLKNet, UniRepLKNet or SW" in _one_line_error(capsys, ["eval", str(not_a_model), "--data", "x"])


def test_existing_output_is_one_line_exit_2(tmp_path, capsys):
    dst = tmp_path / "taken.pth"
    dst.write_bytes(b"previous")
    err = _one_line_error(capsys, ["convert", DEMO, "-o", str(dst)])
    assert "exists; pass --force" in err and dst.read_bytes() == b"previous"
    assert main(["convert", DEMO, "-o", str(dst), "--force", "--tile-size", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # the JSON report is all there is on stdout
    assert report["tile_size"] == 3 and report["output"] == str(dst) and report["bytes"] == dst.stat().st_size
    assert torch.load(dst, weights_only=True)["shiftwise"]["tile_size"] == 3


def test_library_functions_run_without_the_cli(tmp_path):
    run = evaluate.verify_checkpoint(limit=16, backend="torch")
    assert run.passed and run.as_dict()["source"] == "embedded demo" and run.result.original.images == 16
    dst = tmp_path / "sw.pth"
    convert_checkpoint(DEMO, dst)
    r = evaluate.evaluate_checkpoint(dst, limit=16)
    assert r.ckpt.converted and r.result.images == 16 and "(converted, tile 5)" in r.report()
    assert r.result.top1 == run.result.original.top1
    with pytest.raises(ValueError, match="already converted"):
        evaluate.evaluate_checkpoint(dst, limit=16, tile_size=3)


def test_pickled_code_is_refused_by_the_cli(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    src = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Payload()}, src)
    assert "refused" in _one_line_error(capsys, ["convert", str(src), "-o", str(tmp_path / "out.pth")])
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_imagenet_model_needs_data(tmp_path, capsys):
    src = tmp_path / "replknet.pth"
    torch.save(create_model("replknet", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64),
                            large_kernel_sizes=(7, 7, 7, 7)).state_dict(), src)  # 1000 classes
    assert "--data DIR is needed" in _one_line_error(capsys, ["verify", str(src)])


@pytest.mark.parametrize("argv,text", [
    (["eval", DEMO, "--data", "/nonexistent/dir"], "does not exist"),
    (["verify", "--device", "tpu"], "unknown device"),
    (["verify", "--limit", "0"], "--limit"),
    (["verify", "--tile-size", "0"], "tile_size"),
    (["convert", "/nonexistent.pth", "-o", "x.pth"], "no such file"),
    (["eval", DEMO, "--image-size", "0"], "image size must be a positive int, got 0"),
    (["export", DEMO, "-o", "x.onnx", "--image-size", "0"], "image size must be a positive int, got 0"),
    (["erf", DEMO, "--data", "/nonexistent/dir", "--num-images", "0"], "number of images must be a positive int"),
])
def test_other_bad_input_is_one_line_exit_2(capsys, argv, text):
    assert text in _one_line_error(capsys, argv)
