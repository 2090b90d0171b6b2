"""The official SW layer's semantics in plain PyTorch, written from its source for the tests.

Independent of ``shiftwise.models.sw``: the tables are drawn the way the official constructor
draws them (reseeding the global generators, inside ``fork_rng`` so the tests' own random state
survives), and the three sums are built the way its CUDA kernel builds them: every plane pixel
is scattered to the output pixel its shift sends it to.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def official_tables(channels, big_kernel, small_kernel, ghost_ratio, n_rep):
    """``(rep, ghost, pad_hv, idx_identit, nk, extra_pad)`` as the official constructor computes them."""
    rep_n = int(channels * (1 - ghost_ratio)) // 2 * 2
    nk = math.ceil(big_kernel / small_kernel)
    padding = small_kernel - 1
    real_pad = [big_kernel // 2 - i * small_kernel - padding for i in range(nk)]
    extra_pad = padding - small_kernel // 2
    state = np.random.get_state()
    try:
        np.random.seed(123)
        ghost = np.random.choice(channels, channels - rep_n, replace=False).tolist()
    finally:
        np.random.set_state(state)
    ghost.sort()
    rep = sorted(set(range(channels)) - set(ghost))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        horizon = [torch.cat([torch.randperm(nk) + i * nk for i in range(rep_n)]).int() for _ in range(n_rep)]
        vertica = [torch.cat([torch.randperm(nk) + i * nk for i in range(rep_n)]).int() for _ in range(n_rep)]
        identit = [(torch.randint(0, nk, [rep_n]) + torch.arange(rep_n) * nk).int() for _ in range(n_rep)]
    offsets = torch.IntTensor(real_pad * rep_n)
    pads_h = [torch.index_select(offsets, 0, torch.sort(h)[1]) for h in horizon]
    pads_v = [torch.index_select(offsets, 0, torch.sort(v)[1]) for v in vertica]
    pad_hv = torch.vstack([torch.stack(pads_h), torch.stack(pads_v)]).t().contiguous()
    idx_identit = torch.stack(identit).t().contiguous()
    return rep, ghost, pad_hv, idx_identit, nk, extra_pad


def _moved(plane, ty0, tx0, h, w):
    """An ``h x w`` map holding ``plane[a, b]`` at ``(ty0 + a, tx0 + b)`` where that lies inside it
    (batch-first; ``F.pad`` with negative widths crops)."""
    ph, pw = plane.shape[-2:]
    if ty0 >= h or tx0 >= w or ty0 + ph <= 0 or tx0 + pw <= 0:
        return plane.new_zeros(plane.shape[:-2] + (h, w))
    return F.pad(plane, (tx0, w - tx0 - pw, ty0, h - ty0 - ph))


def three_sums(x_rep, plane_kernels, pad_hv, idx_identit, nk, extra_pad, n_rep):
    """The official horizontal, vertical and identity sums (before their BNs)."""
    k = plane_kernels.shape[-1]
    rep_n = x_rep.shape[1]
    u = F.conv2d(x_rep, plane_kernels, padding=k - 1, groups=rep_n)
    b, planes, hin, win = u.shape
    h, w = hin - 2 * extra_pad, win - 2 * extra_pad
    sums = [[0] * rep_n for _ in range(3)]
    for p in range(planes):
        oc = p // nk
        for i in range(n_rep):
            pad_h, pad_v = int(pad_hv[p, i]), int(pad_hv[p, i + n_rep])
            # plane pixel (ph, pw) goes to (ph - extra_pad, pw + pad_h) horizontally ...
            sums[0][oc] = sums[0][oc] + _moved(u[:, p], -extra_pad, pad_h, h, w)
            # ... and to (ph + pad_v, pw - extra_pad) vertically
            sums[1][oc] = sums[1][oc] + _moved(u[:, p], pad_v, -extra_pad, h, w)
            if p == int(idx_identit[oc, i]):
                sums[2][oc] = sums[2][oc] + _moved(u[:, p], -extra_pad, -extra_pad, h, w)
    zero = x_rep.new_zeros(b, h, w)
    return [torch.stack([s if torch.is_tensor(s) else zero for s in group], 1) for group in sums]


def official_layer(x, path_weights, channels, big_kernel, small_kernel, ghost_ratio, n_rep, bns=None):
    """The official layer's output: ``path_weights`` the ``LoRAs.{i}.weight`` tensors; ``bns``
    three callables (``bn_lora1``, ``bn_lora2``, ``bn_small``) or None."""
    rep, ghost, pad_hv, idx_identit, nk, extra_pad = official_tables(channels, big_kernel, small_kernel,
                                                                      ghost_ratio, n_rep)
    rep_in = torch.index_select(x, 1, torch.tensor(rep, dtype=torch.long))
    ghost_in = torch.index_select(x, 1, torch.tensor(ghost, dtype=torch.long))
    kernels = path_weights[0]
    for w in path_weights[1:]:
        kernels = kernels + w
    h, v, i = three_sums(rep_in, kernels, pad_hv, idx_identit, nk, extra_pad, n_rep)
    if bns is not None:
        h, v, i = bns[0](h), bns[1](v), bns[2](i)
    return torch.cat([h + v + i + rep_in, ghost_in], dim=1)
