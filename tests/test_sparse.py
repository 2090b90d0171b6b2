"""Sparse training: schedules, allocation, masks under optimizers and AMP, prune/regrow, compaction."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shiftwise import ShiftWiseConv2d
from shiftwise.sparse import (DensitySchedule, SparseConfig, TileMasker, allocate_counts, channel_histogram, compact,
                              cosine_prune_rate, erk_densities, snip_densities, snip_scores)


@pytest.fixture(autouse=True)
def _one_thread(request):
    # Tiny models run fastest on one thread, and a busy machine stalls OpenMP teams. Taichi reads the
    # thread count once, when it starts, so a test that may start it keeps the default.
    if "taichi" in request.node.name:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny(nn.Module):
    """Two shift-wise layers (square and tall kernels) between a 1x1 stem and a linear head."""

    def __init__(self, c=8, n=3, backend="torch"):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 1)
        self.sw1 = ShiftWiseConv2d(c, 9, n, backend=backend)
        self.sw2 = ShiftWiseConv2d(c, (13, 5), n, backend=backend)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        # the shift-wise layers take float32 (under autocast they are a float32 op)
        x = self.stem(x).float()
        x = x + F.gelu(self.sw1(x))
        x = x + F.gelu(self.sw2(x))
        return self.head(x.mean((2, 3)))


def batch(n=16, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


def masked_tiles_zero(model, masker):
    return all(bool((model.get_submodule(l.name).weight[~masker.masks[l.name]] == 0).all()) for l in masker.layers)


def train(model, masker, opt, steps, x, y, scaler=None, autocast=False):
    stats = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        s = masker.step(opt)
        if s is not None:
            stats.append(s)
        assert masked_tiles_zero(model, masker)
    return stats


# schedules ---------------------------------------------------------------------------------------
def test_schedule_values():
    s = DensitySchedule("gradual", start=10, end=30)
    assert [s.remaining(t) for t in (0, 10, 20, 30, 99)] == [1.0, 1.0, 0.125, 0.0, 0.0]
    lin = DensitySchedule("linear", start=0, end=10)
    assert lin.density(0.2, 5) == pytest.approx(0.6)
    assert DensitySchedule("constant").density(0.2, 0) == 0.2
    assert cosine_prune_rate(0, 100, 0.5, 0.005) == 0.5
    assert cosine_prune_rate(100, 100, 0.5, 0.005) == pytest.approx(0.005)
    assert cosine_prune_rate(50, 100, 0.5, 0.005) == pytest.approx(0.2525)


@pytest.mark.parametrize("schedule", ["constant", "gradual", "linear"])
@pytest.mark.parametrize("init", ["uniform", "erk", "snip"])
def test_schedule_reaches_target(schedule, init):
    model = Tiny()
    x, y = batch()
    cfg = SparseConfig(density=0.3, init=init, schedule=schedule, schedule_start=2,
                       schedule_end=13 if schedule != "constant" else 0, total_steps=20, update_every=4)
    masker = TileMasker(model, cfg)
    masker.init_masks(snip_scores(model, lambda: F.cross_entropy(model(x), y)) if init == "snip" else None)
    if schedule != "constant":
        assert masker.density() == 1.0
    densities = [s["density"] for s in train(model, masker, torch.optim.SGD(model.parameters(), 0.05), 20, x, y)]
    assert densities == sorted(densities, reverse=True)
    for layer, k in zip(masker.layers, masker.final_counts):
        assert int(masker.masks[layer.name].sum()) == k
        assert abs(k - 0.3 * layer.num_units) <= 1 or init != "uniform"
    total = sum(l.num_units for l in masker.layers)
    assert abs(masker.density() - 0.3) <= 0.5 / total + 1e-12
    assert masker.target_density() == masker.density()


# allocation ----------------------------------------------------------------------------------------
def test_allocate_counts_exact_total():
    counts = allocate_counts([0.3, 0.3, 0.3], [10, 7, 5])
    assert sum(counts) == round(0.3 * 22) and counts == [3, 2, 2]
    assert allocate_counts([1.0, 0.0], [4, 4]) == [4, 0]


def test_erk_budget_and_cap():
    shapes, params = [(8, 1, 9, 9), (64, 1, 3, 3), (1000, 1000)], [648, 576, 10 ** 6]
    d = erk_densities(shapes, params, 0.1)
    assert sum(a * b for a, b in zip(d, params)) == pytest.approx(0.1 * sum(params))
    assert max(d) <= 1.0 and d[0] > d[2]


def test_snip_global_threshold():
    scores = [torch.tensor([5.0, 4.0, 0.1, 0.2]), torch.tensor([3.0, 0.0, 0.0, 0.0])]
    assert snip_densities(scores, [9, 9], 0.375) == [0.5, 0.25]


def test_channel_histogram():
    offsets = torch.tensor([0, 3, 6, 9, 12])
    mask = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    assert channel_histogram(mask, offsets) == [1, 1, 1, 1]


# masks through optimizers ---------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["sgd", "adamw", "amp-bf16", "grad-scaler"])
def test_masks_hold_through_steps(opt_name):
    model = Tiny()
    x, y = batch()
    masker = TileMasker(model, SparseConfig(density=0.4, total_steps=12, update_every=4, growth="random"))
    masker.init_masks()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if opt_name == "grad-scaler" else None
    ema = copy.deepcopy(model)
    for _ in range(3):
        train(model, masker, opt, 4, x, y, scaler=scaler, autocast=opt_name == "amp-bf16")
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 0.5)
        masker.apply(ema)
        assert masked_tiles_zero(ema, masker)
    assert masker.density() == pytest.approx(0.4, abs=1 / 100)
    if scaler is not None:  # a skipped step (inf gradient) leaves the masked model as it was
        before = copy.deepcopy(model.state_dict())
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        model.sw1.weight.grad[0, 0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        masker.step(opt)
        assert masked_tiles_zero(model, masker)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# prune / regrow -------------------------------------------------------------------------------------
@pytest.mark.parametrize("growth", ["gradient", "random"])
@pytest.mark.parametrize("redistribute", [False, True])
def test_regrowth_count_exact(growth, redistribute):
    model = Tiny()
    x, y = batch()
    cfg = SparseConfig(density=0.3, total_steps=30, update_every=3, prune_rate=0.5, growth=growth,
                       redistribute=redistribute)
    masker = TileMasker(model, cfg)
    masker.init_masks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kept = [int(m.sum()) for m in masker.masks.values()]
    for step in range(1, 31):
        old = {k: v.clone() for k, v in masker.masks.items()}
        p = masker.prune_rate(step)
        s = train(model, masker, opt, 1, x, y)
        if not s:
            continue
        s = s[0]
        active = sum(kept)
        expected = math.ceil(p * active) if redistribute else sum(math.ceil(p * k) for k in kept)
        assert s["pruned"] == s["regrown"] == expected
        assert sum(int(m.sum()) for m in masker.masks.values()) == active
        if not redistribute:
            assert [int(m.sum()) for m in masker.masks.values()] == kept
        for layer in masker.layers:  # regrown tiles start at zero with zero Adam moments
            grown = masker.masks[layer.name] & ~old[layer.name]
            state = opt.state[layer.param]
            for t in (layer.param, state["exp_avg"], state["exp_avg_sq"]):
                assert bool((t[grown] == 0).all())


def test_regrow_resets_sgd_momentum():
    model = Tiny()
    x, y = batch()
    masker = TileMasker(model, SparseConfig(density=0.3, total_steps=10, update_every=2, growth="gradient"))
    masker.init_masks()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    old = {k: v.clone() for k, v in masker.masks.items()}
    train(model, masker, opt, 2, x, y)
    for layer in masker.layers:
        grown = masker.masks[layer.name] & ~old[layer.name]
        assert grown.any()
        buf = opt.state[layer.param]["momentum_buffer"]
        assert bool((buf[grown] == 0).all()) and bool((buf[old[layer.name]] != 0).any())


def test_redistribute_learns_layer_density():
    model = Tiny()
    with torch.no_grad():
        model.sw2.weight.mul_(10)  # larger tiles: a global ranking moves density to sw2
    x, y = batch()
    masker = TileMasker(model, SparseConfig(density=0.3, init="uniform", total_steps=20, update_every=2,
                                            prune_rate=0.5, growth="random", redistribute=True))
    masker.init_masks()
    train(model, masker, torch.optim.SGD(model.parameters(), 1e-3), 20, x, y)
    sw1, sw2 = (r["density"] for r in masker.layer_stats())
    assert sw2 > 0.3 > sw1
    assert masker.density() == pytest.approx(0.3, abs=1 / 200)


def test_dense_layers_element_masks():
    model = Tiny()
    masker = TileMasker(model, SparseConfig(density=0.5, init="uniform", dense_layers=True))
    masker.init_masks()
    assert [l.name for l in masker.layers] == ["stem", "sw1", "sw2", "head"]
    assert float((model.head.weight == 0).double().mean()) == pytest.approx(0.5, abs=1 / 32)


def test_state_dict_weights_only_roundtrip():
    model = Tiny()
    masker = TileMasker(model, SparseConfig(density=0.3, total_steps=10, update_every=2))
    masker.init_masks()
    buf = io.BytesIO()
    torch.save(masker.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = TileMasker(Tiny(), SparseConfig(**state["config"]))
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[k], v) for k, v in masker.masks.items())
    assert other.final_counts == masker.final_counts and other.step_count == masker.step_count
    assert masked_tiles_zero(other.model, other)


# compaction ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "taichi"])
def test_compaction_exact(backend):
    model = Tiny(backend=backend)
    x, y = batch()
    masker = TileMasker(model, SparseConfig(density=0.3, total_steps=6, update_every=2))
    masker.init_masks()
    train(model, masker, torch.optim.AdamW(model.parameters(), lr=1e-2), 6, x, y)
    small = compact(model, masker)
    for layer in masker.layers:
        m = small.get_submodule(layer.name)
        assert m.weight.shape[0] == int(masker.masks[layer.name].sum())
        assert m.plan.info.uniform is None  # channels keep different tile counts
    with torch.no_grad():
        diff = (small(x) - model(x)).abs().max().item()
    assert diff <= 1e-5
    state = small.state_dict()
    reloaded = Tiny(backend=backend)
    reloaded.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(reloaded(x), small(x))


def test_compaction_refuses_compacted_model():
    model = Tiny()
    masker = TileMasker(model, SparseConfig(density=0.5))
    masker.init_masks()
    small = compact(model, masker)
    with pytest.raises(ValueError, match="already compacted"):
        compact(small, masker)


# bad arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"density": 0.0}, r"density must be in \(0, 1\]"),
    ({"density": 1.5}, r"density must be in \(0, 1\]"),
    ({"density": -0.2}, r"density must be in \(0, 1\]"),
    ({"density": "half"}, "density must be a number"),
    ({"schedule": "cosine"}, "unknown schedule 'cosine'; choose one of constant, gradual, linear"),
    ({"schedule": "gradual", "schedule_start": 5, "schedule_end": 5}, "start < end"),
    ({"growth": "momentum"}, "unknown growth 'momentum'"),
    ({"init": "lamp"}, "unknown init 'lamp'"),
    ({"update_every": 0}, "update_every must be a positive"),
    ({"prune_rate": 1.0}, r"prune_rate must be in \[0, 1\)"),
])
def test_bad_config_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseConfig(**kwargs)


def test_model_without_shiftwise_layers_refused():
    with pytest.raises(ValueError, match="no ShiftWiseConv2d"):
        TileMasker(nn.Linear(3, 3), SparseConfig())


def test_snip_needs_scores():
    with pytest.raises(ValueError, match="snip_scores"):
        TileMasker(Tiny(), SparseConfig(init="snip")).init_masks()
