"""Checkpoint I/O: official layouts in, converted files out, unsafe and broken files refused."""
import argparse
import functools
import hashlib
import os

import pytest
import torch

from shiftwise.convert.io import (CheckpointError, convert_checkpoint, infer_config, load_model, normalize_keys,
                                  read_checkpoint)
from shiftwise.convert.swap import convert_model
from shiftwise import OutputExistsError
from shiftwise.models import create_model, model_config, randomize_

SIZE = 32  # maps smaller than the kernels in every stage


@functools.lru_cache(maxsize=None)  # built once; conversion copies, nothing mutates them
def _slak():
    return randomize_(create_model("slak_demo"), seed=1).eval()


@functools.lru_cache(maxsize=None)  # built once; conversion copies, nothing mutates them
def _replknet():
    return randomize_(create_model("replknet", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64),
                                   large_kernel_sizes=(13, 11, 9, 7), num_classes=10), seed=2).eval()


@functools.lru_cache(maxsize=None)  # built once; conversion copies, nothing mutates them
def _unireplknet():
    return randomize_(create_model("unireplknet", depths=(1, 1, 2, 1), dims=(8, 16, 32, 64),
                                   kernel_sizes=((3,), (13,), (13, 3), (7,)), num_classes=10), seed=3).eval()


def _slak_layout(model, ema_model=None):
    """SLaK's main.py checkpoint: model, optimizer, epoch, scaler, args (an argparse.Namespace)."""
    ckpt = {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3, "params": [0]}]},
            "epoch": 299, "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="SLaK_tiny", input_size=SIZE, kernel_size=[51, 49, 47, 13, 5],
                                       width_factor=1.3, Decom=True, bn=True, nb_classes=10)}
    if ema_model is not None:
        ckpt["model_ema"] = ema_model.state_dict()
    return ckpt


def _mmpretrain_layout(model):
    """mmpretrain's re-hosting of RepLKNet: backbone. prefix, stages.3.norm, head.fc."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            sd["head.fc." + k[5:]] = v
        elif k.startswith("norm."):
            sd["backbone.stages.3.norm." + k[5:]] = v
        else:
            sd["backbone." + k] = v
    return {"meta": {"epoch": 300, "mmpretrain_version": "1.0.0"}, "state_dict": sd}


def _old_slak_name(key):
    return key.replace("LoRA1", "Decom1").replace("LoRA2", "Decom2")


LAYOUTS = {
    "slak": (_slak, _slak_layout),
    "slak_module_decom": (_slak, lambda m: {"model": {"module." + _old_slak_name(k): v
                                                      for k, v in m.state_dict().items()}}),
    "replknet_flat": (_replknet, lambda m: m.state_dict()),
    "replknet_mmpretrain": (_replknet, _mmpretrain_layout),
    "unireplknet": (_unireplknet, lambda m: {"model": m.state_dict()}),
}


def _x(seed=0):
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_official_layouts_round_trip_through_convert_and_load_model(tmp_path, layout):
    make, wrap = LAYOUTS[layout]
    model = make()
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save(wrap(model), src)
    before = (_sha(src), os.stat(src).st_mtime_ns)
    x = _x()
    with torch.no_grad():
        expected = model(x)
        loaded = load_model(src)
        assert not loaded.training
        assert torch.equal(loaded(x), expected)  # the original, rebuilt from shapes alone

        report = convert_checkpoint(src, dst)
        converted = load_model(dst)
        assert not converted.training
        assert report.layers > 0 and report.tiles > 0
        out = converted(x)
        assert (out - expected).abs().max().item() <= 1e-4
        assert torch.equal(out.argmax(1), expected.argmax(1))
        assert torch.allclose(out, convert_model(model)(x), atol=1e-6, rtol=0)
    assert (_sha(src), os.stat(src).st_mtime_ns) == before  # source untouched
    assert sorted(os.listdir(tmp_path)) == ["converted.pth", "official.pth"]  # no temp file left


def test_converted_metadata_rebuilds_without_the_original(tmp_path):
    model = _slak()
    src, dst = tmp_path / "slak.pth", tmp_path / "slak_sw3.pth"
    torch.save(_slak_layout(model), src)
    convert_checkpoint(src, dst, tile_size=3)
    meta = torch.load(dst, weights_only=True)["shiftwise"]
    assert meta["family"] == "slak"
    assert meta["model"] == model_config(model)
    assert meta["tile_size"] == 3
    assert meta["source_sha256"] == _sha(src)
    assert meta["shiftwise_version"] and meta["input_size"] == SIZE
    os.remove(src)
    ckpt = read_checkpoint(dst)
    assert ckpt.converted and ckpt.tile_size == 3
    with torch.no_grad():
        assert (load_model(dst)(_x()) - model(_x())).abs().max().item() <= 1e-4


def test_safetensors_output_carries_metadata_in_header(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    model = _unireplknet()
    src, dst = tmp_path / "uni.pth", tmp_path / "uni.safetensors"
    torch.save({"model": model.state_dict()}, src)
    convert_checkpoint(src, dst)  # format from the suffix
    with safetensors.safe_open(str(dst), framework="pt") as f:
        assert '"family": "unireplknet"' in f.metadata()["shiftwise"]
    with torch.no_grad():
        assert (load_model(dst)(_x()) - model(_x())).abs().max().item() <= 1e-4


def test_ema_weights_on_request(tmp_path):
    model, ema = _slak(), randomize_(create_model("slak_demo"), seed=7).eval()
    src = tmp_path / "slak.pth"
    torch.save(_slak_layout(model, ema), src)
    with torch.no_grad():
        assert torch.equal(load_model(src)(_x()), model(_x()))
        assert torch.equal(load_model(src, ema=True)(_x()), ema(_x()))
    torch.save(_slak_layout(model), src)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_model(src, ema=True)


@pytest.mark.parametrize("case", ["truncated", "empty", "directory", "missing", "text", "not_a_model"])
def test_broken_inputs_give_one_line_errors(tmp_path, case):
    path = tmp_path / "ckpt.pth"
    if case == "truncated":
        torch.save({"model": _slak().state_dict()}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    elif case == "text":
        path.write_text("<html>404 Not Found</html>\n")
    elif case == "not_a_model":
        torch.save({"model": {"conv.weight": torch.zeros(3, 3, 3, 3)}}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_wrong_family_is_named(tmp_path):
    path = tmp_path / "replknet.pth"
    torch.save(_replknet().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"is a RepLKNet checkpoint, not SLaK \(--family slak\)"):
        read_checkpoint(path, family="slak")


def test_mismatch_lists_missing_unexpected_and_wrongly_shaped_keys(tmp_path):
    sd = _slak().state_dict()
    del sd["stages.0.0.norm.weight"]
    sd["stages.0.0.extra.weight"] = torch.zeros(1)
    sd["stages.1.0.pwconv1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("1 missing (stages.0.0.norm.weight)", "1 unexpected (stages.0.0.extra.weight)",
                 "1 wrongly shaped (stages.1.0.pwconv1.weight: file (3, 3) vs model (128, 32))", "Likely cause"):
        assert part in msg


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    model = _replknet()
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    with torch.no_grad():
        assert torch.equal(load_model(path)(_x()), model(_x()))


def test_existing_output_is_refused_and_kept(tmp_path):
    src, dst = tmp_path / "src.pth", tmp_path / "dst.pth"
    torch.save(_slak_layout(_slak()), src)
    dst.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        convert_checkpoint(src, dst)
    assert dst.read_bytes() == b"keep me"
    convert_checkpoint(src, dst, force=True)
    assert read_checkpoint(dst).converted
    with pytest.raises(OutputExistsError, match="is the source"):
        convert_checkpoint(src, src, force=True)


def test_normalize_keys_strips_prefixes_then_applies_the_family_renames():
    t = torch.zeros(1)
    sd, notes = normalize_keys({"module.backbone.downsample_layers.0.0.weight": t,
                                "module.backbone.stages.0.0.large_kernel.Decom1.conv.weight": t})
    assert list(sd) == ["downsample_layers.0.0.weight", "stages.0.0.large_kernel.LoRA1.conv.weight"]
    assert notes == ["stripped 'module.'", "stripped 'backbone.'", "renamed Decom1/Decom2 to LoRA1/LoRA2"]
    sd, notes = normalize_keys({"backbone.stem.0.conv.weight": t, "backbone.stages.3.norm.weight": t,
                                "backbone.stages.0.blocks.0.large_kernel.lkb_origin.conv.weight": t,
                                "head.fc.weight": t})
    assert list(sd) == ["stem.0.conv.weight", "norm.weight", "stages.0.blocks.0.large_kernel.lkb_origin.conv.weight",
                        "head.weight"]
    assert len(notes) == 3
    sd, notes = normalize_keys({"module.Decom1.weight": t, "module.head.fc.weight": t})  # no family: prefixes only
    assert list(sd) == ["Decom1.weight", "head.fc.weight"] and notes == ["stripped 'module.'"]


@pytest.mark.parametrize("name,kwargs", [
    ("slak_tiny", {}), ("slak_small", {}), ("slak_base", {}),
    ("slak_tiny", {"kernel_size": (31, 29, 27, 13, 5)}), ("slak_tiny", {"kernel_size": (61, 59, 57, 13, 5)}),
    ("slak_tiny", {"bn": False}), ("slak_tiny", {"decom": False}), ("slak_small", {"num_classes": 21841}),
    ("replknet_31b", {}), ("replknet_31b", {"merged": True}), ("replknet_31l", {"num_classes": 21841}),
    ("replknet_xl", {}), ("unireplknet_t", {}), ("unireplknet_a", {"deploy": True}), ("unireplknet_xl", {}),
])
def test_released_architectures_are_inferred_from_shapes(name, kwargs):
    model = _meta(name, kwargs)
    family, config = infer_config(model.state_dict())
    assert config["name"] == name
    assert family == name.split("_")[0]
    assert model_config(_meta(name, config["kwargs"]))["kwargs"] == model_config(model)["kwargs"]


def _meta(name, kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs)


def test_infer_config_names_what_it_cannot_read():
    t = torch.zeros(1)
    with pytest.raises(CheckpointError, match="ConvNeXt-style weights without large kernels"):
        infer_config({"downsample_layers.0.0.weight": t, "stages.0.0.dwconv.weight": t})
    with pytest.raises(CheckpointError, match="not a SLaK, RepLKNet, UniRepLKNet or SW state dict"):
        infer_config({"conv1.weight": t})
    with pytest.raises(CheckpointError, match="unknown family 'resnet'; choose one of slak, replknet, unireplknet, sw"):
        infer_config(_slak().state_dict(), family="resnet")
