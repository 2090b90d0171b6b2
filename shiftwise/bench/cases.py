"""The layers the benchmark times: cases, presets, their random weights, and compaction.

Two kinds of case: a large-kernel depthwise layer given by its parallel branches (SLaK,
RepLKNet, the shift-wise paper's layer), and an SW layer (``Case.sw``: the shift-wise network's
training-form layer, :class:`~shiftwise.models.sw.SWLayer`), whose implementations compute the
same planes and shifted sums in different ways.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..models.sw import SWLayer
from ..tiling import TilePlan, fold_bn, split_branches


@dataclasses.dataclass(frozen=True)
class SWSpec:
    """The SW layer of a case: large kernel ``K``, small kernel ``k``, ghost ratio, parallel
    paths and shuffled copies per plane (as :class:`~shiftwise.models.sw.SWLayer`)."""

    big_kernel: int
    small_kernel: int = 3
    ghost_ratio: float = 0.23
    n_path: int = 2
    n_rep: int = 4


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer: ``channels`` x ``height`` x ``width`` maps, parallel branch kernels, tile size,
    and the tile densities the shift-wise paths run at."""

    name: str
    channels: int
    height: int
    width: int
    branches: Tuple[Tuple[int, int], ...]
    tile_size: int
    densities: Tuple[float, ...] = (1.0, 0.5, 0.25)
    sw: Optional[SWSpec] = None  # an SW layer (branches: its K x K footprint; densities unused)

    @property
    def kernel(self) -> Tuple[int, int]:
        return max(k[0] for k in self.branches), max(k[1] for k in self.branches)


def _slak(name, c, hw, k):
    return Case(name, c, hw, hw, ((k, 5), (5, k), (5, 5)), 5)


def _sw(name, c, hw, k, small=3):
    return Case(name, c, hw, hw, ((k, k),), small, (1.0,), SWSpec(k, small))


def _replk(name, c, hw, k, small=5):
    return Case(name, c, hw, hw, ((k, k), (small, small)) if small else ((k, k),), 5 if k >= 5 else k)


PRESETS: Dict[str, Tuple[Case, ...]] = {
    # SLaK-T at 224: stages 1-4 (width 1.3, kernels 51/49/47/13 + 5x5, N = 5)
    "slak_t": (_slak("slak_t.s1", 124, 56, 51), _slak("slak_t.s2", 249, 28, 49), _slak("slak_t.s3", 499, 14, 47),
               _slak("slak_t.s4", 998, 7, 13)),
    # RepLKNet-31B at 224: K x K + 5 x 5 per stage
    "replknet_31b": (_replk("replknet_31b.s1", 128, 56, 31), _replk("replknet_31b.s2", 256, 28, 29),
                     _replk("replknet_31b.s3", 512, 14, 27), _replk("replknet_31b.s4", 1024, 7, 13)),
    # the shift-wise paper's operator case: C = 124, 128 x 128, 51 x 5
    "paper": (Case("paper", 124, 128, 128, ((51, 5),), 5),),
    # RepLKNet Table 1: depthwise layers of C = 384 at R x R (one layer of their stack of 24)
    "replk_stack": tuple(_replk(f"replk_stack.r{r}.k{k}", 384, r, k, small=0)
                         for r in (16, 32, 64) for k in (3, 7, 13, 19, 25, 31)),
    # SW-T at 224: the SW layer of each stage (k = 3, ghost ratio 0.23, N_path 2, N_rep 4)
    "sw_t": (_sw("sw_t.s1", 80, 56, 51), _sw("sw_t.s2", 160, 28, 49), _sw("sw_t.s3", 320, 14, 47),
             _sw("sw_t.s4", 640, 7, 13)),
}
# default batch per device kind: small on CPU (seconds per call), the papers' sizes on GPU
DEFAULT_BATCH = {"cpu": 4, "cuda": 64}
DEFAULT_BATCH_PRESET = {"custom": {"cpu": 2, "cuda": 16}, "sw_t": {"cpu": 8, "cuda": 64}}


def default_batch(preset: str, device: torch.device) -> int:
    table = DEFAULT_BATCH_PRESET.get(preset, DEFAULT_BATCH)
    return table["cuda" if torch.device(device).type == "cuda" else "cpu"]


def parse_kernels(spec: str) -> Tuple[Tuple[int, int], ...]:
    """``"51x5,5x51,5x5"`` -> ``((51, 5), (5, 51), (5, 5))``; ``"7"`` is ``7x7``. Odd sizes only
    (the output keeps the input's size)."""
    out = []
    for part in spec.split(","):
        a, _, b = part.lower().partition("x")
        try:
            out.append((int(a), int(b or a)))
        except ValueError:
            raise ValueError(f"kernels: want KHxKW[,KHxKW...] such as 51x5,5x51,5x5, got {spec!r}") from None
    if any(min(k) < 1 or k[0] % 2 == 0 or k[1] % 2 == 0 for k in out):
        raise ValueError(f"kernels must be odd and positive (the output keeps the input size), got {spec!r}")
    return tuple(out)


def custom_case(shape: str, kernels: str, tile_size: int = 5) -> Case:
    """A case from ``"C,H,W"`` and a kernel list (:func:`parse_kernels`)."""
    try:
        c, h, w = (int(v) for v in shape.split(","))
    except ValueError:
        raise ValueError(f"shape: want C,H,W such as 124,56,56, got {shape!r}") from None
    if min(c, h, w) < 1:
        raise ValueError(f"shape must be positive, got {shape!r}")
    if tile_size < 1:
        raise ValueError(f"tile size must be >= 1, got {tile_size}")
    return Case(f"custom.c{c}.{h}x{w}", c, h, w, parse_kernels(kernels), tile_size)


def select_cases(preset: str, names: Optional[Sequence[str]] = None,
                 densities: Optional[Sequence[float]] = None) -> List[Case]:
    """The cases of ``preset`` whose names equal or end with one of ``names`` (all if None), with
    ``densities`` in place of the preset's."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cases = list(PRESETS[preset])
    if names:
        cases = [cs for cs in cases if any(cs.name == nm or cs.name.endswith(nm) for nm in names)]
        if not cases:
            raise ValueError(f"cases {','.join(names)!r} match none of {[cs.name for cs in PRESETS[preset]]}")
    return with_densities(cases, densities)


def with_densities(cases: Sequence[Case], densities: Optional[Sequence[float]]) -> List[Case]:
    if densities is None:
        return list(cases)
    densities = tuple(float(d) for d in densities)
    if not densities or any(not 0 < d <= 1 for d in densities):
        raise ValueError(f"densities must lie in (0, 1], got {','.join(f'{d:g}' for d in densities)!r}")
    return [dataclasses.replace(cs, densities=densities) for cs in cases]


@dataclasses.dataclass
class Layer:
    """The random layer of a case: branch weights + eval BatchNorms, and its shift-wise form."""

    branch_weights: List[Tensor]  # (C, kh, kw) each
    bns: List[torch.nn.BatchNorm2d]
    folded: List[Tuple[Tensor, Tensor]]  # BN folded: (weight, bias) per branch
    dense: Tensor  # (C, KH, KW): the branches summed
    bias: Tensor  # (C,)
    tiles: Tensor  # (T, N, N)
    plan: TilePlan


def make_layer(case: Case, device, dtype, seed: int = 0) -> Layer:
    """Random branch weights and BatchNorm statistics for ``case`` (fixed ``seed``), folded and
    split into tiles."""
    g = torch.Generator().manual_seed(seed)
    c = case.channels
    weights, bns, folded = [], [], []
    kh, kw = case.kernel
    dense = torch.zeros(c, kh, kw, dtype=dtype)
    bias = torch.zeros(c, dtype=dtype)
    for bh, bw in case.branches:
        w = torch.randn(c, bh, bw, generator=g, dtype=dtype) / math.sqrt(bh * bw)
        bn = torch.nn.BatchNorm2d(c).to(dtype).eval()
        with torch.no_grad():
            bn.weight.copy_(1 + 0.1 * torch.randn(c, generator=g, dtype=dtype))
            bn.bias.copy_(0.1 * torch.randn(c, generator=g, dtype=dtype))
            bn.running_mean.copy_(0.1 * torch.randn(c, generator=g, dtype=dtype))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=dtype))
        fw, fb = fold_bn(w, None, bn)
        oy, ox = (kh - bh) // 2, (kw - bw) // 2
        dense[:, oy:oy + bh, ox:ox + bw] += fw
        bias += fb
        weights.append(w)
        bns.append(bn)
        folded.append((fw.detach(), fb.detach()))
    tiles, _, plan = split_branches(folded, case.tile_size)
    return Layer([w.to(device) for w in weights], [bn.to(device) for bn in bns],
                 [(w.to(device), b.to(device)) for w, b in folded], dense.to(device), bias.to(device),
                 tiles.to(device), plan.to(device))


def compact(tiles: Tensor, plan: TilePlan, density: float, seed: int = 0) -> Tuple[Tensor, TilePlan]:
    """Keep ``round(density * T)`` tiles chosen at random (per-channel counts vary), fixed seed;
    the others are removed from the plan, not masked."""
    if density >= 1:
        return tiles, plan
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(plan.num_tiles, dtype=torch.bool)
    keep[torch.randperm(plan.num_tiles, generator=g)[:round(density * plan.num_tiles)]] = True
    keep = keep.to(tiles.device)
    return tiles[keep].contiguous(), plan.select(keep)


def make_sw_layer(case: Case, device, dtype, seed: int = 0) -> SWLayer:
    """The random SW layer of an SW ``case`` (fixed ``seed``), in training mode: path kernels of
    order ``1 / k``, BatchNorm affine parameters around 1 and 0."""
    spec = case.sw
    layer = SWLayer(case.channels, spec.big_kernel, spec.small_kernel, spec.ghost_ratio, spec.n_path, spec.n_rep,
                    path="weights").to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in layer.path_weights():
            w.copy_(torch.randn(w.shape, generator=g, dtype=dtype) / spec.small_kernel)
        for bn in (layer.bn_lora1, layer.bn_lora2, layer.bn_small):
            bn.weight.copy_(1 + 0.1 * torch.randn(bn.weight.shape, generator=g, dtype=dtype))
            bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=g, dtype=dtype))
    return layer.to(device).train()
