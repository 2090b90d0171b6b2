"""SW checkpoint files: the official layout (``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``,
as lidc54/shift-wiseConv ``main.py`` saves it, no table buffers) read by ``load_model`` and every
command, its conversion, merged paths, EMA weights, the training form that ``shiftwise train``
writes; bad SW files are one line and exit code 2."""
import argparse
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from shiftwise import cli, load_model
from shiftwise.convert.io import build_model, convert_checkpoint, describe, read_checkpoint
from shiftwise.errors import CheckpointError
from shiftwise.models import create_model, model_config, randomize_, slak, sw_keys, unireplknet
from shiftwise.modules import ShiftWiseConv2d

SMALL = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), kernel_sizes=(13, 11, 9, 7), num_classes=10)
TABLES = ("rep_ids", "ghost_ids", "pad_hv", "idx_identity")  # our buffers; official files have none
# an excerpt of main.py's args: the model's entries (the small nets' kernels; their depths are not SW-T's, so
# args.model does not fix their widths), some of the recipe's, and the evaluation size (32x32 digits)
ARGS = dict(model="ShiftWise_v2_tiny", kernel_size=[13, 11, 9, 7, 3], ghost_ratio=0.23, N_path=2, N_rep=4,
            width_factor=1.0, bn=True, input_size=32, nb_classes=10, Decom=False, sparse=True, sparsity=0.3,
            sparse_type="rep_coarse", sparse_gap=131, only_L=True, epochs=300, lr=4e-3, output_dir="/ckpt")


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    # the reference ops (no kernel compilation) on one thread: tiny models
    monkeypatch.setenv("SHIFTWISE_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small(seed=0, **kwargs) -> torch.nn.Module:
    return randomize_(create_model("sw", **{**SMALL, **kwargs}), seed=seed, calibrate=32).eval()


def _official_sd(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in TABLES}


def _save_official(path, sd, args=ARGS, ema=None) -> str:
    """``sd`` in the layout of the official ``utils.save_model``."""
    obj = {"model": sd,
           "optimizer": {"state": {0: {"step": torch.tensor(1126.0), "exp_avg": torch.zeros(3),
                                       "exp_avg_sq": torch.zeros(3)}},
                         "param_groups": [{"lr": 4e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                                           "lr_scale": 1.0, "params": [0]}]},
           "epoch": 299,
           "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                      "_growth_tracker": 17}}
    if args is not None:
        obj["args"] = argparse.Namespace(**args)
    if ema is not None:
        obj["model_ema"] = ema
    torch.save(obj, path)
    return str(path)


def _x(n=4, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _close(actual, expected, rel):
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= rel * scale, float((actual - expected).abs().max()) / scale


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The writer model and its files: official layout, its conversion, an image folder."""
    root = tmp_path_factory.mktemp("sw")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _small()
        official = _save_official(root / "official.pth", _official_sd(model))
        convert_checkpoint(official, root / "converted.pth")
    finally:
        torch.set_num_threads(threads)
    for cls in ("a", "b"):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(10 * len(cls) + i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / cls / f"{i}.png")
    return {"model": model, "official": official, "converted": str(root / "converted.pth"),
            "images": str(root / "images"), "root": root}


# reading -------------------------------------------------------------------------------------------
def test_official_file_loads_every_key_and_gives_the_logits(files):
    ckpt = read_checkpoint(files["official"])
    assert ckpt.family == "sw" and ckpt.kind == "official" and not ckpt.converted and ckpt.input_size == 32
    assert ckpt.config["kwargs"]["kernel_sizes"] == [13, 11, 9, 7] and ckpt.config["kwargs"]["n_rep"] == 4
    model = build_model(ckpt)
    own = model.state_dict()
    file_sd = torch.load(files["official"], weights_only=False)["model"]
    assert set(own) - set(file_sd) == {k for k in own if k.rsplit(".", 1)[-1] in TABLES}  # only the tables added
    assert all(torch.equal(own[k], v) for k, v in file_sd.items())
    writer = files["model"].state_dict()
    assert all(torch.equal(own[k], writer[k]) for k in own if k.rsplit(".", 1)[-1] in TABLES)  # replayed
    with torch.no_grad():
        _close(model(_x()), files["model"](_x()), 1e-6)


def test_sw_files_are_not_read_as_another_family(files):
    sd = read_checkpoint(files["official"]).state_dict
    assert sw_keys.detect(sd) and not slak.detect(sd) and not unireplknet.detect(sd)
    assert not sw_keys.detect(read_checkpoint("demo").state_dict)  # SLaK's LoRA1/LoRA2 are not SW paths


def test_ema_weights_on_request(tmp_path):
    model, twin = _small(0), _small(1)
    path = _save_official(tmp_path / "ema.pth", _official_sd(model), ema=_official_sd(twin))
    with torch.no_grad():
        _close(load_model(path)(_x()), model(_x()), 1e-6)
        _close(load_model(path, ema=True)(_x()), twin(_x()), 1e-6)


def test_merged_paths_load(tmp_path):
    model = _small()
    sd = _official_sd(model)
    for key in [k for k in sd if ".LoRAs.0." in k]:  # the official merge_branches: one LoRA, the sum of the paths
        sd[key.replace(".LoRAs.0.", ".LoRA.")] = sd.pop(key) + sd.pop(key.replace(".LoRAs.0.", ".LoRAs.1."))
    path = _save_official(tmp_path / "merged.pth", sd)
    ckpt = read_checkpoint(path)
    assert ckpt.config["kwargs"]["merged"] is True
    with torch.no_grad():
        _close(build_model(ckpt)(_x()), model(_x()), 1e-5)


def test_missing_args_fall_back_to_the_released_recipe_with_one_warning(tmp_path, caplog):
    model = _small(kernel_sizes=sw_keys.RELEASED["kernel_sizes"])
    path = _save_official(tmp_path / "bare.pth", _official_sd(model), args=None)
    with caplog.at_level(logging.WARNING, logger="shiftwise"):
        loaded = load_model(path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "released recipe" in warnings[0].getMessage()
    with torch.no_grad():
        _close(loaded(_x()), model(_x()), 1e-6)


def test_args_as_a_dict_are_read_too(tmp_path):
    model = _small()
    path = tmp_path / "dict_args.pth"
    torch.save({"model": _official_sd(model), "args": dict(ARGS)}, path)
    assert read_checkpoint(path).config["kwargs"]["kernel_sizes"] == [13, 11, 9, 7]


@pytest.mark.parametrize("kwargs", [dict(), dict(bn=False), dict(layer_scale_init_value=0.0), dict(merged=True),
                                    dict(n_path=3, n_rep=2, ghost_ratio=0.4, small_kernel=5,
                                         kernel_sizes=(17, 13, 11, 9), depths=(1, 2, 0, 1))])
def test_infer_config_reads_back_the_architecture(kwargs):
    with torch.device("meta"):
        model = create_model("sw", **{**SMALL, **kwargs})
    cfg = model_config(model)["kwargs"]
    hints = dict(kernel_size=cfg["kernel_sizes"] + [cfg["small_kernel"]], ghost_ratio=cfg["ghost_ratio"],
                 N_path=cfg["n_path"], N_rep=cfg["n_rep"], bn=cfg["bn"], width_factor=1.0)
    found = sw_keys.infer_config(model.state_dict(), hints)
    assert found == {"name": "sw", "kwargs": {k: v for k, v in cfg.items() if k != "drop_path_rate"}}


def test_width_factor_against_the_widths():
    with torch.device("meta"):
        sd = create_model("sw_tiny", dims=(8, 16, 32, 64), num_classes=10).state_dict()
    hints = dict(ARGS, kernel_size=[51, 49, 47, 13, 3])
    assert sw_keys.infer_config(sd, {**hints, "width_factor": 0.1})["kwargs"]["dims"] == [8, 16, 32, 64]
    with pytest.raises(CheckpointError, match=r"width_factor 1.0 gives widths \[80, 160, 320, 640\]"):
        sw_keys.infer_config(sd, hints)


# conversion ----------------------------------------------------------------------------------------
def test_converted_file_gives_the_official_logits(files):
    ckpt = read_checkpoint(files["converted"])
    assert ckpt.family == "sw" and ckpt.kind == "converted" and ckpt.tile_size == 3
    assert ckpt.origin_sha256 == read_checkpoint(files["official"]).sha256
    model = load_model(files["converted"])
    assert any(isinstance(m, ShiftWiseConv2d) for m in model.modules())
    with torch.no_grad():
        _close(model(_x()), files["model"](_x()), 1e-4)


def test_training_form_train_file_is_not_converted(tmp_path):
    """``shiftwise train --model sw_*`` keeps the SW layers in their training form: no tile plans."""
    model = _small()
    path = tmp_path / "checkpoint.pt"
    torch.save({"shiftwise": describe(model, "train", weights="model"), "model": model.state_dict()}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.kind == "train" and not ckpt.converted and ckpt.tile_size is None
    loaded = build_model(ckpt)
    assert not any(isinstance(m, ShiftWiseConv2d) for m in loaded.modules())
    with torch.no_grad():
        _close(loaded(_x()), model(_x()), 1e-6)
    report = convert_checkpoint(path, tmp_path / "converted.pth")
    assert report.tiles > 0
    with torch.no_grad():
        _close(load_model(tmp_path / "converted.pth")(_x()), model(_x()), 1e-4)


# commands ------------------------------------------------------------------------------------------
def _run(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


@pytest.mark.parametrize("name", ["official", "converted"])
def test_eval_reads_it(files, capsys, name):
    on_digits = json.loads(_run(capsys, ["eval", files[name], "--limit", "16", "--json"]).out)
    on_folder = json.loads(_run(capsys, ["eval", files[name], "--data", files["images"], "--json"]).out)
    assert on_digits["images"] == 16 and on_folder["images"] == 4


def test_verify_official_file(files, capsys):
    result = json.loads(_run(capsys, ["verify", files["official"], "--limit", "16", "--json"]).out)
    assert result["passed"] and result["max_abs_diff"] < 1e-3


def test_verify_converted_file_against_the_official(files, capsys):
    result = json.loads(_run(capsys, ["verify", files["converted"], "--against", files["official"], "--limit", "16",
                                      "--json"]).out)
    assert result["passed"] and result["agreement"] == 1.0


def test_convert_command(files, capsys, tmp_path):
    _run(capsys, ["convert", files["official"], "-o", str(tmp_path / "sw.pth")])
    with torch.no_grad():
        _close(load_model(tmp_path / "sw.pth")(_x()), files["model"](_x()), 1e-4)


@pytest.mark.parametrize("name", ["official", "converted"])
def test_inspect_reads_it(files, capsys, name):
    ckpt = read_checkpoint(files["converted"])
    out = _run(capsys, ["inspect", files[name]]).out
    assert f"({ckpt.tiles['kept']}/{ckpt.tiles['dense']} tiles)" in out


@pytest.mark.parametrize("name", ["official", "converted"])
def test_export_reads_it(files, capsys, tmp_path, name):
    pytest.importorskip("onnxruntime")
    result = json.loads(_run(capsys, ["export", files[name], "-o", str(tmp_path / "m.onnx"), "--json"]).out)
    assert result["onnxruntime_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("name", ["official", "converted"])
def test_erf_reads_it(files, capsys, name):
    result = json.loads(_run(capsys, ["erf", files[name], "--data", files["images"], "--num-images", "1",
                                      "--image-size", "32", "--json"]).out)
    assert result["compare"]["agrees"]


# bad files -----------------------------------------------------------------------------------------
def _drop(*keys):
    return lambda sd: {k: v for k, v in sd.items() if not any(k.startswith(p) for p in keys)}


BAD = {
    "kernel too large for the planes": (dict(kernel_size=[51, 49, 47, 13, 3]), None,
                                        "args.kernel_size gives it kernel 51 with small kernel 3, 17 planes"),
    "ghost ratio": (dict(ghost_ratio=0.5), None, "args.ghost_ratio 0.5 gives 8 shift-wise channels of 16"),
    "more paths than the file": (dict(N_path=3), None, "args.N_path=3 but the SW layers have 2 path(s)"),
    "small kernel": (dict(kernel_size=[13, 11, 9, 7, 5]), None, "ends with small kernel 5"),
    "no batchnorms": (dict(bn=False), None, "args.bn=False"),
    "malformed ghost ratio": (dict(ghost_ratio="0.23"), None, "args.ghost_ratio='0.23' is not a number"),
    "a missing path": ({}, _drop("stages.2.0.large_kernel.LoRAs.1."), "has 1 path(s)"),
    "no path at all": ({}, _drop("stages.1.0.large_kernel.LoRAs."), "has no path weights"),
    "released recipe assumed": (None, None, "the released recipe was assumed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sw_file_is_one_line_and_exit_2(files, capsys, caplog, tmp_path, case):
    update, edit, expected = BAD[case]
    sd = _official_sd(files["model"])
    path = _save_official(tmp_path / "bad.pth", edit(sd) if edit else sd,
                          args=None if update is None else {**ARGS, **update})
    for argv in (["eval", path, "--limit", "4"], ["convert", path, "-o", str(tmp_path / "out.pth")]):
        with caplog.at_level(logging.WARNING):
            assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0], err
        assert not caplog.records  # no warning line before the error either (the CLI prints warnings)


def test_table_that_differs_from_the_replayed_one_is_refused(files, capsys, tmp_path):
    sd = {k: v.clone() for k, v in files["model"].state_dict().items()}
    sd["stages.0.0.large_kernel.pad_hv"][0, 0] += 3  # our own layout carries the tables: they are checked
    path = _save_official(tmp_path / "bad_table.pth", sd)
    with pytest.raises(CheckpointError, match="pad_hv"):
        load_model(path)
    assert cli.main(["eval", path, "--limit", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pad_hv" in err[0]
