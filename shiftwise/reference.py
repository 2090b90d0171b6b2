"""Pure-PyTorch twins of every op (``backend="torch"``): the test oracle, the fallback, export.

Written to be obviously correct, differentiable by autograd, and free of Taichi.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .tiling import ShiftAddPlan, TilePlan, merge_tiles


def shift_add(u: Tensor, offsets: Tensor, shift_y: Tensor, shift_x: Tensor, output_size: Tuple[int, int]) -> Tensor:
    """``y[b,c,h,w] = sum_{t in c} u[b, t, h + shift_y[t], w + shift_x[t]]``, zero outside ``u``."""
    b, t, hu, wu = u.shape
    h, w = output_size
    c = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).long()
    tile_channel = torch.repeat_interleave(torch.arange(c, device=u.device), counts.to(u.device), output_size=t)
    rows = (shift_y.long().to(u.device)[:, None] + torch.arange(h, device=u.device)).clamp(-1, hu) + 1
    cols = (shift_x.long().to(u.device)[:, None] + torch.arange(w, device=u.device)).clamp(-1, wu) + 1
    padded = F.pad(u, (1, 1, 1, 1))  # a zero border: every out-of-range index lands on it
    tidx = torch.arange(t, device=u.device)[:, None, None]
    gathered = padded[:, tidx, rows[:, :, None], cols[:, None, :]]  # (B, T, H, W)
    return u.new_zeros(b, c, h, w).index_add(1, tile_channel, gathered)


def _gather_by_shift(x: Tensor, index: Tensor, dest: Tensor, groups, sign: int, size: Tuple[int, int],
                     channels: int) -> Tensor:
    """``y[b, dest[e], h, w] += x[b, index[e], h + sign*dy, w + sign*dx]`` for every entry ``e`` of
    every group ``(dy, dx, start, end)``, zero outside ``x``: per shift, the destination window
    that reads inside ``x``, the matching window of ``x`` gathered and added."""
    b, _, hx, wx = x.shape
    h, w = size
    y = x.new_zeros(b, channels, h, w)
    for dy, dx, start, end in groups:
        sy, sx = sign * dy, sign * dx
        h0, h1 = max(0, -sy), min(h, hx - sy)  # destination rows whose source row h + sy lies in x
        w0, w1 = max(0, -sx), min(w, wx - sx)
        if h0 < h1 and w0 < w1:
            # select the entries' channels first: index_select copies a strided window of all channels
            window = x.index_select(1, index[start:end])[:, :, h0 + sy:h1 + sy, w0 + sx:w1 + sx]
            y[:, :, h0:h1, w0:w1].index_add_(1, dest[start:end], window)
    return y


class _PlaneShiftAdd(torch.autograd.Function):
    # autograd through the per-shift windows would allocate, zero and sum one planes-sized
    # gradient per distinct shift (33 in SW-T stage 1); the adjoint written out is one gather
    @staticmethod
    def forward(ctx, planes, plan, size):
        ctx.plan, ctx.planes_hw = plan, tuple(planes.shape[2:])
        return _gather_by_shift(planes, plan.shift_plane, plan.shift_out, plan.shift_groups, 1, size,
                                plan.num_outputs)

    @staticmethod
    def backward(ctx, gy):
        return _PlaneShiftAddTranspose.apply(gy, ctx.plan, ctx.planes_hw), None, None


class _PlaneShiftAddTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, plan, planes_hw):
        ctx.plan, ctx.size = plan, tuple(gy.shape[2:])
        return _gather_by_shift(gy, plan.shift_out, plan.shift_plane, plan.shift_groups, -1, planes_hw,
                                plan.num_planes)

    @staticmethod
    def backward(ctx, ggu):
        return _PlaneShiftAdd.apply(ggu, ctx.plan, ctx.size), None, None


def plane_shift_add(planes: Tensor, plan: ShiftAddPlan, output_size: Tuple[int, int]) -> Tensor:
    """``y[b,o,h,w] = sum_{e: out[e] == o} planes[b, plane[e], h + dy[e], w + dx[e]]``, zero outside
    ``planes``, computed per shift (``plan.shift_groups``); its gradient is the same gather with
    the entries' roles swapped: ``gu[b,p,a,c] = sum_{e: plane[e] == p} gy[b, out[e], a - dy[e], c - dx[e]]``."""
    return _PlaneShiftAdd.apply(planes, plan, (int(output_size[0]), int(output_size[1])))


def shiftwise_conv2d(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor] = None) -> Tensor:
    """The shift-wise conv as one dense depthwise ``F.conv2d`` of the merged kernel."""
    kernel = merge_tiles(weight, plan)
    return F.conv2d(x, kernel.unsqueeze(1), bias, padding=plan.info.padding, groups=plan.channels)
