"""In-memory conversion: every module with a to_shiftwise() becomes an equivalent ShiftWiseConv2d.

Models are the real architectures with their real kernels, shrunk in width and depth so a
float64 forward at 224 takes well under a second; random weights, per-layer BN statistics
and O(1) layer scale (``randomize_``), compared at 224 (maps 56..7) and at 64 (maps 16..2,
smaller than every kernel).
"""
import pytest
import torch
from torch import nn

from shiftwise.convert.swap import convert_model, default_tile_size, tile_counts
from shiftwise import ShiftWiseConv2d
from shiftwise.models import create_model, model_config, randomize_
from shiftwise.models._layers import ReparamLargeKernelConv
from shiftwise.models.unireplknet import DilatedReparamBlock

NARROW = dict(dims=(8, 8, 16, 16))
CASES = {
    "slak": ("slak_tiny", dict(depths=(1, 1, 1, 1), width_factor=1.0, **NARROW)),
    "slak-nodecom-nobn": ("slak_tiny", dict(depths=(1, 1, 1, 1), width_factor=1.0, decom=False, bn=False, **NARROW)),
    "replknet": ("replknet_31b", dict(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16))),
    "replknet-merged": ("replknet_31b", dict(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), merged=True)),
    "replknet-xl": ("replknet_xl", dict(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16))),
    "unireplknet": ("unireplknet_t", dict(depths=(1, 1, 2, 1), kernel_sizes=((3,), (13,), (13, 3), (13,)), **NARROW)),
    "unireplknet-deploy": ("unireplknet_t", dict(depths=(1, 1, 2, 1), kernel_sizes=((3,), (13,), (13, 3), (13,)),
                                                 deploy=True, **NARROW)),
    "unireplknet-7to17": ("unireplknet", dict(depths=(1, 1, 2, 1), kernel_sizes=((7,), (9,), (11, 15), (17,)), **NARROW)),
}


def _model(case, dtype=torch.float64):
    name, kwargs = CASES[case]
    return randomize_(create_model(name, **kwargs).to(dtype), calibrate=64).eval()


def _max_diff(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert ya.abs().max() > 0.1  # O(1) logits: a dropped branch or BN would show
    return (ya - yb).abs().max().item()


@pytest.mark.parametrize("case, res", [(c, 64) for c in sorted(CASES)]
                         + [(c, 224) for c in ("slak", "replknet", "unireplknet")])
def test_converted_matches_original_float64(case, res):
    model = _model(case)
    converted = convert_model(model)
    assert len(tile_counts(converted)) == len(_convertible(model)) > 0
    assert not _convertible(converted)
    x = torch.randn(1, 3, res, res, dtype=torch.float64)
    assert _max_diff(model, converted, x) < 1e-8


@pytest.mark.parametrize("case", ["slak", "replknet", "unireplknet"])
def test_tile_size_3(case):
    model = _model(case)
    converted = convert_model(model, tile_size=3)
    assert {v["tile_size"] for v in tile_counts(converted).values()} == {3}
    assert _max_diff(model, converted, torch.randn(1, 3, 64, 64, dtype=torch.float64)) < 1e-8


def test_torch_backend_and_float32():
    model = _model("slak", torch.float32)
    converted = convert_model(model, backend="torch")
    assert {m.backend for m in converted.modules() if isinstance(m, ShiftWiseConv2d)} == {"torch"}
    assert _max_diff(model, converted, torch.randn(1, 3, 224, 224)) < 1e-4


def test_full_width_slak_tiny_stage1_float32():
    """A block of SLaK-T's first stage as released: 124 channels, 51x5 + 5x51 + 5x5 on 56x56 maps."""
    model = randomize_(create_model("slak_tiny", depths=(1, 0, 0, 0)), calibrate=None).eval()
    converted = convert_model(model)
    counts = tile_counts(converted)
    assert [c["tiles_per_channel"] for c in counts.values()] == [21]
    assert {c["channels"] for c in counts.values()} == {124}
    assert _max_diff(model, converted, torch.randn(1, 3, 224, 224)) < 1e-4


# tiles per channel of each stage's layer for the released kernels (counts do not depend on width)
LAYOUTS = [
    ("slak_tiny", None, [21, 21, 21, 5]),  # 51/49/47 x 5 strips + 5x5: 11 + 11 + 1 - 2
    ("slak_tiny", 3, [68, 68, 60, 20]),
    ("replknet_31b", None, [49, 37, 37, 9]),  # 31: 7x7 centred; 29, 27: 6x6 compact + centre tile
    ("replknet_31b", 3, [121, 100, 81, 25]),
    ("replknet_xl", None, [36, 36, 36, 9]),
    ("unireplknet_t", None, [9, 9, 9]),  # 13x13 in 3x3 tiles of 5 (stage 1 has only 3x3 blocks)
    ("unireplknet_t", 3, [25, 25, 25]),
]


@pytest.mark.parametrize("name, tile, expected", LAYOUTS)
def test_tile_counts_of_released_kernels(name, tile, expected):
    small = {"slak_tiny": dict(depths=(1, 1, 1, 1), width_factor=1.0, dims=(4, 4, 4, 4)),
             "replknet_31b": dict(layers=(1, 1, 1, 1), channels=(4, 4, 4, 4)),
             "replknet_xl": dict(layers=(1, 1, 1, 1), channels=(4, 4, 4, 4)),
             "unireplknet_t": dict(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), kernel_sizes=((3,), (13,), (13,), (13,)))}
    converted = convert_model(create_model(name, **small[name]).eval(), tile_size=tile)
    assert [c["tiles_per_channel"] for c in tile_counts(converted).values()] == expected


def test_state_dict_round_trip_and_rebuild_from_config():
    model = _model("unireplknet")
    converted = convert_model(model, tile_size=3)
    meta = model_config(converted)
    assert meta == model_config(model)
    # rebuild without the original weights: architecture, convert with the same tile size, load
    rebuilt = convert_model(create_model(meta["name"], **meta["kwargs"]).double().eval(), tile_size=3)
    rebuilt.load_state_dict(converted.state_dict(), strict=True)
    assert tile_counts(rebuilt) == tile_counts(converted)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert _max_diff(converted, rebuilt, x) == 0.0
    assert "stages.1.0.norm.weight" not in converted.state_dict()
    assert converted.state_dict()["stages.1.0.dwconv.tile_offsets"].dtype == torch.int32


def test_not_inplace_by_default():
    model = _model("slak")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_model(model)
    assert converted is not model
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert convert_model(model, inplace=True) is model
    assert isinstance(model.stages[0][0].large_kernel, ShiftWiseConv2d)
    assert not model.stages[0][0].large_kernel.training


@pytest.mark.parametrize("case", ["replknet", "unireplknet"])
def test_training_mode_is_refused_and_leaves_the_model_as_it_was(case):
    model = _model(case).train()
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"stages\.\S+: in training mode.*model.eval"):
        convert_model(model, inplace=True)
    assert dict(model.named_modules()) == before  # the same module objects, none replaced


def test_refusals():
    model = _model("replknet")
    with pytest.raises(ValueError, match="tile_size must be a positive int"):
        convert_model(model.eval(), tile_size=0)
    converted = convert_model(model)
    with pytest.raises(ValueError, match="already converted"):
        convert_model(converted)
    with pytest.raises(ValueError, match="no large-kernel module"):
        convert_model(nn.Sequential(nn.Conv2d(3, 3, 3)))


def test_any_model_built_from_convertible_modules():
    """Conversion finds to_shiftwise() anywhere, not only in the registered architectures."""
    net = nn.Sequential(nn.Conv2d(3, 8, 1), ReparamLargeKernelConv(8, 13, 3, decompose=True), nn.ReLU(),
                        ReparamLargeKernelConv(8, 9, 3)).double()
    randomize_(net, calibrate=16).eval()
    converted = convert_model(net)
    assert [type(m) for m in converted] == [nn.Conv2d, ShiftWiseConv2d, nn.ReLU, ShiftWiseConv2d]
    assert [c["tiles_per_channel"] for c in tile_counts(converted).values()] == [9, 9]  # 13x3 + 3x13 + 3x3; 9x9
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    assert _max_diff(net, converted, x) < 1e-10


def test_unireplknet_replacement_shares_the_other_layers():
    model = _model("unireplknet")
    block = model.stages[1][0]
    new = block.to_shiftwise(5)
    assert isinstance(new.dwconv, ShiftWiseConv2d) and isinstance(new.norm, nn.Identity)
    assert isinstance(block.dwconv, DilatedReparamBlock) and isinstance(block.norm, nn.BatchNorm2d)  # untouched
    assert new.se is block.se and new.pwconv1 is block.pwconv1 and new.gamma is block.gamma
    assert model.stages[0][0].to_shiftwise(5) is None  # a plain 3x3 block has nothing to convert


def test_training_mode_without_batchnorm_to_fold_is_fine():
    model = _model("replknet-merged").train()  # lkb_reparam has no BN to fold
    converted = convert_model(model)
    assert converted.training
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert _max_diff(model.eval(), converted.eval(), x) < 1e-8


def test_default_tile_sizes():
    assert default_tile_size(create_model("slak_demo")) == 5
    assert default_tile_size(create_model("slak_demo", kernel_size=(31, 15, 9, 7, 3))) == 3
    assert default_tile_size(create_model("replknet_31b", layers=(1, 1, 1, 1), channels=(4, 4, 4, 4))) == 5
    assert default_tile_size(create_model("replknet_xl", layers=(1, 1, 1, 1), channels=(4, 4, 4, 4))) == 5
    assert default_tile_size(create_model("unireplknet_a")) == 5


def _convertible(model):
    return [m for m in model.modules() if isinstance(m, (ReparamLargeKernelConv, DilatedReparamBlock))]
