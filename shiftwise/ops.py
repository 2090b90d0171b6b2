"""Autograd Functions around the Taichi kernels; the only importer of ``taichi_kernels``.

Wrappers hand Taichi detached, contiguous tensors on the device it was initialised for, and
allocate outputs with ``new_empty``. float16/bfloat16 are computed in float32 and cast back.
The kernel style follows the device: ``"cpu"`` (row loops over zero-padded channel chunks)
or ``"gpu"`` (one thread per element; the weight gradient a blocked two-pass reduction);
:data:`FORCE_STYLE` overrides it for tests.

Every op here is a ``torch.library.custom_op`` with a fake implementation and registered
autograd, differentiable any number of times: each backward is written with the ops themselves
(the transpose of a shift-add is a shift-add; the input gradient of
the fused conv is the fused conv with flipped tiles and negated offsets; the weight gradient's
own gradients are fused convs).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _runtime

_COMPUTE_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_UPCAST = (torch.float16, torch.bfloat16)
_INT32_MAX = 2 ** 31 - 1
# A CPU-style launch pads one chunk of channels; a chunk holds at most this share of the
# input (and at least _MIN_CHUNK elements), so the padded copies add little to peak memory.
# Fewer, larger chunks would save launches (~0.1 ms each through ``taichi_kernels.launch``),
# but the weight gradient pads x and gy chunks at once, and one chunk per input raised the peak
# memory of training steps on small maps (RepLKNet-31B stage 2: 1.29x the depthwise conv's
# peak; docs/backends.md). Each input's chunks share one buffer (:func:`_channel_chunks`).
CHUNK_SHARE = 8
_MIN_CHUNK = 1 << 18
FORCE_STYLE: Optional[str] = None  # "cpu" or "gpu" to override the device's kernel style


def _style(device: torch.device) -> str:
    if FORCE_STYLE is not None:
        return FORCE_STYLE
    return "gpu" if device.type == "cuda" else "cpu"


def _shift_add_kernels(dtype: torch.dtype, device: torch.device, stores: str = "one"):
    from shiftwise.taichi_kernels import shift_add_kernels  # noqa: PLC0415 (lazy: taichi import is slow)

    return shift_add_kernels(_COMPUTE_DTYPES[dtype], _style(device), stores)


def _fused_kernels(dtype: torch.dtype, tile_size: int, device: torch.device, stores: str = "one"):
    from shiftwise.taichi_kernels import fused_kernels  # noqa: PLC0415

    return fused_kernels(_COMPUTE_DTYPES[dtype], tile_size, _style(device), stores)


def _column_padding(tile_size: int) -> Tuple[int, int]:
    from shiftwise.taichi_kernels import column_padding  # noqa: PLC0415

    return column_padding(tile_size)


def _wgrad_blocks(batch: int, channels: int, height: int, width: int, taps: int) -> Tuple[int, int]:
    from shiftwise.taichi_kernels.fused import wgrad_blocks  # noqa: PLC0415

    return wgrad_blocks(batch, channels, height, width, taps)


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
def shift_add_fwd(u: Tensor, offsets: Tensor, sy: Tensor, sx: Tensor, out_hw: Tuple[int, int],
                  out: Optional[Tensor] = None) -> Tensor:
    """``out``: a contiguous ``(B, C, H, W)`` tensor of ``u``'s dtype (float32/64) and device to
    write into instead of allocating (the benchmark times the stage so)."""
    cdt = _compute_dtype(u.dtype)
    b, c, (h, w) = u.shape[0], offsets.numel() - 1, out_hw
    if out is None:
        y = u.new_empty((b, c, h, w), dtype=cdt)
    elif (tuple(out.shape) != (b, c, h, w) or out.dtype != u.dtype or u.dtype != cdt or out.device != u.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {(b, c, h, w)} {u.dtype} tensor on {u.device} "
                         f"(float32 or float64), got {tuple(out.shape)} {out.dtype} on {out.device}")
    else:
        y = out
    if y.numel() == 0:
        return y.to(u.dtype)
    if u.shape[1] == 0:
        return y.zero_().to(u.dtype)
    _check_index_range(u, y)
    with _runtime.launch(u.device):
        args = (_prep(u, cdt), _prep(offsets, torch.int32), _prep(sy, torch.int32), _prep(sx, torch.int32))
        if _style(u.device) != "cpu":
            kernel, _ = _shift_add_kernels(cdt, u.device)
            kernel(*args, y)
        else:
            stores, dst = _flat_output(y)
            kernel, _ = _shift_add_kernels(cdt, u.device, stores)
            kernel(*args, h, w, dst)
    return y if u.dtype == cdt else y.to(u.dtype)


def _flat_output(y: Tensor) -> Tuple[str, Tensor]:
    """``(stores, view)``: how a CPU forward kernel writes the contiguous output ``y``
    (``taichi_kernels.fused.STORE_MODES``): float32 rows of even width on an 8-byte aligned
    output two values per store, through a float64 view; anything else one by one, flattened."""
    flat = y.view(-1)
    if y.dtype == torch.float32 and y.shape[-1] % 2 == 0 and y.data_ptr() % 8 == 0:
        return "pairs", flat.view(torch.float64)
    return "one", flat


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
        out = (*u_hw, gu.view(-1)) if _style(gy.device) == "cpu" else (gu,)
        bwd(_prep(gy, cdt), _prep(tile_channel, torch.int32), _prep(sy, torch.int32), _prep(sx, torch.int32), *out)
    return gu if gy.dtype == cdt else gu.to(gy.dtype)


# The ops are torch.library custom ops: torch.compile and torch.export see opaque ops whose
# output shapes come from the fake implementations, and autograd is registered with each.
@torch.library.custom_op("shiftwise::shift_add", mutates_args=())
def shift_add(u: Tensor, offsets: Tensor, tile_channel: Tensor, sy: Tensor, sx: Tensor, out_h: int,
              out_w: int) -> Tensor:
    """``y[b,c,h,w] = sum_{t in c} u[b, t, h + sy[t], w + sx[t]]`` (zero outside ``u``)."""
    return shift_add_fwd(u, offsets, sy, sx, (out_h, out_w))


@shift_add.register_fake
def _(u, offsets, tile_channel, sy, sx, out_h, out_w):
    return u.new_empty((u.shape[0], offsets.shape[0] - 1, out_h, out_w))


@torch.library.custom_op("shiftwise::shift_add_transpose", mutates_args=())
def shift_add_transpose(gy: Tensor, offsets: Tensor, tile_channel: Tensor, sy: Tensor, sx: Tensor, u_h: int,
                        u_w: int) -> Tensor:
    """The adjoint of :func:`shift_add`: ``gu[b,t,a,e] = gy[b, c(t), a - sy[t], e - sx[t]]``."""
    return shift_add_bwd(gy, tile_channel, sy, sx, (u_h, u_w))


@shift_add_transpose.register_fake
def _(gy, offsets, tile_channel, sy, sx, u_h, u_w):
    return gy.new_empty((gy.shape[0], tile_channel.shape[0], u_h, u_w))


def _save_index_args(ctx, inputs, output):
    data, offsets, tile_channel, sy, sx, _, _ = inputs
    ctx.save_for_backward(offsets, tile_channel, sy, sx)
    ctx.data_hw = (data.shape[2], data.shape[3])


def _shift_add_backward(ctx, gy):
    offsets, tile_channel, sy, sx = ctx.saved_tensors
    return shift_add_transpose(gy, offsets, tile_channel, sy, sx, *ctx.data_hw), None, None, None, None, None, None


def _shift_add_transpose_backward(ctx, ggu):
    offsets, tile_channel, sy, sx = ctx.saved_tensors
    return shift_add(ggu, offsets, tile_channel, sy, sx, *ctx.data_hw), None, None, None, None, None, None


shift_add.register_autograd(_shift_add_backward, setup_context=_save_index_args)
shift_add_transpose.register_autograd(_shift_add_transpose_backward, setup_context=_save_index_args)


# fused conv -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _torch_on_calling_thread(device: torch.device):
    """Run the PyTorch ops inside on the calling thread only (CPU).

    After a parallel op, PyTorch's OpenMP workers spin for milliseconds (libgomp's default
    wait policy) and take the cores from the Taichi threads launched next: on 2 cores a fused
    forward that padded its chunks with 2 threads ran 27 ms instead of 21 ms. The copies here
    are small; a single thread does them without leaving a spinning worker behind.
    """
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _channel_chunks(x: Tensor, tile_size: int):
    """``(c0, padded chunk)`` pairs covering ``x``'s channels, columns padded for the CPU kernels.

    Every chunk is copied into one buffer, so a chunk is valid until the next one is taken and
    only one is alive at a time: ``F.pad`` per chunk allocated the next chunk while the last was
    still referenced (two alive per input, four at the weight gradient's peak: RepLKNet stack,
    R = 16, K = 7: 1.56x the depthwise conv's training-step peak). Every row of the buffer is
    ``W + left + right`` wide whatever the chunk's channel count, so its zero columns are written
    once; each chunk's values by one strided copy: 2.3 ms for the paper case's eight chunks
    against 5.3-7.8 ms for ``F.pad`` (docs/backends.md)."""
    left, right = _column_padding(tile_size)
    b, c, h, w = x.shape
    wp = w + left + right
    per_channel = b * h * wp
    budget = max(_MIN_CHUNK, x.numel() // CHUNK_SHARE)
    step = max(1, min(c, budget // max(1, per_channel)))
    buffer = x.new_empty(step * per_channel)
    rows = buffer.view(-1, wp)  # every row of every chunk layout
    with _torch_on_calling_thread(x.device):
        rows[:, :left].zero_()
        rows[:, left + w:].zero_()
    for c0 in range(0, c, step):
        cc = min(step, c - c0)
        xp = buffer[:cc * per_channel].view(b, cc, h, wp)
        with _torch_on_calling_thread(x.device):
            xp[..., left:left + w].copy_(x[:, c0:c0 + cc])
        yield c0, xp


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
        if _style(x.device) == "gpu":
            fwd, _ = _fused_kernels(cdt, n, x.device)
            fwd(xc, *args, 0, origin, y)
        else:
            stores, dst = _flat_output(y)
            fwd, _ = _fused_kernels(cdt, n, x.device, stores)
            for c0, xp in _channel_chunks(xc, n):
                fwd(xp, *args, c0, origin, c, w, dst)
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
            rows, nblocks = _wgrad_blocks(*xc.shape, gw.numel())
            wgrad(xc, gyc, *args[1:], origin, rows, gw.new_empty((nblocks, *gw.shape)), gw)
        else:
            for (c0, xp), (_, gyp) in zip(_channel_chunks(xc, n), _channel_chunks(gyc, n)):
                wgrad(xp, gyp, *args, c0, origin, gw)
    return gw if x.dtype == cdt else gw.to(x.dtype)


@torch.library.custom_op("shiftwise::fused_conv", mutates_args=())
def fused_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], offsets: Tensor, dy: Tensor, dx: Tensor,
               tile_channel: Tensor, origin: int) -> Tensor:
    """The shift-wise conv in one kernel; ``origin`` is ``N//2`` (other values: transposed use)."""
    return fused_conv_fwd(x, weight, bias, offsets, dy, dx, origin)


@fused_conv.register_fake
def _(x, weight, bias, offsets, dy, dx, tile_channel, origin):
    return x.new_empty(x.shape)


@torch.library.custom_op("shiftwise::fused_conv_wgrad", mutates_args=())
def fused_conv_weight_grad(x: Tensor, gy: Tensor, offsets: Tensor, dy: Tensor, dx: Tensor, tile_channel: Tensor,
                           origin: int, tile_size: int) -> Tensor:
    """The weight gradient of :func:`fused_conv` for output gradient ``gy``."""
    return fused_conv_wgrad(x, gy, offsets, dy, dx, tile_channel, origin, tile_size)


@fused_conv_weight_grad.register_fake
def _(x, gy, offsets, dy, dx, tile_channel, origin, tile_size):
    return x.new_empty((tile_channel.shape[0], tile_size, tile_size))


def _fused_setup(ctx, inputs, output):
    x, weight, bias, offsets, dy, dx, tile_channel, origin = inputs
    ctx.save_for_backward(x, weight, offsets, dy, dx, tile_channel)
    ctx.origin = origin
    ctx.has_bias = bias is not None


def _fused_backward(ctx, gy):
    x, weight, offsets, dy, dx, tile_channel = ctx.saved_tensors
    n = weight.shape[-1]
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = fused_conv(gy, weight.flip(1, 2), None, offsets, -dy, -dx, tile_channel, n - 1 - ctx.origin)
    if ctx.needs_input_grad[1]:
        gw = fused_conv_weight_grad(x, gy, offsets, dy, dx, tile_channel, ctx.origin, n)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        with _torch_on_calling_thread(gy.device):
            gb = gy.sum((0, 2, 3))
    return gx, gw, gb, None, None, None, None, None


def _wgrad_setup(ctx, inputs, output):
    x, gy, offsets, dy, dx, tile_channel, origin, _ = inputs
    ctx.save_for_backward(x, gy, offsets, dy, dx, tile_channel)
    ctx.origin = origin


def _wgrad_backward(ctx, ggw):
    x, gy, offsets, dy, dx, tile_channel = ctx.saved_tensors
    n = ggw.shape[-1]
    gx = ggy = None
    if ctx.needs_input_grad[0]:
        gx = fused_conv(gy, ggw.flip(1, 2), None, offsets, -dy, -dx, tile_channel, n - 1 - ctx.origin)
    if ctx.needs_input_grad[1]:
        ggy = fused_conv(x, ggw, None, offsets, dy, dx, tile_channel, ctx.origin)
    return gx, ggy, None, None, None, None, None, None


fused_conv.register_autograd(_fused_backward, setup_context=_fused_setup)
fused_conv_weight_grad.register_autograd(_wgrad_backward, setup_context=_wgrad_setup)


# shift-add over shared planes -----------------------------------------------------------------
def _plane_shift_add_kernel(dtype: torch.dtype, device: torch.device, stores: str = "one"):
    from shiftwise.taichi_kernels import plane_shift_add_kernels  # noqa: PLC0415

    return plane_shift_add_kernels(_COMPUTE_DTYPES[dtype], _style(device), stores)


def plane_gather(x: Tensor, offsets: Tensor, src: Tensor, sy: Tensor, sx: Tensor, sign: int,
                 out_hw: Tuple[int, int]) -> Tensor:
    """``y[b,c,h,w] = sum_{t in c} x[b, src[t], h + sign*sy[t], w + sign*sx[t]]`` (zero outside
    ``x``; CSR ``offsets`` over the ``C`` destination channels; no autograd)."""
    cdt = _compute_dtype(x.dtype)
    b, c, (h, w) = x.shape[0], offsets.numel() - 1, out_hw
    y = x.new_empty((b, c, h, w), dtype=cdt)
    if y.numel() == 0:
        return y.to(x.dtype)
    if src.numel() == 0 or x.numel() == 0:
        return y.zero_().to(x.dtype)
    _check_index_range(x, y)
    with _runtime.launch(x.device):
        args = (_prep(x, cdt), _prep(offsets, torch.int32), _prep(src, torch.int32), _prep(sy, torch.int32),
                _prep(sx, torch.int32), int(sign))
        if _style(x.device) != "cpu":
            _plane_shift_add_kernel(cdt, x.device)(*args, y)
        else:
            stores, dst = _flat_output(y)
            _plane_shift_add_kernel(cdt, x.device, stores)(*args, h, w, dst)
    return y if x.dtype == cdt else y.to(x.dtype)


# Both ops take the whole plan (entries by output channel, then by plane), so that each one's
# backward is the other with the same arguments.
@torch.library.custom_op("shiftwise::plane_shift_add", mutates_args=())
def plane_shift_add(planes: Tensor, out_offsets: Tensor, plane: Tensor, dy: Tensor, dx: Tensor,
                    plane_offsets: Tensor, plane_out: Tensor, plane_dy: Tensor, plane_dx: Tensor, out_h: int,
                    out_w: int) -> Tensor:
    """``y[b,o,h,w] = sum_{e in o} planes[b, plane[e], h + dy[e], w + dx[e]]`` (zero outside ``planes``)."""
    return plane_gather(planes, out_offsets, plane, dy, dx, 1, (out_h, out_w))


@plane_shift_add.register_fake
def _(planes, out_offsets, plane, dy, dx, plane_offsets, plane_out, plane_dy, plane_dx, out_h, out_w):
    return planes.new_empty((planes.shape[0], out_offsets.shape[0] - 1, out_h, out_w))


@torch.library.custom_op("shiftwise::plane_shift_add_transpose", mutates_args=())
def plane_shift_add_transpose(gy: Tensor, out_offsets: Tensor, plane: Tensor, dy: Tensor, dx: Tensor,
                              plane_offsets: Tensor, plane_out: Tensor, plane_dy: Tensor, plane_dx: Tensor,
                              planes_h: int, planes_w: int) -> Tensor:
    """The adjoint of :func:`plane_shift_add`:
    ``gu[b,p,a,e] = sum_{entries of p} gy[b, plane_out, a - plane_dy, e - plane_dx]``."""
    return plane_gather(gy, plane_offsets, plane_out, plane_dy, plane_dx, -1, (planes_h, planes_w))


@plane_shift_add_transpose.register_fake
def _(gy, out_offsets, plane, dy, dx, plane_offsets, plane_out, plane_dy, plane_dx, planes_h, planes_w):
    return gy.new_empty((gy.shape[0], plane_offsets.shape[0] - 1, planes_h, planes_w))


def _save_plane_plan(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:9])
    ctx.data_hw = (inputs[0].shape[2], inputs[0].shape[3])


def _plane_shift_add_backward(ctx, gy):
    return (plane_shift_add_transpose(gy, *ctx.saved_tensors, *ctx.data_hw),) + (None,) * 10


def _plane_shift_add_transpose_backward(ctx, ggu):
    return (plane_shift_add(ggu, *ctx.saved_tensors, *ctx.data_hw),) + (None,) * 10


plane_shift_add.register_autograd(_plane_shift_add_backward, setup_context=_save_plane_plan)
plane_shift_add_transpose.register_autograd(_plane_shift_add_transpose_backward, setup_context=_save_plane_plan)
