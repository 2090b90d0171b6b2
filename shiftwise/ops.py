"""Autograd Functions around the Taichi kernels; the only importer of ``taichi_kernels``.

Wrappers hand Taichi detached, contiguous tensors on the device it was initialised for, and
allocate outputs with ``new_empty``. float16/bfloat16 are computed in float32 and cast back.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _runtime

_COMPUTE_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_UPCAST = (torch.float16, torch.bfloat16)


def _kernels(dtype: torch.dtype):
    from taichi_kernels import shift_add_kernels  # noqa: PLC0415 (lazy: taichi import is slow)

    return shift_add_kernels(_COMPUTE_DTYPES[dtype])


def _prep(t: Tensor, dtype=None) -> Tensor:
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in _COMPUTE_DTYPES:
        return dtype
    if dtype in _UPCAST:
        return torch.float32
    raise TypeError(f"shiftwise Taichi ops support float16/32/64 and bfloat16, got {dtype}")


def shift_add_fwd(u: Tensor, offsets: Tensor, sy: Tensor, sx: Tensor, out_hw: Tuple[int, int]) -> Tensor:
    cdt = _compute_dtype(u.dtype)
    b, c, (h, w) = u.shape[0], offsets.numel() - 1, out_hw
    y = u.new_empty((b, c, h, w), dtype=cdt)
    if y.numel() == 0:
        return y.to(u.dtype)
    if u.shape[1] == 0:
        return y.zero_().to(u.dtype)
    with _runtime.launch(u.device):
        fwd, _ = _kernels(cdt)
        fwd(_prep(u, cdt), _prep(offsets, torch.int32), _prep(sy, torch.int32), _prep(sx, torch.int32), y)
    return y if u.dtype == cdt else y.to(u.dtype)


def shift_add_bwd(gy: Tensor, tile_channel: Tensor, sy: Tensor, sx: Tensor, u_hw: Tuple[int, int]) -> Tensor:
    cdt = _compute_dtype(gy.dtype)
    t = tile_channel.numel()
    gu = gy.new_empty((gy.shape[0], t, *u_hw), dtype=cdt)
    if gu.numel() == 0:
        return gu.to(gy.dtype)
    if gy.numel() == 0:
        return gu.zero_().to(gy.dtype)
    with _runtime.launch(gy.device):
        _, bwd = _kernels(cdt)
        bwd(_prep(gy, cdt), _prep(tile_channel, torch.int32), _prep(sy, torch.int32), _prep(sx, torch.int32), gu)
    return gu if gy.dtype == cdt else gu.to(gy.dtype)


class ShiftAdd(torch.autograd.Function):
    """Forward gather; its backward is :class:`ShiftAddTranspose` (so it is twice differentiable)."""

    @staticmethod
    def forward(ctx, u, offsets, tile_channel, sy, sx, out_h, out_w):
        ctx.save_for_backward(offsets, tile_channel, sy, sx)
        ctx.u_hw = (u.shape[2], u.shape[3])
        return shift_add_fwd(u, offsets, sy, sx, (out_h, out_w))

    @staticmethod
    def backward(ctx, gy):
        offsets, tile_channel, sy, sx = ctx.saved_tensors
        gu = ShiftAddTranspose.apply(gy, offsets, tile_channel, sy, sx, *ctx.u_hw)
        return gu, None, None, None, None, None, None


class ShiftAddTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, offsets, tile_channel, sy, sx, u_h, u_w):
        ctx.save_for_backward(offsets, tile_channel, sy, sx)
        ctx.out_hw = (gy.shape[2], gy.shape[3])
        return shift_add_bwd(gy, tile_channel, sy, sx, (u_h, u_w))

    @staticmethod
    def backward(ctx, ggu):
        offsets, tile_channel, sy, sx = ctx.saved_tensors
        ggy = ShiftAdd.apply(ggu, offsets, tile_channel, sy, sx, *ctx.out_hw)
        return ggy, None, None, None, None, None, None
