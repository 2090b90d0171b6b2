"""Export: densify, ONNX round trip in onnxruntime, the export command, torch.export."""
import json

import pytest
import torch
from torch import nn

from conftest import make_demo_model
from shiftwise.convert.swap import convert_model
from shiftwise import ShiftWiseConv2d
from shiftwise.cli import main
from shiftwise.errors import OutputExistsError
from shiftwise.export import densify, export_onnx


@pytest.fixture(scope="module")
def converted():
    model = make_demo_model()
    return model, convert_model(model)


def test_densify_is_exact_and_leaves_the_model_alone(converted):
    model, sw = converted
    dense = densify(sw)
    assert not any(isinstance(m, ShiftWiseConv2d) for m in dense.modules())
    assert any(isinstance(m, ShiftWiseConv2d) for m in sw.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), sw(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense(x), model(x), rtol=1e-5, atol=1e-5)


def test_onnx_round_trip_in_onnxruntime(converted, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    _, sw = converted
    path = tmp_path / "m.onnx"
    result = export_onnx(sw, path, (1, 3, 32, 32))
    assert result["onnxruntime_max_abs_diff"] < 1e-4 and result["bytes"] == path.stat().st_size
    assert len(result["layers"]) == sum(isinstance(m, ShiftWiseConv2d) for m in sw.modules())
    x = torch.randn(3, 3, 32, 32)  # another batch size: the batch axis is dynamic
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, sw(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(OutputExistsError, match="--force"):
        export_onnx(sw, path, (1, 3, 32, 32))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left behind


def test_torch_export_of_densified(converted):
    _, sw = converted
    dense = densify(sw)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = sw(x)
    program = torch.export.export(dense, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_export_command_from_converted_checkpoint(converted, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model, _ = converted
    src = tmp_path / "slak.pth"
    torch.save({"model": model.state_dict()}, src)
    assert main(["convert", str(src), "-o", str(tmp_path / "sw.pth")]) == 0
    out = tmp_path / "sw.onnx"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "sw.pth"), "-o", str(out), "--image-size", "32"]) == 0
    captured = capsys.readouterr()
    assert "onnxruntime max |logit diff|" in captured.out
    assert "forms: 4 shift-wise layers: " in captured.out  # which form each layer got, and why
    assert captured.err.splitlines() == [f"wrote ONNX model {out}"]
    before = out.read_bytes()
    assert main(["export", str(tmp_path / "sw.pth"), "-o", str(out), "--image-size", "32", "--json"]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(tmp_path / "sw.pth"), "-o", str(out), "--image-size", "32", "--json", "--force"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["output"] == str(out) and result["bytes"] == out.stat().st_size
    assert result["onnxruntime_max_abs_diff"] < 1e-4
    assert main(["export", str(tmp_path / "sw.pth"), "-o", str(out), "--image-size", "32", "--json", "--force",
                 "--form", "shiftwise"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {r["form"] for r in result["layers"]} == {"shiftwise"} and "asked for" in result["forms"]


def test_densify_single_module():
    sw = ShiftWiseConv2d.from_dense(nn.Conv2d(4, 4, (13, 5), padding=(6, 2), groups=4))
    conv = densify(sw)
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (13, 5)
    scratch = ShiftWiseConv2d(4, (13, 5))  # trained tiles may reach past kernel_size: the full extent is kept
    assert densify(scratch).kernel_size == scratch.plan.info.extent == (15, 5)


def test_forms_summary_stays_one_short_line():
    from shiftwise.export import summary
    few = [{"form": "dense", "reason": "small map"}, {"form": "shiftwise", "reason": "sparse"}]
    assert summary(few) == "2 shift-wise layers: 1 dense (small map); 1 shiftwise (sparse)"
    many = [{"form": "dense" if i % 3 else "shiftwise", "reason": f"{i} tile planes"} for i in range(30)]
    line = summary(many)
    assert line.startswith("30 shift-wise layers: 10 shiftwise, 20 dense (") and len(line) < 200
    assert summary([]) == "no shift-wise layers"
