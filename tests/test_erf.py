"""Effective receptive field: the gradient map, area ratios, and original vs converted."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import make_demo_model
from shiftwise import erf
from shiftwise.cli import main
from shiftwise.convert.swap import convert_model
from shiftwise.erf import area_ratios, erf_checkpoint, erf_map, input_gradient


class _OneConv(nn.Module):
    def __init__(self, kernel):
        super().__init__()
        c, k = kernel.shape[0], kernel.shape[-1]
        conv = nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
        conv.weight.data.copy_(kernel[:, None])
        self.stages = nn.ModuleList([conv])

    def forward(self, x):
        return self.stages[0](x).mean((2, 3))


def test_input_gradient_of_one_conv_is_its_kernel():
    kernel = torch.rand(3, 5, 5, dtype=torch.float64) - 0.2  # some negative taps: ReLU removes them
    model = _OneConv(kernel).double().eval()
    x = torch.rand(2, 3, 11, 9, dtype=torch.float64) + 5  # features positive everywhere
    grad = input_gradient(model, x)
    expected = torch.zeros(11, 9, dtype=torch.float64)
    for c in range(3):
        expected[3:8, 2:7] += torch.relu(kernel[c])  # centre (5, 4), reach 2
    assert torch.allclose(grad, expected.expand(2, -1, -1))


def test_area_ratios_of_known_maps():
    point = np.zeros((21, 21))
    point[10, 10] = 1.0
    assert {t: v["side"] for t, v in area_ratios(point).items()} == {"0.2": 3, "0.3": 3, "0.5": 3, "0.99": 3}
    flat = np.ones((20, 20))
    r = area_ratios(flat)
    # a flat map: a centred square of side s holds (s/20)^2 of the total
    for t, v in r.items():
        assert (v["side"] / 20) ** 2 > float(t) and ((v["side"] - 2) / 20) ** 2 <= float(t)
    assert r["0.99"]["ratio"] == 1.0


def test_converted_model_has_the_same_erf():
    model = make_demo_model()
    converted = convert_model(model).eval()
    images = torch.randn(3, 3, 48, 48)
    loader = [(images[:2], None), (images[2:], None)]
    a = erf_map(model, loader, num_images=3)
    b = erf_map(converted, loader, num_images=3)
    assert a.shape == (48, 48) and a.max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * a.max())
    assert area_ratios(a) == area_ratios(b)
    with pytest.raises(ValueError, match="eval mode"):
        erf_map(model.train(), loader)


def test_erf_command(tmp_path, capsys, monkeypatch):
    model = make_demo_model()
    ckpt = tmp_path / "slak_demo.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        rng = np.random.default_rng(len(cls))
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / "0.png")
    plot, npy = tmp_path / "erf.png", tmp_path / "erf.npy"
    code = main(["erf", str(ckpt), "--data", str(tmp_path / "data"), "--num-images", "2", "--image-size", "32",
                 "--json", "--plot", str(plot), "-o", str(tmp_path / "erf")])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 0
    assert out["compare"]["max_rel_diff"] < 1e-4 and out["compare"]["agrees"]
    assert out["model"]["area_ratio"] == out["compare"]["area_ratio"]
    assert plot.stat().st_size > 1000
    assert captured.err.splitlines() == [f"wrote contribution map {npy}", f"wrote heatmap {plot}"]
    alone = erf_checkpoint(ckpt, tmp_path / "data", num_images=2, image_size=32, compare=False)
    assert alone.compare is None and alone.agrees and not alone.converted
    np.testing.assert_array_equal(np.load(npy), alone.map)
    assert area_ratios(alone.map) == out["model"]["area_ratio"]

    def wrong_conversion(m, **kwargs):  # a conversion that changes the model: exit 1, also with --json
        other = copy.deepcopy(m)
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.5)
        return other

    monkeypatch.setattr(erf, "convert_model", wrong_conversion)
    code = main(["erf", str(ckpt), "--data", str(tmp_path / "data"), "--num-images", "1", "--image-size", "32",
                 "--json"])
    assert code == 1 and not json.loads(capsys.readouterr().out)["compare"]["agrees"]
