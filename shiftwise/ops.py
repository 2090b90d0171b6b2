"""Autograd Functions around the Taichi kernels; the only importer of ``taichi_kernels``.

Wrappers hand Taichi detached, contiguous tensors on the device it was initialised for, and
allocate outputs with ``new_empty``. float16/bfloat16 are computed in float32 and cast back.
The kernel style follows the device: ``"cpu"`` (row loops over zero-padded channel chunks)
or ``"gpu"`` (one thread per element); :data:`FORCE_STYLE` overrides it for tests.

Every Function here is differentiable any number of times: each backward is written with
the Functions themselves (the transpose of a shift-add is a shift-add; the input gradient of
the fused conv is the fused conv with flipped tiles and negated offsets; the weight gradient's
own gradients are fused convs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _runtime

_COMPUTE_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_UPCAST = (torch.float16, torch.bfloat16)
_INT32_MAX = 2 ** 31 - 1
# A CPU-style launch pads one chunk of channels; a chunk holds at most this share of the
# input (and at least _MIN_CHUNK elements), so the padded copies add little to peak memory.
CHUNK_SHARE = 8
_MIN_CHUNK = 1 << 18
FORCE_STYLE: Optional[str] = None  # "cpu" or "gpu" to override the device's kernel style


def _style(device: torch.device) -> str:
    if FORCE_STYLE is not None:
        return FORCE_STYLE
    return "gpu" if device.type == "cuda" else "cpu"


def _shift_add_kernels(dtype: torch.dtype, device: torch.device):
    from taichi_kernels import shift_add_kernels  # noqa: PLC0415 (lazy: taichi import is slow)

    return shift_add_kernels(_COMPUTE_DTYPES[dtype], _style(device))


def _fused_kernels(dtype: torch.dtype, tile_size: int, device: torch.device):
    from taichi_kernels import fused_kernels  # noqa: PLC0415

    return fused_kernels(_COMPUTE_DTYPES[dtype], tile_size, _style(device))


def _column_padding(tile_size: int) -> Tuple[int, int]:
    from taichi_kernels import column_padding  # noqa: PLC0415

    return column_padding(tile_size)


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


def _check_index_range(*tensors: Tensor) -> None:
    for t in tensors:
        if t.numel() > _INT32_MAX:
            raise _runtime.TaichiUnavailable(
                f"a tensor of {t.numel()} elements exceeds Taichi's int32 indexing; split the batch or "
                "use backend='torch'")


# shift-add ------------------------------------------------------------------------------------
def shift_add_fwd(u: Tensor, offsets: Tensor, sy: Tensor, sx: Tensor, out_hw: Tuple[int, int]) -> Tensor:
    cdt = _compute_dtype(u.dtype)
    b, c, (h, w) = u.shape[0], offsets.numel() - 1, out_hw
    y = u.new_empty((b, c, h, w), dtype=cdt)
    if y.numel() == 0:
        return y.to(u.dtype)
    if u.shape[1] == 0:
        return y.zero_().to(u.dtype)
    _check_index_range(u, y)
    with _runtime.launch(u.device):
        fwd, _ = _shift_add_kernels(cdt, u.device)
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
    _check_index_range(gy, gu)
    with _runtime.launch(gy.device):
        _, bwd = _shift_add_kernels(cdt, gy.device)
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


# fused conv -----------------------------------------------------------------------------------
def _channel_chunks(x: Tensor, tile_size: int):
    """``(c0, padded chunk)`` pairs covering ``x``'s channels, columns padded for the CPU kernels."""
    left, right = _column_padding(tile_size)
    b, c, h, w = x.shape
    per_channel = max(1, b * h * (w + left + right))
    budget = max(_MIN_CHUNK, x.numel() // CHUNK_SHARE)
    step = max(1, min(c, budget // per_channel))
    for c0 in range(0, c, step):
        yield c0, F.pad(x[:, c0:c0 + step], (left, right)).contiguous()


def fused_conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], offsets: Tensor, dy: Tensor, dx: Tensor,
                   origin: int) -> Tensor:
    """``y = bias + sum_{t in c} sum_{i,j} weight[t,i,j] * x[b,c,h+dy+i-origin,w+dx+j-origin]`` (no autograd)."""
    cdt = _compute_dtype(x.dtype)
    b, c, h, w = x.shape
    n = weight.shape[-1]
    y = x.new_empty((b, c, h, w), dtype=cdt)
    if y.numel() == 0:
        return y.to(x.dtype)
    bias_c = _prep(bias, cdt) if bias is not None else x.new_zeros(c, dtype=cdt)
    if weight.shape[0] == 0:
        return y.copy_(bias_c.view(1, c, 1, 1).expand_as(y)).to(x.dtype)
    xc = _prep(x, cdt)
    _check_index_range(xc)
    args = (_prep(weight, cdt), _prep(offsets, torch.int32), _prep(dy, torch.int32), _prep(dx, torch.int32), bias_c)
    with _runtime.launch(x.device):
        fwd, _ = _fused_kernels(cdt, n, x.device)
        if _style(x.device) == "gpu":
            fwd(xc, *args, 0, origin, y)
        else:
            for c0, xp in _channel_chunks(xc, n):
                fwd(xp, *args, c0, origin, y)
    return y if x.dtype == cdt else y.to(x.dtype)


def fused_conv_wgrad(x: Tensor, gy: Tensor, offsets: Tensor, dy: Tensor, dx: Tensor, tile_channel: Tensor,
                     origin: int, tile_size: int) -> Tensor:
    """``gw[t,i,j] = sum_{b,h,w} gy[b,c,h,w] * x[b,c,h+dy+i-origin,w+dx+j-origin]`` (no autograd)."""
    cdt = _compute_dtype(x.dtype)
    n = tile_size
    gw = x.new_empty((tile_channel.numel(), n, n), dtype=cdt)
    if gw.numel() == 0:
        return gw.to(x.dtype)
    if x.numel() == 0:
        return gw.zero_().to(x.dtype)
    xc, gyc = _prep(x, cdt), _prep(gy, cdt)
    _check_index_range(xc)
    args = (_prep(offsets, torch.int32), _prep(dy, torch.int32), _prep(dx, torch.int32),
            _prep(tile_channel, torch.int32))
    with _runtime.launch(x.device):
        _, wgrad = _fused_kernels(cdt, n, x.device)
        if _style(x.device) == "gpu":
            wgrad(xc, gyc, *args, 0, origin, gw)
        else:
            for (c0, xp), (_, gyp) in zip(_channel_chunks(xc, n), _channel_chunks(gyc, n)):
                wgrad(xp, gyp, *args, c0, origin, gw)
    return gw if x.dtype == cdt else gw.to(x.dtype)


class FusedConv(torch.autograd.Function):
    """The shift-wise conv in one kernel; ``origin`` is ``N//2`` (other values: transposed use)."""

    @staticmethod
    def forward(ctx, x, weight, bias, offsets, dy, dx, tile_channel, origin):
        ctx.save_for_backward(x, weight, offsets, dy, dx, tile_channel)
        ctx.origin = origin
        ctx.has_bias = bias is not None
        return fused_conv_fwd(x, weight, bias, offsets, dy, dx, origin)

    @staticmethod
    def backward(ctx, gy):
        x, weight, offsets, dy, dx, tile_channel = ctx.saved_tensors
        n = weight.shape[-1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = FusedConv.apply(gy, weight.flip(1, 2), None, offsets, -dy, -dx, tile_channel, n - 1 - ctx.origin)
        if ctx.needs_input_grad[1]:
            gw = FusedConvWeightGrad.apply(x, gy, offsets, dy, dx, tile_channel, ctx.origin, n)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None


class FusedConvWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gy, offsets, dy, dx, tile_channel, origin, tile_size):
        ctx.save_for_backward(x, gy, offsets, dy, dx, tile_channel)
        ctx.origin = origin
        return fused_conv_wgrad(x, gy, offsets, dy, dx, tile_channel, origin, tile_size)

    @staticmethod
    def backward(ctx, ggw):
        x, gy, offsets, dy, dx, tile_channel = ctx.saved_tensors
        n = ggw.shape[-1]
        gx = ggy = None
        if ctx.needs_input_grad[0]:
            gx = FusedConv.apply(gy, ggw.flip(1, 2), None, offsets, -dy, -dx, tile_channel, n - 1 - ctx.origin)
        if ctx.needs_input_grad[1]:
            ggy = FusedConv.apply(x, ggw, None, offsets, dy, dx, tile_channel, ctx.origin)
        return gx, ggy, None, None, None, None, None, None
