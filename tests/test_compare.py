"""``shiftwise verify SPARSE --against ORIGIN`` and :func:`shiftwise.compare.compare_checkpoints`:
a sparse file against the checkpoint it came from, checked against evaluations of each model alone."""
import json

import pytest
import torch

from shiftwise import compare, outputs
from shiftwise.cli import main
from shiftwise.convert.io import build_model, convert_checkpoint, describe, read_checkpoint, save_converted
from shiftwise.convert.swap import convert_model
from shiftwise.data import Digits, make_loader
from shiftwise.evaluate import evaluate, evaluate_checkpoint, verify_checkpoint
from shiftwise.models import create_model, randomize_
from shiftwise.modules import ShiftWiseConv2d
from shiftwise.sparse.compact import compact

LIMIT = ["--limit", "32", "--batch-size", "32", "--backend", "torch"]
KEEP = 0.25  # of each layer's tiles, the largest by magnitude


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models run fastest on one thread, and OpenMP teams stall on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torch(model):
    for m in model.modules():
        if isinstance(m, ShiftWiseConv2d):
            m.backend = "torch"  # the reference ops: no kernel compilation
    return model


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo converted, pruned to KEEP of its tiles (a training file, pruned tiles zero) and
    compacted; a from-scratch file; an unrelated official SLaK and its conversion."""
    root = tmp_path_factory.mktemp("compare")
    demo = read_checkpoint("demo")
    convert_checkpoint("demo", root / "converted.pt")
    model = convert_model(build_model(demo))
    dense = sum(m.weight.shape[0] for m in model.modules() if isinstance(m, ShiftWiseConv2d))
    masks, kept = {}, {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, ShiftWiseConv2d):
                norms = layer.weight.abs().flatten(1).sum(1)
                k = max(1, int(KEEP * len(norms)))
                keep = torch.zeros(len(norms), dtype=torch.bool)
                keep[norms.topk(k).indices] = True
                layer.weight[~keep] = 0
                masks[name], kept[name] = keep, k
    save_converted(model, root / "train.pt", describe(model, "train", demo))
    small = compact(model, masks)
    save_converted(small, root / "compact.pt", describe(small, "compact", demo, dense_tiles=dense))
    save_converted(model, root / "scratch.pt", describe(model, "train", None))
    other = randomize_(create_model("slak_demo"), seed=1, calibrate=32).eval()
    torch.save({"model": other.state_dict()}, root / "other.pth")
    convert_checkpoint(root / "other.pth", root / "other_sw.pt")
    return root, kept


def test_accuracy_difference_and_agreement_match_separate_evaluations(files):
    root, kept = files
    run = compare.compare_checkpoints(root / "compact.pt", limit=32, batch_size=16, backend="torch")
    assert run.found_by_hash and run.matches_record and run.origin_ckpt.path == read_checkpoint("demo").path
    alone = {name: evaluate_checkpoint(path, limit=32, batch_size=16, backend="torch").result
             for name, path in (("sparse", root / "compact.pt"), ("origin", "demo"))}
    assert run.sparse.top1 == alone["sparse"].top1 and run.origin.top1 == alone["origin"].top1
    assert run.sparse.top5 == alone["sparse"].top5 and run.origin.top5 == alone["origin"].top5
    assert run.top1_difference == pytest.approx(alone["sparse"].top1 - alone["origin"].top1)
    assert run.top1_difference < 0  # a quarter of the tiles costs accuracy on the digits

    loader = make_loader(Digits("test", read_checkpoint("demo").transform(32)), batch_size=32, limit=32)
    models = [_torch(build_model(read_checkpoint(p))) for p in (root / "compact.pt", "demo")]
    with torch.no_grad():
        preds = [torch.cat([m(x).argmax(1) for x, _ in loader]) for m in models]
    assert run.agreement == pytest.approx(float((preds[0] == preds[1]).double().mean()))
    assert run.origin_shiftwise.top1 == run.origin.top1  # the lossless conversion of the origin

    dense = {n: m.weight.shape[0] for n, m in convert_model(models[1]).named_modules()
             if isinstance(m, ShiftWiseConv2d)}
    assert [(t.name, t.kept, t.dense) for t in run.tiles.layers] == [(n, kept[n], dense[n]) for n in dense]
    assert (run.tiles.kept, run.tiles.dense) == (sum(kept.values()), 1328)
    trained = compare.compare_checkpoints(root / "train.pt", "demo", limit=32, batch_size=32, backend="torch")
    assert trained.tiles.as_dict() == run.tiles.as_dict()  # zero tiles are not alive
    assert trained.sparse.top1 == run.sparse.top1 and trained.agreement == run.agreement


def test_lossless_conversion_agrees_everywhere(files, capsys):
    root, _ = files
    assert main(["verify", str(root / "converted.pt"), *LIMIT, "--json"]) == 0
    out = _strict_json(capsys.readouterr().out)
    assert out["agreement"] == 1.0 and out["top1_difference"] == 0 and out["exact"] and out["passed"]
    assert out["max_abs_diff"] <= 1e-3 and out["origin"]["embedded_demo"] and out["origin"]["found_by_hash"]
    assert out["tiles"]["kept"] == out["tiles"]["dense"] == 1328
    assert out["sparse"]["images"] == out["origin"]["images"] == out["origin_shiftwise"]["images"] == 32
    assert out["speedup"] == pytest.approx(out["sparse"]["throughput"] / out["origin"]["throughput"])


def test_report_and_max_drop_exit_codes(files, capsys):
    root, _ = files
    src = str(root / "compact.pt")
    assert main(["verify", src, *LIMIT]) == 0
    report = capsys.readouterr().out
    assert "found by the sha256 that compact.pt records" in report and "tiles kept: 332/1328 (25.0%)" in report
    assert "prediction agreement:" in report and "what sparsity bought" in report
    assert main(["verify", src, *LIMIT, "--against", "demo", "--json"]) == 0
    drop = -_strict_json(capsys.readouterr().out)["top1_difference"]
    assert drop > 0.5
    assert main(["verify", src, *LIMIT, "--against", "demo", "--max-drop", f"{drop + 0.25}"]) == 0
    assert "PASS: top-1 drops by" in capsys.readouterr().out
    assert main(["verify", src, *LIMIT, "--max-drop", f"{drop - 0.25}"]) == 1
    assert f"FAIL: top-1 drops by {drop:.2f} points" in capsys.readouterr().out


def test_origin_other_than_recorded_warns_and_compares(files, capsys, caplog):
    root, _ = files
    assert main(["verify", str(root / "converted.pt"), *LIMIT, "--against", str(root / "other.pth")]) == 1
    assert "was made from slak_demo.pth" in caplog.text and "comparing them anyway" in caplog.text
    assert "FAIL: top-1 differs" in capsys.readouterr().out  # a conversion must match its origin
    assert main(["verify", str(root / "other_sw.pt"), *LIMIT, "--against", str(root / "other.pth")]) == 0
    assert "PASS: top-1 identical" in capsys.readouterr().out


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    return err


def test_without_a_known_origin_is_one_line_exit_2(files, capsys):
    root, _ = files
    err = _one_line_error(capsys, ["verify", str(root / "other_sw.pt")])
    assert "is already converted (from other.pth); pass --against ORIGIN" in err
    err = _one_line_error(capsys, ["verify", str(root / "scratch.pt")])
    assert "trained from scratch" in err and "--against ORIGIN" in err
    with pytest.raises(compare.NoOriginError, match="other.pth"):
        compare.compare_checkpoints(root / "other_sw.pt")
    with pytest.raises(ValueError, match="compact file of shiftwise train, not an official checkpoint"):
        verify_checkpoint(root / "compact.pt")  # the conversion check: official files only


@pytest.mark.parametrize("argv,text", [
    (["--against", "demo"], "needs SRC"),
    (["demo", "--max-drop", "1"], "--max-drop applies to a converted or trained file"),
    (["{compact}", "--tile-size", "3"], "leave --tile-size out"),
    (["{compact}", "--max-drop", "-1"], "must be >= 0 points"),
    (["{compact}", "--against", "/nonexistent.pth"], "no such file"),
])
def test_bad_arguments_are_one_line_exit_2(files, capsys, argv, text):
    root, _ = files
    argv = [a.format(compact=root / "compact.pt") for a in argv]
    assert text in _one_line_error(capsys, ["verify", *argv])


def test_heads_of_different_sizes_are_refused(files, tmp_path):
    root, _ = files
    model = convert_model(create_model("slak_demo", num_classes=7).eval())
    save_converted(model, tmp_path / "seven.pt", describe(model, "train", read_checkpoint("demo")))
    with pytest.raises(ValueError, match="different numbers of classes"):
        compare.compare_checkpoints(tmp_path / "seven.pt", limit=8)


def test_evaluate_of_each_model_gives_the_library_numbers(files):
    root, _ = files
    run = compare.compare_checkpoints(read_checkpoint(root / "train.pt"), read_checkpoint("demo"), limit=32,
                                      batch_size=16, backend="torch", max_drop=100.0)
    loader = make_loader(Digits("test", read_checkpoint("demo").transform(32)), batch_size=16, limit=32)
    sparse = evaluate(_torch(build_model(read_checkpoint(root / "train.pt"))), loader)
    assert run.sparse.top1 == sparse.top1 and run.sparse.images == 32 and run.passed
    assert _strict_json(outputs.json_text(run.as_dict()))["passed"] and run.report().count("\n") >= 8


def test_tiles_the_masks_keep_at_zero_are_reported_beside_the_alive_ones(files, tmp_path):
    root, kept = files
    model = build_model(read_checkpoint(root / "train.pt"))
    alive = sum(kept.values())
    save_converted(model, tmp_path / "regrown.pt", describe(model, "train", read_checkpoint("demo"),
                                                            kept_tiles=alive + 5))
    run = compare.compare_checkpoints(tmp_path / "regrown.pt", limit=8, backend="torch")
    assert (run.tiles.kept, run.tiles.recorded) == (alive, alive + 5)
    assert f"the file records {alive + 5}" in run.report()
