"""Pure-PyTorch twins of every op (``backend="torch"``): the test oracle, the fallback, export.

Written to be obviously correct, differentiable by autograd, and free of Taichi.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .tiling import TilePlan, merge_tiles


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


def shiftwise_conv2d(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor] = None) -> Tensor:
    """The shift-wise conv as one dense depthwise ``F.conv2d`` of the merged kernel."""
    kernel = merge_tiles(weight, plan)
    return F.conv2d(x, kernel.unsqueeze(1), bias, padding=plan.info.padding, groups=plan.channels)
