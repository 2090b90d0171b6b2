"""Building blocks shared by the reference architectures (parameter names follow the originals)."""
from __future__ import annotations

import copy
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import ShiftWiseConv2d

DEFAULT_TILE_SIZE = 5  # the small kernel of every released SLaK and RepLKNet


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(total: float, depths) -> list:
    """Per-block rates rising linearly from 0 to ``total`` over all blocks, split per stage."""
    n = sum(depths)
    rates = [total * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    out, start = [], 0
    for d in depths:
        out.append(rates[start:start + d])
        start += d
    return out


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` tensor (``weight``/``bias`` of shape ``(C,)``)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module, so that ``nn.Sequential`` indices match the originals."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def with_children(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A new ``module`` sharing its parameters, buffers and other children, with ``children`` swapped in.

    For a ``to_shiftwise()`` that must replace a parent (to fold a BatchNorm that follows the
    large kernel) while leaving the original untouched.
    """
    new = copy.copy(module)
    for key, value in vars(module).items():  # own containers, so that setattr below leaves module as it is
        if isinstance(value, (dict, set, list)):
            new.__dict__[key] = copy.copy(value)
    for name, child in children.items():
        setattr(new, name, child)
    return new


class FourStageNet(nn.Module):
    """The skeleton SLaK, UniRepLKNet and SW networks share: ``downsample_layers[i]`` then
    ``stages[i]`` for four stages, global average pooling, ``norm`` (LayerNorm) and ``head``."""

    def _add_head(self, width: int, num_classes: int) -> None:
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x.mean((-2, -1)))  # global average pooling, (N, C, H, W) -> (N, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def check_foldable(batchnorms: Iterable[Optional[nn.Module]]) -> None:
    """Refuse to fold a BatchNorm in training mode: it would use batch statistics, not its running ones."""
    if any(bn is not None and bn.training for bn in batchnorms):
        raise ValueError("in training mode: its BatchNorm would use batch statistics, so folding the running "
                         "statistics changes the output; call model.eval() first")


def _pair(k) -> Tuple[int, int]:
    return (k, k) if isinstance(k, int) else tuple(k)


def depthwise_conv(channels: int, kernel_size, bias: bool = False) -> nn.Conv2d:
    """Depthwise stride-1 conv that keeps the size: padding ``(KH//2, KW//2)``."""
    kh, kw = _pair(kernel_size)
    return nn.Conv2d(channels, channels, (kh, kw), padding=(kh // 2, kw // 2), groups=channels, bias=bias)


def conv_bn(in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0, groups: int = 1,
            bn: bool = True, relu: bool = False) -> nn.Sequential:
    """``Sequential(conv (no bias), bn[, nonlinear ReLU])`` with the key names ``conv``/``bn``/``nonlinear``."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                     groups=groups, bias=False))
    if bn:
        seq.add_module("bn", nn.BatchNorm2d(out_channels))
    if relu:
        seq.add_module("nonlinear", nn.ReLU())
    return seq


def dw_conv_bn(channels: int, kernel_size, bn: bool = True) -> nn.Sequential:
    """Depthwise size-keeping ``conv_bn`` (padding ``(KH//2, KW//2)`` per axis)."""
    kh, kw = _pair(kernel_size)
    return conv_bn(channels, channels, (kh, kw), padding=(kh // 2, kw // 2), groups=channels, bn=bn)


class ReparamLargeKernelConv(nn.Module):
    """Depthwise large-kernel conv with parallel re-parameterisable branches (SLaK, RepLKNet).

    Branches, each a depthwise conv (no bias) then BatchNorm, summed:

    * ``decompose=False``: ``lkb_origin`` ``K x K``; ``decompose=True`` (SLaK): ``LoRA1``
      ``K x S`` and ``LoRA2`` ``S x K``;
    * ``small_conv`` ``S x S`` when ``with_small_conv``.

    ``merged=True`` holds the single equivalent conv ``lkb_reparam`` ``K x K`` with bias instead.

    Args:
        channels: ``C``.
        kernel_size: ``K`` (odd).
        small_kernel: ``S`` (odd), or ``None`` (no decomposition and no small branch).
        decompose: SLaK's ``Decom`` strips instead of a square kernel (default False).
        bn: BatchNorm after every branch (default True; SLaK's ``bn=False`` has none).
        with_small_conv: add the ``S x S`` branch (default True).
        merged: the deploy form, ``lkb_reparam`` (default False).

    Shape: ``(B, C, H, W) -> (B, C, H, W)``.

    ``to_shiftwise(tile_size)`` returns the equivalent :class:`ShiftWiseConv2d`: every branch
    BN-folded and tiled on its own, so SLaK's ``51 x 5`` + ``5 x 51`` + ``5 x 5`` become
    11 + 11 + 1 - 2 = 21 tiles per channel, not the 121 of the merged ``51 x 51``.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: Optional[int], decompose: bool = False,
                 bn: bool = True, with_small_conv: bool = True, merged: bool = False):
        super().__init__()
        for name, k in (("kernel_size", kernel_size), ("small_kernel", small_kernel)):
            if k is not None and (not isinstance(k, int) or k < 1 or k % 2 == 0):
                raise ValueError(f"{name} must be a positive odd int (even kernels change the map size), got {k!r}")
        if small_kernel is None and (decompose or with_small_conv):
            raise ValueError("small_kernel=None allows neither decompose nor with_small_conv")
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.decompose = decompose
        if merged:
            self.lkb_reparam = depthwise_conv(channels, kernel_size, bias=True)
            return
        if decompose:
            self.LoRA1 = dw_conv_bn(channels, (kernel_size, small_kernel), bn)
            self.LoRA2 = dw_conv_bn(channels, (small_kernel, kernel_size), bn)
        else:
            self.lkb_origin = dw_conv_bn(channels, kernel_size, bn)
        if with_small_conv:
            self.small_conv = dw_conv_bn(channels, small_kernel, bn)

    def branches(self) -> list:
        """The parallel ``(conv, bn or None)`` pairs whose outputs are summed."""
        if hasattr(self, "lkb_reparam"):
            return [(self.lkb_reparam, None)]
        names = ("LoRA1", "LoRA2") if self.decompose else ("lkb_origin",)
        names += ("small_conv",) if hasattr(self, "small_conv") else ()
        return [(getattr(self, n).conv, getattr(getattr(self, n), "bn", None)) for n in names]

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for conv, bn in self.branches():
            y = conv(x) if bn is None else bn(conv(x))
            out = y if out is None else out + y
        return out

    @property
    def default_tile_size(self) -> int:
        """The small kernel (5 when there is none, as in RepLKNet-XL)."""
        return self.small_kernel or DEFAULT_TILE_SIZE

    @torch.no_grad()
    def to_shiftwise(self, tile_size: Optional[int] = None, layout: str = "auto",
                     backend: Optional[str] = None) -> ShiftWiseConv2d:
        """The equivalent :class:`ShiftWiseConv2d` (BatchNorms folded; ``self`` is left as it is)."""
        branches = self.branches()
        check_foldable(bn for _, bn in branches)
        tile = self.default_tile_size if tile_size is None else tile_size
        return ShiftWiseConv2d.from_branches(branches, tile, layout=layout, backend=backend).train(self.training)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, decompose={self.decompose}"
