"""Reference architectures: official key names and shapes, the family registry, configs."""
import dataclasses
import hashlib
import json

import pytest
import torch
from torch import nn

import shiftwise
from shiftwise import ShiftWiseConv2d
from shiftwise.convert.io import convert_checkpoint, load_model, read_checkpoint
from shiftwise.convert.swap import convert_model
from shiftwise.models import (FAMILIES, Family, create_model, list_models, model_config, model_family, randomize_,
                              register_family)

# (name, kwargs, tensors, fingerprint of the sorted "key:shape" lines). Counts and fingerprints
# were taken from models built by the official code (VITA-Group/SLaK models/SLaK.py with
# Decom=True, width_factor=1.3; DingXiaoH/RepLKNet-pytorch replknet.py create_RepLKNet*;
# AILab-CVC/UniRepLKNet unireplknet.py unireplknet_*), so a match means official files load
# with strict=True.
OFFICIAL = [
    ("slak_tiny", {}, 470, "9ab886ffc464da29"),
    ("slak_small", {}, 920, "51e721637b880860"),
    ("slak_base", {}, 920, "58411df44838068f"),
    ("slak_tiny", {"kernel_size": (31, 29, 27, 13, 5)}, 470, "a7afa9bcfd2b30f4"),
    ("slak_tiny", {"kernel_size": (61, 59, 57, 13, 5)}, 470, "a127460f0f3a2565"),
    ("slak_tiny", {"decom": False}, 362, "4a4e520c4ea300f5"),
    ("slak_tiny", {"bn": False}, 200, "b894f8e6599d2d13"),
    ("replknet_31b", {}, 1171, "a898be0e88718b1a"),
    ("replknet_31b", {"merged": True}, 931, "e235bd0d44c6a278"),
    ("replknet_31b", {"num_classes": 21841}, 1171, "63b0916119777fff"),
    ("replknet_31l", {}, 1171, "1d05138acc34ed2f"),
    ("replknet_31l", {"merged": True}, 931, "51fed152257a9325"),
    ("replknet_31l", {"num_classes": 21841}, 1171, "5aab3f0ee08cc643"),
    ("replknet_xl", {}, 1027, "b18ea798e36442cd"),
    ("replknet_xl", {"merged": True}, 931, "8ca966040b534f3e"),
    ("replknet_xl", {"num_classes": 21841}, 1027, "b7400e7f07e76b3f"),
    ("unireplknet_a", {}, 626, "ceaaa1a168c29b6b"),
    ("unireplknet_a", {"deploy": True}, 156, "51dc9d9c6f181d8e"),
    ("unireplknet_f", {}, 626, "4ddfc319f6320646"),
    ("unireplknet_f", {"deploy": True}, 156, "f7893f29da5ed305"),
    ("unireplknet_p", {}, 626, "50f1b2a2bd8af631"),
    ("unireplknet_p", {"deploy": True}, 156, "7f94d0bb03558fd2"),
    ("unireplknet_n", {}, 738, "a44297c316133104"),
    ("unireplknet_n", {"deploy": True}, 178, "083eef3beabf3206"),
    ("unireplknet_t", {}, 1116, "9d040af908831f97"),
    ("unireplknet_t", {"deploy": True}, 321, "98da09e6fa142d70"),
    ("unireplknet_s", {}, 1305, "eb06013302eaa9d7"),
    ("unireplknet_s", {"deploy": True}, 420, "7dd395f289255a60"),
    ("unireplknet_b", {}, 1305, "a4b226b78d347e62"),
    ("unireplknet_b", {"deploy": True}, 420, "dc5664f86c60c16e"),
    ("unireplknet_l", {}, 1305, "6811103b84723aa3"),
    ("unireplknet_l", {"deploy": True}, 420, "fbe1562223117d1d"),
    ("unireplknet_xl", {}, 1305, "58f85bba20dd759b"),
    ("unireplknet_xl", {"deploy": True}, 420, "c922466a10a0f18a"),
]

# a few literal shapes per family, readable when a fingerprint fails
SHAPES = {
    "slak_tiny": {
        "downsample_layers.0.0.weight": (124, 3, 4, 4),
        "downsample_layers.1.1.weight": (249, 124, 2, 2),
        "stages.0.0.gamma": (124,),
        "stages.0.0.large_kernel.LoRA1.conv.weight": (124, 1, 51, 5),
        "stages.0.0.large_kernel.LoRA2.conv.weight": (124, 1, 5, 51),
        "stages.0.0.large_kernel.small_conv.conv.weight": (124, 1, 5, 5),
        "stages.2.8.large_kernel.LoRA1.bn.num_batches_tracked": (),
        "stages.3.2.large_kernel.LoRA2.conv.weight": (998, 1, 5, 13),
        "stages.3.2.pwconv1.weight": (3992, 998),
        "head.weight": (1000, 998),
    },
    "replknet_31b": {
        "stem.0.conv.weight": (128, 3, 3, 3),
        "stem.1.conv.weight": (128, 1, 3, 3),
        "stages.0.blocks.0.large_kernel.lkb_origin.conv.weight": (128, 1, 31, 31),
        "stages.0.blocks.0.large_kernel.small_conv.conv.weight": (128, 1, 5, 5),
        "stages.2.blocks.34.large_kernel.lkb_origin.conv.weight": (512, 1, 27, 27),
        "stages.2.blocks.35.pw1.conv.weight": (2048, 512, 1, 1),
        "stages.2.blocks.35.preffn_bn.running_var": (512,),
        "transitions.2.1.conv.weight": (1024, 1, 3, 3),
        "head.weight": (1000, 1024),
    },
    "replknet_xl": {
        "stages.0.blocks.0.pw1.conv.weight": (384, 256, 1, 1),
        "stages.0.blocks.0.large_kernel.lkb_origin.conv.weight": (384, 1, 27, 27),
        "stages.3.blocks.2.large_kernel.lkb_origin.conv.weight": (3072, 1, 13, 13),
    },
    "unireplknet_t": {
        "downsample_layers.0.0.weight": (40, 3, 3, 3),
        "downsample_layers.0.3.weight": (80, 40, 3, 3),
        "stages.0.0.dwconv.weight": (80, 1, 3, 3),
        "stages.1.0.dwconv.lk_origin.weight": (160, 1, 13, 13),
        "stages.1.0.dwconv.dil_conv_k5_1.weight": (160, 1, 5, 5),
        "stages.1.0.dwconv.dil_conv_k7_2.weight": (160, 1, 7, 7),
        "stages.1.0.dwconv.dil_bn_k3_5.running_mean": (160,),
        "stages.1.0.norm.weight": (160,),
        "stages.1.0.se.down.weight": (40, 160, 1, 1),
        "stages.1.0.act.1.gamma": (1, 1, 1, 640),
        "stages.1.0.act.1.beta": (1, 1, 1, 640),
        "stages.1.0.pwconv2.0.weight": (160, 640),
        "stages.1.0.pwconv2.2.running_var": (160,),
        "stages.2.1.dwconv.weight": (320, 1, 3, 3),
    },
}


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _fingerprint(state_dict):
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state_dict.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name, kwargs, count, fingerprint", OFFICIAL,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw, _, _ in OFFICIAL])
def test_official_keys_and_shapes(name, kwargs, count, fingerprint):
    sd = _meta_model(name, **kwargs).state_dict()
    assert len(sd) == count
    assert _fingerprint(sd) == fingerprint


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_literal_shapes(name):
    sd = _meta_model(name).state_dict()
    for key, shape in SHAPES[name].items():
        assert tuple(sd[key].shape) == shape, key


def test_merged_and_deploy_forms():
    sd = _meta_model("replknet_31b", merged=True).state_dict()
    assert tuple(sd["stages.0.blocks.0.large_kernel.lkb_reparam.bias"].shape) == (128,)
    assert not any("lkb_origin" in k or "small_conv" in k for k in sd)
    sd = _meta_model("unireplknet_t", deploy=True).state_dict()
    assert tuple(sd["stages.1.0.dwconv.lk_origin.bias"].shape) == (160,)
    assert tuple(sd["stages.0.0.dwconv.bias"].shape) == (80,)
    assert tuple(sd["stages.1.0.pwconv2.0.bias"].shape) == (160,)
    assert not any(k.endswith((".gamma", ".beta", "norm.weight")) and "stages" in k and "act" not in k for k in sd)
    assert not any("dil_" in k or "origin_bn" in k for k in sd)


def test_registry_names():
    names = list_models()
    for n in ["slak_tiny", "slak_small", "slak_base", "slak_demo", "replknet_31b", "replknet_31l", "replknet_xl"]:
        assert n in names
    assert list_models("unireplknet_*") == sorted(f"unireplknet_{v}" for v in "a f p n t s b l xl".split())
    assert shiftwise.create_model is create_model


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'slak_huge'"):
        create_model("slak_huge")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['Decom'\]"):
        create_model("slak_tiny", Decom=True)
    with pytest.raises(ValueError, match="odd"):
        create_model("slak_tiny", kernel_size=(51, 49, 47, 12, 5))
    with pytest.raises(ValueError, match="small_kernel"):
        create_model("replknet_31b", small_kernel=4)
    with pytest.raises(ValueError, match="no default kernel_sizes"):
        create_model("unireplknet_t", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="do not match depths"):
        create_model("unireplknet_t", kernel_sizes=((3,), (13,), (13,), (13,)))
    with pytest.raises(ValueError, match="unsupported block kernel sizes"):
        create_model("unireplknet", depths=(1, 1, 1, 1), kernel_sizes=((3,), (13,), (19,), (13,)))


@pytest.mark.parametrize("name, kwargs", [("slak_tiny", {"num_classes": 10}), ("replknet_xl", {"merged": True}),
                                          ("unireplknet_a", {"deploy": True}), ("slak_demo", {})])
def test_model_config_rebuilds(name, kwargs):
    model = _meta_model(name, **kwargs)
    meta = json.loads(json.dumps(model_config(model)))
    assert meta["name"] == name
    rebuilt = _meta_model(meta["name"], **meta["kwargs"])
    assert rebuilt.config == model.config
    assert _fingerprint(rebuilt.state_dict()) == _fingerprint(model.state_dict())
    assert model_family(rebuilt) == name.split("_")[0]


def test_layer_scale_init_is_official():
    model = create_model("slak_demo")
    assert torch.all(model.stages[0][0].gamma == 1e-6)
    model = create_model("unireplknet", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_sizes=((3,),) * 4)
    assert torch.all(model.stages[0][0].gamma == 1e-6)


def test_demo_model_is_small_and_runs_on_32x32():
    model = create_model("slak_demo").eval()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model = create_model("slak_demo", in_chans=1, stem_kernel=4, stem_stride=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_randomize_gives_order_one_logits_and_layer_scale():
    model = create_model("replknet", layers=(1, 1, 2, 1), channels=(8, 8, 16, 16))
    randomize_(model, calibrate=64).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(y).all() and 0.05 < y.abs().max() < 100
    bn = model.stages[0].blocks[0].large_kernel.lkb_origin.bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    slak = randomize_(create_model("slak_demo"), calibrate=32)
    assert slak.stages[0][0].gamma.min() >= 0.5 and slak.training


# a family registered from outside: one file's worth of code plus one register_family call -------------
@dataclasses.dataclass(frozen=True)
class ToyConfig:
    channels: int = 8
    kernel_size: int = 11
    num_classes: int = 10


class ToyLargeKernel(nn.Module):
    """A K x K depthwise conv + BN beside a 3 x 3 one, as RepLKNet's, but under the family's own names."""

    default_tile_size = 3

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.big = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.big_bn = nn.BatchNorm2d(channels)
        self.small = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)

    def forward(self, x):
        return self.big_bn(self.big(x)) + self.small(x)

    def to_shiftwise(self, tile_size, layout="auto", backend=None):
        return ShiftWiseConv2d.from_branches([(self.big, self.big_bn), (self.small, None)], tile_size, layout=layout,
                                             backend=backend)


class Toy(nn.Module):
    config_class = ToyConfig

    def __init__(self, **kwargs):
        super().__init__()
        cfg = self.config = ToyConfig(**kwargs)
        self.toy_stem = nn.Conv2d(3, cfg.channels, 2, stride=2)
        self.lk = ToyLargeKernel(cfg.channels, cfg.kernel_size)
        self.head = nn.Linear(cfg.channels, cfg.num_classes)

    def forward(self, x):
        return self.head(self.lk(self.toy_stem(x)).mean((-2, -1)))


def _toy_rename(sd):
    if not any(k.startswith("old_lk.") for k in sd):
        return sd, []
    return {("lk." + k[len("old_lk."):] if k.startswith("old_lk.") else k): v for k, v in sd.items()}, ["old_lk"]


TOY = Family(
    name="toy", title="Toy", model_class=Toy, variants={"toy_small": dict(channels=4)},
    detect=lambda sd: "toy_stem.weight" in sd,
    infer_config=lambda sd, hints: {"name": "toy", "kwargs": dict(channels=sd["toy_stem.weight"].shape[0],
                                                           kernel_size=sd["lk.big.weight"].shape[-1],
                                                           num_classes=sd["head.weight"].shape[0])},
    rename_keys=_toy_rename)


@pytest.fixture
def toy_family():
    register_family(TOY)
    yield TOY
    del FAMILIES["toy"]


def test_a_family_is_one_registry_entry(toy_family, tmp_path):
    """Registered, the toy family is built by name, converted, read from a file and converted as a file."""
    assert "toy" in FAMILIES and "toy_small" in list_models()
    assert create_model("toy_small").config.channels == 4
    model = randomize_(create_model("toy", channels=6).double(), calibrate=24).eval()
    converted = convert_model(model)
    assert isinstance(converted.lk, ShiftWiseConv2d) and converted.lk.small_kernel == 3  # its default_tile_size
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() < 1e-10

    src, dst = tmp_path / "toy.pth", tmp_path / "toy_sw.pth"
    model = model.float()
    old_names = {k.replace("lk.", "old_lk.", 1) if k.startswith("lk.") else k: v
                 for k, v in model.state_dict().items()}
    torch.save({"model": {"module." + k: v for k, v in old_names.items()}}, src)
    ckpt = read_checkpoint(src)
    assert (ckpt.family, ckpt.description, ckpt.notes) == ("toy", "Toy toy", ["stripped 'module.'", "old_lk"])
    report = convert_checkpoint(src, dst, tile_size=5)
    assert report.family == "toy" and report.tile_size == 5 and report.layers == 1
    x = x.float()
    with torch.no_grad():
        assert torch.equal(load_model(src)(x), model(x))
        assert (load_model(dst)(x) - model(x)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="already registered"):
        register_family(TOY)
