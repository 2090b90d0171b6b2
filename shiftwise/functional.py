"""Public ops: check arguments, pick a backend (:mod:`shiftwise.dispatch`), run it.

Backends (``backend=`` argument, else the ``SHIFTWISE_BACKEND`` environment variable, else
``"auto"``):

* ``"auto"``: per call, PyTorch's depthwise conv of the merged kernel or the fused Taichi
  kernel, whichever the measured rule says is faster (:func:`shiftwise.dispatch.choose_auto_path`);
  the torch reference where Taichi cannot run (the reason is logged).
* ``"taichi"`` / ``"taichi_fused"``: the whole conv in one Taichi kernel (no per-tile planes);
  its backward is the same kernel (input gradient) and a weight-gradient kernel. Raises if
  Taichi cannot run.
* ``"taichi_decomposed"``: small convs by PyTorch, then the Taichi shift-add. Holds ``T``
  planes of the input's size (11-21x the activation for SLaK shapes).
* ``"torch"``: the pure-PyTorch reference (:mod:`shiftwise.reference`).

``docs/backends.md`` describes them and the measurements behind the rule.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import onnx_form, ops, reference
from .dispatch import BACKENDS, conv_path, cross_conv, dense_conv, resolve_backend
from .tiling import ShiftAddPlan, TilePlan

__all__ = ["BACKENDS", "check_conv_args", "decomposed_planes", "plane_shift_add", "shift_add", "shiftwise_conv2d"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_same_device(**tensors) -> torch.device:
    devices = {k: t.device for k, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return first


def shift_add(input: Tensor, offsets: Tensor, shift_y: Tensor, shift_x: Tensor, output_size: Tuple[int, int],
              backend: Optional[str] = None) -> Tensor:
    """Sum shifted planes per channel: the shift-add stage of a shift-wise conv.

    ``y[b, c, h, w] = sum_{t = offsets[c]}^{offsets[c+1]-1} input[b, t, h + shift_y[t], w + shift_x[t]]``,
    reading zero outside ``input``.

    Args:
        input: ``(B, T, Hu, Wu)`` float tensor, one plane per tile.
        offsets: int ``(C + 1,)`` CSR offsets grouping tiles by output channel.
        shift_y, shift_x: int ``(T,)`` shifts.
        output_size: ``(H, W)`` of the output.
        backend: one of :data:`BACKENDS` (see module docs); every Taichi one runs the same kernel.

    Returns:
        ``(B, C, H, W)`` tensor of ``input``'s dtype.

    Example::

        >>> u = torch.randn(2, 6, 9, 9)
        >>> offsets = torch.tensor([0, 3, 6], dtype=torch.int32)
        >>> s = torch.tensor([0, 2, 4, 0, 2, 4], dtype=torch.int32)
        >>> shift_add(u, offsets, s, s, (5, 5)).shape
        torch.Size([2, 2, 5, 5])
    """
    if input.dim() != 4:
        raise ValueError(f"shift_add input must be (B, T, H, W), got shape {tuple(input.shape)}")
    if input.dtype not in _FLOAT:
        raise TypeError(f"shift_add input must be a float tensor, got {input.dtype}")
    t = input.shape[1]
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must be 1-D with C + 1 >= 2 entries, got shape {tuple(offsets.shape)}")
    if shift_y.shape != (t,) or shift_x.shape != (t,):
        raise ValueError(f"shift_y and shift_x must have shape ({t},) (one per input plane), "
                         f"got {tuple(shift_y.shape)} and {tuple(shift_x.shape)}")
    h, w = (int(s) for s in output_size)
    if h < 0 or w < 0:
        raise ValueError(f"output_size must be non-negative, got {output_size}")
    dev = _check_same_device(input=input, offsets=offsets, shift_y=shift_y, shift_x=shift_x)
    off_cpu = offsets.detach().cpu()
    if int(off_cpu[0]) != 0 or int(off_cpu[-1]) != t or bool((off_cpu[1:] < off_cpu[:-1]).any()):
        raise ValueError(f"offsets must start at 0, be non-decreasing and end at T={t}")
    if resolve_backend(backend, dev) == "torch":
        return reference.shift_add(input, offsets, shift_y, shift_x, (h, w))
    # every Taichi backend runs the same shift-add kernel
    c = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).long()
    tile_channel = torch.repeat_interleave(torch.arange(c, device=dev, dtype=torch.int32), counts, output_size=t)
    return ops.shift_add(input, offsets.to(torch.int32), tile_channel, shift_y.to(torch.int32),
                         shift_x.to(torch.int32), h, w)


def plane_shift_add(planes: Tensor, plan: ShiftAddPlan, output_size: Tuple[int, int],
                    backend: Optional[str] = None) -> Tensor:
    """Sum shifted planes into output channels, several entries per plane: a general shift-add.

    ``y[b, o, h, w] = sum_{e: out[e] == o} planes[b, plane[e], h + dy[e], w + dx[e]]``, reading
    zero outside ``planes``; the entries come from ``plan``
    (:meth:`~shiftwise.tiling.ShiftAddPlan.from_entries`). The Taichi kernels compute it as a
    gather per output element and its gradient as a gather per plane element (the entries grouped
    by plane), so both are deterministic.

    Args:
        planes: ``(B, P, Hu, Wu)`` float tensor, ``P = plan.num_planes``.
        plan: :class:`~shiftwise.tiling.ShiftAddPlan`.
        output_size: ``(H, W)`` of the output.
        backend: as for :func:`shift_add`: ``"torch"`` runs the PyTorch twin
            (:func:`shiftwise.reference.plane_shift_add`), every Taichi backend the Taichi kernels;
            ``"auto"`` the kernels where Taichi can run.

    Returns:
        ``(B, O, H, W)`` tensor of ``planes``' dtype, ``O = plan.num_outputs`` (float32 under
        ``torch.autocast``, as :func:`shiftwise_conv2d`).

    Example::

        >>> from shiftwise.tiling import ShiftAddPlan
        >>> plan = ShiftAddPlan.from_entries([0, 0, 1], [0, 0, 0], [0, 0, 1], [0, 2, 0], num_outputs=2, num_planes=1)
        >>> u = torch.arange(16.).view(1, 1, 4, 4)
        >>> plane_shift_add(u, plan, (2, 2))[0]  # out 0: u + u shifted 2 columns; out 1: u one row down
        tensor([[[ 2.,  4.],
                 [10., 12.]],
        <BLANKLINE>
                [[ 4.,  5.],
                 [ 8.,  9.]]])
    """
    if planes.device.type != "meta" and torch.is_autocast_enabled(planes.device.type):
        if planes.dtype in (torch.float16, torch.bfloat16):
            planes = planes.float()
        with torch.autocast(planes.device.type, enabled=False):
            return plane_shift_add(planes, plan, output_size, backend)
    if not isinstance(plan, ShiftAddPlan):
        raise TypeError(f"plan must be a shiftwise.tiling.ShiftAddPlan, got {type(plan).__name__}")
    if planes.dim() != 4:
        raise ValueError(f"planes must be (B, P, H, W), got shape {tuple(planes.shape)}")
    if planes.dtype not in _FLOAT:
        raise TypeError(f"planes must be a float tensor, got {planes.dtype}")
    if planes.shape[1] != plan.num_planes:
        raise ValueError(f"planes has {planes.shape[1]} planes (dim 1) but the plan has {plan.num_planes}")
    if len(output_size) != 2:
        raise ValueError(f"output_size must be (H, W), got {output_size}")
    h, w = (int(s) for s in output_size)
    if h < 0 or w < 0:
        raise ValueError(f"output_size must be non-negative, got {output_size}")
    if plan.device != planes.device:
        plan = plan.to(planes.device)
    if onnx_form.exporting():
        return onnx_form.plane_graph(planes, plan, (h, w))
    index = (plan.out_offsets, plan.plane, plan.dy, plan.dx, plan.plane_offsets, plan.plane_out, plan.plane_dy,
             plan.plane_dx)
    if planes.device.type == "meta":  # shapes only: the custom op's fake implementation
        return ops.plane_shift_add(planes, *index, h, w)
    if resolve_backend(backend, planes.device) == "torch":
        return reference.plane_shift_add(planes, plan, (h, w))
    return ops.plane_shift_add(planes, *index, h, w)


def check_conv_args(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor]) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first argument that does not fit."""
    if not isinstance(plan, TilePlan):
        raise TypeError(f"plan must be a shiftwise.TilePlan, got {type(plan).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != plan.channels:
        raise ValueError(f"input has {x.shape[1]} channels but the plan has {plan.channels}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"input must be a float tensor, got {x.dtype}")
    n = plan.tile_size
    if weight.shape != (plan.num_tiles, n, n):
        raise ValueError(f"weight must have shape (T, N, N) = ({plan.num_tiles}, {n}, {n}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from input dtype {x.dtype}")
    if bias is not None:
        if bias.shape != (plan.channels,):
            raise ValueError(f"bias must have shape ({plan.channels},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from input dtype {x.dtype}")
    _check_same_device(input=x, weight=weight, bias=bias)


def shiftwise_conv2d(input: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Shift-wise depthwise convolution (stride 1, zero padding, output the size of the input).

    ``y[b,c,h,w] = bias[c] + sum_{t in c} sum_{i,j<N} weight[t,i,j] * input[b,c, h+dy_t+i-N//2, w+dx_t+j-N//2]``

    which equals ``F.conv2d(input, merge_tiles(weight, plan)[:, None], bias, padding=P, groups=C)``.

    Args:
        input: ``(B, C, H, W)``.
        weight: ``(T, N, N)`` tile weights, grouped by channel as ``plan`` says.
        plan: :class:`~shiftwise.tiling.TilePlan` with ``C`` channels and ``T`` tiles.
        bias: optional ``(C,)``.
        backend: one of :data:`BACKENDS` (see module docs).

    Example::

        >>> from shiftwise.tiling import split_kernel
        >>> k = torch.randn(4, 51, 5)
        >>> tiles, plan = split_kernel(k, 5)
        >>> x = torch.randn(1, 4, 20, 20)
        >>> y = shiftwise_conv2d(x, tiles, plan)
        >>> torch.allclose(y, F.conv2d(x, k[:, None], padding=(25, 2), groups=4), atol=1e-4)
        True

    Under ``torch.autocast`` it is a float32 op (autocast has no low-precision rule for it and the
    Taichi kernels have no half arithmetic): float16/bfloat16 arguments are cast up and the output
    is float32, as for the ops autocast runs in float32.
    """
    if input.device.type != "meta" and torch.is_autocast_enabled(input.device.type):
        def up(t):
            return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t

        with torch.autocast(input.device.type, enabled=False):
            return shiftwise_conv2d(up(input), up(weight), plan, up(bias), backend)
    check_conv_args(input, weight, plan, bias)
    if plan.offsets.device != input.device:
        plan = plan.to(input.device)
    if onnx_form.exporting():  # standard ops in the form the export asks for: no custom op in the graph
        return onnx_form.export_graph(input, weight, plan, bias)
    if input.device.type == "meta":  # shapes only: the custom op's fake implementation
        return ops.fused_conv(input, weight, bias, plan.offsets, plan.dy, plan.dx, plan.tile_channel(),
                              plan.tile_size // 2)
    name = conv_path(backend, input, weight, plan, bias)
    if name == "dense":
        return dense_conv(input, weight, plan, bias)
    if name == "cross":
        return cross_conv(input, weight, plan, bias)
    if name == "torch":
        return reference.shiftwise_conv2d(input, weight, plan, bias)
    if not torch.compiler.is_compiling():  # tiles that only ever meet the zero padding add nothing
        keep, live = plan.live(input.shape[-2], input.shape[-1])
        if keep is not None:
            weight, plan = weight.index_select(0, keep), live
    if name == "taichi_fused":
        return ops.fused_conv(input, weight, bias, plan.offsets, plan.dy, plan.dx, plan.tile_channel(),
                              plan.tile_size // 2)
    return _decomposed(input, weight, plan, bias)


def decomposed_planes(x: Tensor, weight: Tensor, plan: TilePlan) -> Tuple[Tensor, Tensor, Tensor]:
    """``(u, sy, sx)``: the decomposed path's per-tile small-conv planes of ``x`` (``(B, T, Hu,
    Wu)``) and each tile's row and column shift into them, as :func:`shift_add` takes them.

    The planes hold every position whose window touches the input ("full" padding ``N - 1``;
    the shift-add reads zero beyond them, and the plan's whole reach would make them up to 3x
    larger), less the rows and columns no tile reads (``PlanInfo.plane_layout``)."""
    info = plan.info
    (pad_h, pad_w), (oy, ox) = info.plane_layout
    if info.uniform is not None:
        u = F.conv2d(x, weight.unsqueeze(1), padding=(pad_h, pad_w), groups=info.channels)
    else:
        gathered = x.index_select(1, plan.tile_channel().long())
        u = F.conv2d(gathered, weight.unsqueeze(1), padding=(pad_h, pad_w), groups=info.num_tiles)
    return u, plan.dy + oy, plan.dx + ox


def _decomposed(x: Tensor, weight: Tensor, plan: TilePlan, bias: Optional[Tensor]) -> Tensor:
    info = plan.info
    b, c, h, w = x.shape
    if info.num_tiles == 0:
        y = x.new_zeros(b, c, h, w)
        return y + bias.view(1, c, 1, 1) if bias is not None else y
    u, sy, sx = decomposed_planes(x, weight, plan)
    y = ops.shift_add(u, plan.offsets, plan.tile_channel(), sy, sx, h, w)
    return y + bias.view(1, c, 1, 1) if bias is not None else y
