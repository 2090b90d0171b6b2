"""The SW layer and network against the official semantics (``sw_oracle``), and their conversion."""
import json
import os

import numpy as np
import pytest
import torch

import sw_oracle
from shiftwise.convert import convert_model
from shiftwise.models import create_model, list_models, model_config, randomize_
from shiftwise.models.sw import TABLE_BUFFERS, ShiftWiseNet, SWBlock, SWLayer, sw_tables
from shiftwise.modules import ShiftWiseConv2d

DATA = os.path.join(os.path.dirname(__file__), "data")

# (C, K, k, ghost_ratio, n_path, n_rep, map side): maps smaller than the kernel, k of 3 and 5, no
# ghost channels, one path, one copy
LAYERS = [
    (20, 13, 3, 0.23, 2, 4, 9),
    (16, 11, 5, 0.3, 1, 2, 7),
    (12, 9, 3, 0.0, 3, 1, 5),
    (10, 7, 3, 0.5, 2, 3, 4),
    (14, 17, 3, 0.23, 2, 4, 3),
]


def _randomized_layer(c, k_big, k, g, n_path, n_rep, seed=0):
    torch.manual_seed(seed)
    layer = SWLayer(c, k_big, k, g, n_path, n_rep).double()
    with torch.no_grad():
        for bn in (layer.bn_lora1, layer.bn_lora2, layer.bn_small):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        for w in layer.path_weights():
            w.normal_()
    return layer


@pytest.mark.parametrize("c,k_big,k,g,n_path,n_rep,side", LAYERS)
def test_tables_replay_the_official_draws(c, k_big, k, g, n_path, n_rep, side):
    t = sw_tables(c, k_big, k, g, n_rep)
    rep, ghost, pad_hv, idx_identit, _, _ = sw_oracle.official_tables(c, k_big, k, g, n_rep)
    assert t.rep_ids.tolist() == rep and t.ghost_ids.tolist() == ghost
    assert torch.equal(t.pad_hv, pad_hv) and torch.equal(t.idx_identity, idx_identit)


def test_tables_equal_a_recorded_excerpt_of_the_official_ones():
    with open(os.path.join(DATA, "sw_official_tables.json")) as f:
        recorded = json.load(f)
    cases = recorded["layers"]
    assert {c["big_kernel"] for c in cases} >= {51, 13}
    for case in cases:
        t = sw_tables(case["channels"], case["big_kernel"], case["small_kernel"], case["ghost_ratio"], case["n_rep"])
        ghost = case["ghost_ids"]
        assert t.ghost_ids[:len(ghost)].tolist() == ghost
        rows = case["pad_hv"]
        assert t.pad_hv[:len(rows)].tolist() == rows
        assert t.rep_ids.numel() == case["rep_n"] and t.ghost_ids.numel() == case["num_ghost"]
        picks = case["idx_identit"]
        assert t.idx_identity[:len(picks)].tolist() == picks


def test_building_layers_leaves_the_global_random_state_alone():
    # the official constructor reseeds both global generators with 123; ours draws its tables from
    # private ones, so the global state moves only as much as the initialisation of its convs
    torch.manual_seed(7)
    np.random.seed(7)
    for _ in range(2):  # what initialising two paths' convs draws
        torch.nn.Conv2d(30, 30 * 5, 3, padding=2, groups=30, bias=False)
    expected_torch, expected_np = torch.rand(3), np.random.rand(3)
    torch.manual_seed(7)
    np.random.seed(7)
    layer = SWLayer(40, 13, 3, 0.23, n_path=2)
    assert layer.rep_n == 30 and layer.nk == 5
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(np.random.rand(3), expected_np)


@pytest.mark.parametrize("path", ["weights", "planes"])
@pytest.mark.parametrize("c,k_big,k,g,n_path,n_rep,side", LAYERS)
def test_layer_equals_the_official_semantics_forward_and_backward(c, k_big, k, g, n_path, n_rep, side, path):
    layer = _randomized_layer(c, k_big, k, g, n_path, n_rep)
    layer.path = path
    oracle = _randomized_layer(c, k_big, k, g, n_path, n_rep)  # same seed: same weights, own copies
    for batch, mode in ((2, "train"), (1, "eval")):
        layer.train(mode == "train")
        oracle.train(mode == "train")
        x = torch.randn(batch, c, side, side + 1, dtype=torch.float64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = layer(x1)
        ref = sw_oracle.official_layer(x2, oracle.path_weights(), c, k_big, k, g, n_rep,
                                       (oracle.bn_lora1, oracle.bn_lora2, oracle.bn_small))
        assert y.shape == ref.shape == x.shape
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        gy = torch.randn_like(y)
        y.backward(gy)
        ref.backward(gy)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)
        for w, w_ref in zip(layer.path_weights(), oracle.path_weights()):
            torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-9, atol=1e-9)
            w.grad = w_ref.grad = None
        if mode == "train":
            torch.testing.assert_close(layer.bn_lora1.weight.grad, oracle.bn_lora1.weight.grad, rtol=1e-9, atol=1e-9)
            for name in ("bn_lora1", "bn_lora2", "bn_small"):
                ours, theirs = getattr(layer, name), getattr(oracle, name)
                for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                    torch.testing.assert_close(getattr(ours, buffer), getattr(theirs, buffer))


def test_layer_refuses_an_even_small_kernel():
    with pytest.raises(ValueError, match="small_kernel must be odd"):
        SWLayer(16, 13, 4)


def test_merged_paths_compute_the_sum_of_the_paths():
    layer = _randomized_layer(20, 13, 3, 0.23, 2, 4).eval()
    merged = SWLayer(20, 13, 3, 0.23, merged=True).double().eval()
    state = {k: v for k, v in layer.state_dict().items() if ".LoRAs." not in "." + k}
    state["LoRA.weight"] = layer.LoRAs[0].weight + layer.LoRAs[1].weight
    merged.load_state_dict({k: v for k, v in state.items() if not k.startswith("LoRAs.")})
    x = torch.randn(2, 20, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(merged(x), layer(x))


def test_state_dicts_without_tables_replay_them_and_wrong_tables_are_refused():
    layer = SWLayer(20, 13)
    state = {k: v for k, v in layer.state_dict().items() if k not in ("rep_ids", "pad_hv", "ghost_ids",
                                                                        "idx_identity")}
    fresh = SWLayer(20, 13)
    fresh.load_state_dict(state)  # strict: the absent tables are not missing keys
    assert torch.equal(fresh.pad_hv, layer.pad_hv)
    bad = dict(layer.state_dict())
    bad["pad_hv"] = bad["pad_hv"].flip(0)
    with pytest.raises(RuntimeError, match="SW table differs"):
        fresh.load_state_dict(bad)


def _small_net(**kw):
    net = create_model("sw", depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), kernel_sizes=(13, 11, 9, 7),
                       num_classes=10, **kw).double()
    return randomize_(net, calibrate=48).eval()


def test_registry_names_and_official_size():
    assert {"sw_tiny", "sw_small", "sw_base", "sw_large"} <= set(list_models("sw*"))
    with torch.device("meta"):
        tiny = create_model("sw_tiny")
        merged = create_model("sw_tiny", merged=True)
    assert tiny.config.kernel_sizes == (51, 49, 47, 13) and tiny.config.small_kernel == 3
    # the official SW-T: 31.79 M parameters in training form, 31.00 M with the paths merged
    assert round(sum(p.numel() for p in tiny.parameters()) / 1e6, 2) == 31.79
    assert round(sum(p.numel() for p in merged.parameters()) / 1e6, 2) == 31.00
    layer = tiny.stages[0][0].large_kernel
    assert tuple(layer.LoRAs[0].weight.shape) == (1020, 1, 3, 3) and layer.rep_n == 60


def test_conversion_keeps_the_logits_and_the_channel_order():
    net = _small_net()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    ref = net(x)
    sw = convert_model(net)
    block = sw.stages[0][0]
    assert isinstance(block.large_kernel, ShiftWiseConv2d) and isinstance(block.norm, torch.nn.Identity)
    torch.testing.assert_close(sw(x), ref, rtol=1e-10, atol=1e-10)
    assert isinstance(net.stages[0][0].large_kernel, SWLayer)  # the original is left as it was
    torch.testing.assert_close(net(x), ref)


def test_conversion_sums_coincident_tiles_and_drops_zero_ones():
    net = _small_net()
    layer = net.stages[0][0].large_kernel
    nk, rep_n, c = layer.nk, layer.rep_n, layer.channels
    dense = convert_model(net).stages[0][0].large_kernel.plan
    # per shift-wise channel: nk horizontal and nk vertical positions and the centre, where they
    # coincide one tile; a ghost channel one identity tile
    centres = [-p - layer.extra_pad for p in layer.real_pad]
    positions = {(0, c) for c in centres} | {(c, 0) for c in centres} | {(0, 0)}
    per_channel = dense.counts().tolist()
    assert sorted(set(per_channel)) == [1, len(positions)]
    assert per_channel.count(1) == c - rep_n
    with torch.no_grad():  # remove every plane of the first shift-wise channel in every path
        for w in layer.path_weights():
            w[:nk] = 0
        layer.bn_small.running_mean.zero_()
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    sw = convert_model(net)
    first = int(layer.rep_ids[0])
    assert sw.stages[0][0].large_kernel.plan.counts()[first] == 1  # only the residual's centre tile is left
    torch.testing.assert_close(sw(x), net(x), rtol=1e-10, atol=1e-10)


def test_conversion_to_another_tile_size():
    net = _small_net()
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    sw = convert_model(net, tile_size=5)
    assert sw.stages[1][0].large_kernel.small_kernel == 5
    torch.testing.assert_close(sw(x), net(x), rtol=1e-10, atol=1e-10)


def test_converted_state_dict_rebuilds_the_model():
    net = _small_net()
    sw = convert_model(net)
    rebuilt = convert_model(create_model("sw", **model_config(net)["kwargs"]).double().eval())
    rebuilt.load_state_dict(sw.state_dict())
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    torch.testing.assert_close(rebuilt(x), sw(x), rtol=0, atol=0)


def test_block_keys_are_the_official_ones():
    block = SWBlock(16, 13)
    keys = set(block.state_dict())
    official = {"large_kernel.LoRAs.0.weight", "large_kernel.LoRAs.1.weight", "large_kernel.bn_lora1.weight",
                "large_kernel.bn_lora2.running_var", "large_kernel.bn_small.num_batches_tracked", "norm.weight",
                "se.down.weight", "se.up.bias", "pwconv1.1.weight", "pwconv1.1.bias", "act.1.gamma", "act.1.beta",
                "pwconv2.0.weight", "pwconv2.2.running_mean", "gamma"}
    assert official <= keys
    tables = {k for k in keys if k.rsplit(".", 1)[-1] in TABLE_BUFFERS}
    assert tables == {"large_kernel.rep_ids", "large_kernel.ghost_ids", "large_kernel.pad_hv",
                      "large_kernel.idx_identity"}
    assert "pwconv2.0.bias" not in keys and len(keys - tables) == 37  # the official Block's 37


def test_converting_with_a_sync_batch_norm_folds_it():
    net = _small_net()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    expected = convert_model(net)(x)
    block = net.stages[0][0]
    sync = torch.nn.SyncBatchNorm(block.norm.num_features).double().eval()
    sync.load_state_dict(block.norm.state_dict())
    block.norm = sync
    torch.testing.assert_close(convert_model(net)(x), expected)
    block.norm = torch.nn.GroupNorm(1, block.norm.num_features)
    with pytest.raises(ValueError, match="cannot fold a GroupNorm"):
        convert_model(net)
