"""Sparse training of SW networks in their training form: plane masks shared by the paths or one per
path (the official recipe, aligned every few updates), and the files of ``shiftwise train --model sw``."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import shiftwise
from shiftwise import cli
from shiftwise.convert import convert_model
from shiftwise.convert.io import read_checkpoint, tile_counts
from shiftwise.models import create_model
from shiftwise.models.sw import TABLE_BUFFERS
from shiftwise.sparse import SparseConfig, TileMasker, compact, plane_tiles, snip_scores
from shiftwise.sparse.train_data import load_data
from shiftwise.sparse.trainer import RECIPES, load_checkpoint

# Four SW layers of 8 or 16 channels (6 or 12 shift-wise), 2 paths, kernels of 2 or 3 planes per channel.
NET = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), kernel_sizes=(7, 7, 5, 5), num_classes=4)
# For `shiftwise train`: layer scales of 1, so that the SW layers weigh on the logits.
KWARGS = {"depths": [1, 1, 1, 1], "dims": [8, 16, 16, 16], "kernel_sizes": [9, 7, 5, 5], "n_rep": 2,
          "layer_scale_init_value": 1.0}
TRAIN = ["train", "--model", "sw", "--model-kwargs", json.dumps(KWARGS), "--batch-size", "16", "--backend", "torch",
         "--quiet", "--eval-every", "100"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def net(seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model("sw", **{**NET, **kw}).train()
    for _, m in sw_layers(model):
        m.backend = "torch"
    return model


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def sw_layers(model):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "SWLayer"]


def path_masks(masker, name, paths):
    """A layer's mask as ``(paths, P)`` (a shared mask repeated)."""
    m = masker.masks[name]
    return m.view(paths, -1) if masker.config.mask_paths == "each" else m.expand(paths, -1)


def train_steps(model, masker, opt, steps, check):
    x, y = batch()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        old = {k: v.clone() for k, v in masker.masks.items()}
        stats = masker.step(opt)
        check(model, masker, opt, old, stats)


def zero_where_masked(model, masker, paths=2):
    for name, layer in sw_layers(model):
        for w, m in zip(layer.path_weights(), path_masks(masker, name, paths)):
            assert bool((w.detach()[~m] == 0).all()), name


# masks --------------------------------------------------------------------------------------------
def test_shared_masks_zero_the_same_planes_in_every_path():
    model = net()
    masker = TileMasker(model, SparseConfig(density=0.4, schedule="constant", total_steps=20, update_every=2,
                                            growth="gradient"))
    assert [l.kind for l in masker.layers] == ["planes"] * 4  # the SW layers only, each conv of them not on its own
    masker.init_masks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    regrown = []

    def check(model, masker, opt, old, stats):
        for name, layer in sw_layers(model):
            weights, mask = layer.path_weights(), masker.masks[name]
            assert mask.shape == (weights[0].shape[0],)  # one bit per plane
            zero = [w.detach().flatten(1).eq(0).all(1) for w in weights]
            assert bool((zero[0][~mask] & zero[1][~mask]).all())
            grown = mask & ~old[name]
            if stats is not None and grown.any():  # regrown planes start at zero, with no Adam state, in every path
                regrown.append(int(grown.sum()))
                for w in weights:
                    assert bool((w.detach()[grown] == 0).all())
                    assert bool((opt.state[w]["exp_avg"][grown] == 0).all())
                    assert bool((opt.state[w]["exp_avg_sq"][grown] == 0).all())
        assert masker.density() == pytest.approx(masker.target_density(), abs=1e-12)

    train_steps(model, masker, opt, 6, check)
    assert regrown  # prune and regrow happened


def _set_weights(layer, scale):
    """Path weights whose per-plane L1 ranks differ per path and on the sum."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w, s in zip(layer.path_weights(), scale):
            w.copy_(torch.rand(w.shape, generator=g) * s)


@pytest.mark.parametrize("aligned", [True, False])
def test_per_path_update_and_alignment(aligned):
    # dense at step 0, half the planes at the update of step 3; no exchange (prune rate 0), so the
    # update keeps the planes of largest L1: on the sum over paths when aligned, else per path
    model = net()
    cfg = SparseConfig(density=0.5, schedule="linear", schedule_start=0, schedule_end=3, update_every=3,
                       prune_rate=0.0, prune_rate_floor=0.0, init="uniform", mask_paths="each",
                       align_every=1 if aligned else 2, total_steps=100)
    masker = TileMasker(model, cfg)
    masker.init_masks()
    name, layer = sw_layers(model)[0]
    p = layer.path_weights()[0].shape[0]
    assert masker.masks[name].shape == (2 * p,) and bool(masker.masks[name].all())
    _set_weights(layer, (1.0, 3.0))
    l1 = torch.stack([w.detach().abs().flatten(1).sum(1) for w in layer.path_weights()])
    k = masker._scheduled_counts(3)[0]
    assert k == p // 2
    masker.step_count = 3
    assert masker.is_aligned(3) == aligned
    masker.update()
    got = masker.masks[name].view(2, p)

    def top(score):
        keep = torch.zeros(p, dtype=torch.bool)
        keep[score.topk(k).indices] = True
        return keep

    if aligned:
        want = top(l1.sum(0))
        assert torch.equal(got[0], want) and torch.equal(got[1], want)
        assert not torch.equal(want, top(l1[0]))  # the sum, not path 0 alone, chose it
    else:
        assert torch.equal(got[0], top(l1[0])) and torch.equal(got[1], top(l1[1]))
        assert not torch.equal(got[0], got[1])
    zero_where_masked(model, masker)


def test_per_path_masks_drift_then_align_every_few_updates():
    model = net()
    cfg = SparseConfig(density=0.5, schedule="constant", update_every=1, align_every=3, growth="random",
                       prune_rate=0.3, prune_rate_floor=0.3, mask_paths="each", total_steps=100, init="erk")
    masker = TileMasker(model, cfg)
    masker.init_masks()
    for name, layer in sw_layers(model):  # every path starts with the same mask
        m = path_masks(masker, name, 2)
        assert torch.equal(m[0], m[1])
    seen = {"aligned": 0, "apart": 0}

    def check(model, masker, opt, old, stats):
        step = masker.step_count
        for name, layer in sw_layers(model):
            m = path_masks(masker, name, 2)
            if step % 3 == 0:  # (step // 1) % 3 == 0: path 0's mask copied to path 1
                assert torch.equal(m[0], m[1])
                seen["aligned"] += 1
            elif not torch.equal(m[0], m[1]):
                seen["apart"] += 1
            assert [int(r.sum()) for r in m] == [masker.final_counts[[l.name for l in masker.layers].index(name)]] * 2
        assert masker.density() == pytest.approx(0.5, abs=0.02)
        zero_where_masked(model, masker)

    train_steps(model, masker, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 6, check)
    assert seen["aligned"] == 8 and seen["apart"] > 0


def test_snip_scores_per_plane_and_path_and_allocation():
    model = net()
    x, y = batch()
    scores = snip_scores(model, lambda: F.cross_entropy(model(x), y))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name, layer in sw_layers(model):
        want = torch.cat([(w * w.grad).abs().flatten(1).sum(1) for w in layer.path_weights()])
        torch.testing.assert_close(scores[name], want.detach(), rtol=1e-5, atol=0)
    model.zero_grad()
    for paths in ("shared", "each"):
        masker = TileMasker(model, SparseConfig(density=0.7, init="snip", schedule="constant", mask_paths=paths))
        masker.init_masks(scores)
        rows = [l.rows for l in masker.layers]
        assert abs(sum(masker.final_counts) - 0.7 * sum(rows)) <= 1  # one budget over equal-sized planes
        assert masker.density() == pytest.approx(sum(masker.final_counts) / sum(rows), abs=1e-12)


@pytest.mark.parametrize("paths", ["shared", "each"])
def test_compact_converts_without_the_pruned_planes(paths):
    model = net(layer_scale_init_value=1.0)
    masker = TileMasker(model, SparseConfig(density=0.3, init="uniform", mask_paths=paths))
    masker.init_masks()
    x, _ = batch()
    model(x)  # batch statistics into the BatchNorms
    small = compact(model, masker, backend="torch")
    model.eval()
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    kept = {n: plane_tiles(m, masker.alive_rows(n)) for n, m in sw_layers(model)}
    assert tile_counts(small.state_dict())[0] == sum(kept.values())
    with torch.no_grad():  # every plane alive: the tiles of the unpruned conversion
        for _, m in sw_layers(model):
            for w in m.path_weights():
                w.fill_(1.0)
    dense = tile_counts(convert_model(model).state_dict())[0]
    assert dense == sum(plane_tiles(m) for _, m in sw_layers(model)) > sum(kept.values())


# shiftwise train ---------------------------------------------------------------------------------
def run(args, capsys=None):
    code = cli.main([*TRAIN, *args])
    assert code == 0, capsys.readouterr().err if capsys else code


@pytest.fixture(scope="module")
def sw_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sw")
    run(["--steps", "6", "--update-every", "2", "--recipe", "sw-official", "--density", "0.3",
         "--align-every", "2", "-o", str(out)])
    return out


def test_train_writes_training_form_and_compact(sw_run):
    ckpt = load_checkpoint(sw_run / "checkpoint.pt")
    assert ckpt["args"]["mask_paths"] == "each" and ckpt["args"]["init"] == "snip"
    assert not any(k.endswith("tile_offsets") for k in ckpt["model"])  # the training form
    masks = ckpt["sparse"]["masks"]
    for name, m in masks.items():
        p = ckpt["model"][name + ".LoRAs.0.weight"].shape[0]
        assert m.shape == (2 * p,)
        for i, path in enumerate(m.view(2, p)):
            assert bool((ckpt["model"][f"{name}.LoRAs.{i}.weight"][~path] == 0).all())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == pytest.approx(0.3 * sum(m.numel() for m in masks.values()), abs=len(masks) * 2)
    done = [json.loads(line) for line in (sw_run / "metrics.jsonl").read_text().splitlines()][-1]

    trained = shiftwise.load_model(sw_run / "checkpoint.pt")  # eval mode, training form
    small = shiftwise.load_model(sw_run / "compact.pt")
    assert len(sw_layers(trained)) == 4 and not sw_layers(small)
    (x, _), _ = load_data("digits", 32, [0.5] * 3, [0.5] * 3, False)[1:]
    x = x[:32]
    with torch.no_grad():
        a, b = trained(x), small(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    info = read_checkpoint(sw_run / "compact.pt")
    alive = tile_counts(info.state_dict)[0]
    assert info.kind == "compact" and info.tiles["kept"] == alive == done["tiles"]["kept"]
    assert info.tiles["dense"] == done["tiles"]["dense"] > alive
    assert read_checkpoint(sw_run / "checkpoint.pt").tiles == info.tiles


def test_resume_is_bitwise_identical(tmp_path):
    flags = ["--steps", "6", "--update-every", "1", "--mask-paths", "each", "--align-every", "2",
             "--density", "0.5", "--growth", "random", "--schedule", "constant"]
    run([*flags, "-o", str(tmp_path / "full")])
    run([*flags, "-o", str(tmp_path / "cut"), "--stop-after", "3"])
    run(["-o", str(tmp_path / "cut"), "--resume"])
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k in a["sparse"]["masks"]:
        assert torch.equal(a["sparse"]["masks"][k], b["sparse"]["masks"][k]), k
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_recipe_sets_the_official_flags_and_later_flags_win():
    parser = cli.build_parser()
    args = parser.parse_args([*TRAIN, "--recipe", "sw-official", "--align-every", "7"])
    for key, value in RECIPES["sw-official"].items():
        assert getattr(args, key) == (7 if key == "align_every" else value), key
    assert (args.density, args.mask_paths, args.init, args.growth) == (0.7, "each", "snip", "random")
    before = parser.parse_args([*TRAIN, "--density", "0.5", "--recipe", "sw-official"])
    assert before.density == 0.5 and before.update_every == 100


def test_another_tile_size_refused(tmp_path, capsys):
    assert cli.main([*TRAIN, "--steps", "1", "--tile-size", "5", "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tile-size 5" in err[0] and not (tmp_path / "run").exists()


def test_pretrained_official_file_trains_the_training_form(tmp_path):
    model = create_model("sw", **{**KWARGS, "num_classes": 10})
    sd = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in TABLE_BUFFERS}
    args = argparse.Namespace(model="ShiftWise_v2_tiny", kernel_size=[9, 7, 5, 5, 3], ghost_ratio=0.23, N_path=2,
                              N_rep=2, width_factor=1.0, bn=True, input_size=32)
    torch.save({"model": sd, "optimizer": {}, "epoch": 1, "scaler": {}, "args": args}, tmp_path / "sw.pth")
    code = cli.main(["train", "--pretrained", str(tmp_path / "sw.pth"), "--steps", "2", "--batch-size", "16",
                     "--backend", "torch", "--quiet", "--density", "0.5", "-o", str(tmp_path / "run")])
    assert code == 0
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert any(k.endswith("LoRAs.1.weight") for k in ckpt["model"])
    assert read_checkpoint(tmp_path / "run" / "compact.pt").origin_sha256 is not None


@pytest.mark.slow
def test_torchrun_two_ranks_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENABLE_TAICHI_HEADER_PRINT": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shiftwise", *TRAIN, "--steps", "4", "--update-every", "2", "--mask-paths", "each",
           "--align-every", "2", "--density", "0.5", "--device", "cpu", "-o", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert done["event"] == "done" and done["world_size"] == 2 and done["ranks_identical"]
    assert done["density"] == pytest.approx(0.5, abs=0.02)
