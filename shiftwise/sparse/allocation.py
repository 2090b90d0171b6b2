"""How many tiles each layer keeps at a given overall density: uniform, ERK, SNIP.

Budgets are counted in parameters (a tile of ``N x N`` counts ``N*N``), so layers with
different tile sizes, or element-masked layers, share one budget fairly. Counts are rounded
by largest remainder, so the total is exact and each layer is within one unit of its share.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor

INITS = ("uniform", "erk", "snip")


def uniform_densities(num_layers: int, density: float) -> List[float]:
    """Every layer at ``density``."""
    return [density] * num_layers


def erk_densities(shapes: Sequence[Sequence[int]], params: Sequence[int], density: float) -> List[float]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020), as SLaK and RigL allocate them.

    Layer ``l`` gets ``eps * sum(shape_l) / prod(shape_l)``, capped at 1 (a capped layer is
    dense and the rest share what is left), with ``eps`` chosen so that
    ``sum_l density_l * params_l == density * sum_l params_l``. ``shapes`` are the dense
    weight shapes (a shift-wise layer counts as the depthwise ``(C, 1, KH, KW)`` it covers).
    """
    raw = [sum(s) / math.prod(s) for s in shapes]
    budget = density * sum(params)
    dense: set = set()
    while True:
        rest = budget - sum(params[i] for i in dense)
        divisor = sum(raw[i] * params[i] for i in range(len(raw)) if i not in dense)
        if divisor <= 0:
            return [1.0] * len(raw)
        eps = rest / divisor
        over = [i for i in range(len(raw)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(raw))]
        dense.add(max(over, key=lambda i: raw[i]))


def snip_densities(scores: Sequence[Tensor], unit_params: Sequence[int], density: float) -> List[float]:
    """Per-layer densities from one global threshold on SNIP scores (Lee et al. 2019).

    ``scores[l]`` is ``(U_l,)``: ``|w * grad|`` summed over each unit of layer ``l``. Units are
    ranked by score per parameter and kept, best first, until ``density`` of all parameters
    is kept.
    """
    per_param = torch.cat([s.detach().float().cpu() / p for s, p in zip(scores, unit_params)])
    sizes = torch.cat([torch.full((s.numel(),), p, dtype=torch.float64) for s, p in zip(scores, unit_params)])
    order = torch.sort(torch.nan_to_num(per_param, nan=0.0), descending=True, stable=True).indices
    keep = torch.zeros_like(per_param, dtype=torch.bool)
    budget = density * float(sizes.sum())
    cum = sizes[order].cumsum(0)
    n = int(torch.searchsorted(cum, torch.tensor([budget + float(sizes.min()) / 2], dtype=cum.dtype), right=True))
    keep[order[:n]] = True
    out, start = [], 0
    for s in scores:
        out.append(float(keep[start:start + s.numel()].double().mean()) if s.numel() else 1.0)
        start += s.numel()
    return out


def allocate_counts(densities: Sequence[float], units: Sequence[int]) -> List[int]:
    """Integer unit counts near ``density_l * units_l`` whose sum is the rounded total.

    Largest-remainder rounding: each layer gets the floor of its share plus at most one.
    """
    ideal = [min(max(d, 0.0), 1.0) * u for d, u in zip(densities, units)]
    counts = [math.floor(x + 1e-9) for x in ideal]
    extra = round(sum(ideal)) - sum(counts)
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order:
        if extra <= 0:
            break
        if counts[i] < units[i]:
            counts[i] += 1
            extra -= 1
    return counts
