"""SLaK: a ConvNeXt with sparse, decomposed 51x51 kernels.

"More ConvNets in the 2020s: Scaling up Kernels Beyond 51x51 using Sparsity", Liu et al.,
ICLR 2023 (https://arxiv.org/abs/2207.03620). The ``state_dict`` has the key names and shapes
of the official ``models/SLaK.py`` (VITA-Group/SLaK), so released checkpoints load with
``strict=True``: 470 tensors for SLaK-T, 920 for SLaK-S and SLaK-B.

Released variants use ``width_factor=1.3``, ``Decom=True``, ``bn=True`` and
``kernel_size=[51, 49, 47, 13, 5]``: one large kernel per stage, then the small kernel ``S``.
The 31x31 and 61x61 checkpoints of the kernel-size study change the stage kernels; any odd
list works (a checkpoint's list can be read off its ``LoRA1`` shapes). Files saved before the
official code renamed ``Decom1``/``Decom2`` to ``LoRA1``/``LoRA2`` are renamed on reading.

Shift-wise form: each block's ``large_kernel`` becomes one ``ShiftWiseConv2d`` (see
``ReparamLargeKernelConv.to_shiftwise``); the default tile is the small kernel ``S``.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import CheckpointError
from . import sw_keys
from ._family import Family, block_counts, shape_of
from ._layers import DropPath, FourStageNet, LayerNorm2d, ReparamLargeKernelConv, drop_path_rates


@dataclasses.dataclass(frozen=True)
class SLaKConfig:
    """Architecture of a :class:`SLaK` (JSON-serialisable; lists are normalised to tuples).

    Args:
        depths: blocks per stage (default SLaK-T ``(3, 3, 9, 3)``).
        dims: stage widths before ``width_factor`` (default ``(96, 192, 384, 768)``).
        width_factor: widths are ``int(d * width_factor)`` (default 1.3: 124, 249, 499, 998).
        kernel_size: the four stage kernels then the small kernel (default ``(51, 49, 47, 13, 5)``).
        decom: ``K x S`` + ``S x K`` strips (``LoRA1``/``LoRA2``) instead of ``K x K`` (default True).
        bn: BatchNorm after every large-kernel branch (default True).
        num_classes: head outputs (default 1000).
        in_chans: input channels (default 3).
        stem_kernel, stem_stride: the patchify stem conv (default 4 and 4, as released).
        layer_scale_init_value: initial ``gamma`` (default 1e-6; 0 drops ``gamma``).
        drop_path_rate: stochastic depth at the last block (default 0).
    """

    depths: Tuple[int, ...] = (3, 3, 9, 3)
    dims: Tuple[int, ...] = (96, 192, 384, 768)
    width_factor: float = 1.3
    kernel_size: Tuple[int, ...] = (51, 49, 47, 13, 5)
    decom: bool = True
    bn: bool = True
    num_classes: int = 1000
    in_chans: int = 3
    stem_kernel: int = 4
    stem_stride: int = 4
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0

    def __post_init__(self):
        for name in ("depths", "dims", "kernel_size"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.depths) != 4 or len(self.dims) != 4 or min(self.depths) < 0 or min(self.dims) < 1:
            raise ValueError(f"SLaK needs 4 stage depths >= 0 and 4 dims >= 1, got depths={self.depths}, "
                             f"dims={self.dims}")
        if len(self.kernel_size) != 5 or any(k < 1 or k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"kernel_size must be 4 stage kernels then the small kernel, all odd, "
                             f"got {self.kernel_size}")
        if min(self.widths) < 1:
            raise ValueError(f"width_factor {self.width_factor} gives stage widths {self.widths}")

    @property
    def widths(self) -> Tuple[int, ...]:
        """Actual stage widths, rounded down as the original does."""
        return tuple(int(d * self.width_factor) for d in self.dims)


class Block(nn.Module):
    """SLaK block: large-kernel conv, LayerNorm, MLP (4x), layer scale, residual.

    Args:
        dim: channels.
        kernel_size: the large kernel ``K``.
        small_kernel: ``S``; the ``S x S`` branch exists when ``S < K``.
        decom, bn: see :class:`SLaKConfig`.
        drop_path: stochastic depth probability (default 0).
        layer_scale_init_value: initial ``gamma`` (default 1e-6; 0 means no ``gamma``).
    """

    def __init__(self, dim: int, kernel_size: int, small_kernel: int, decom: bool = True, bn: bool = True,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.large_kernel = ReparamLargeKernelConv(dim, kernel_size, small_kernel, decompose=decom, bn=bn,
                                                   with_small_conv=small_kernel < kernel_size)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        use_gamma = layer_scale_init_value > 0
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) if use_gamma else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.large_kernel(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)


class SLaK(FourStageNet):
    """SLaK classifier. Keyword arguments are the fields of :class:`SLaKConfig`.

    Shape: ``(B, in_chans, H, W) -> (B, num_classes)``; ``H`` and ``W`` divisible by
    ``stem_stride * 8`` keep every stage's map whole (224 -> 56, 28, 14, 7).

    Example::

        >>> model = SLaK(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), width_factor=1.0).eval()
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """

    config_class = SLaKConfig

    def __init__(self, **kwargs):
        super().__init__()
        cfg = self.config = SLaKConfig(**kwargs)
        dims = cfg.widths
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(cfg.in_chans, dims[0], cfg.stem_kernel, stride=cfg.stem_stride),
            LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        small = cfg.kernel_size[-1]
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(dims[i], cfg.kernel_size[i], small, cfg.decom, cfg.bn, rates[i][j],
                                  cfg.layer_scale_init_value) for j in range(cfg.depths[i])))
            for i in range(4))
        self._add_head(dims[-1], cfg.num_classes)
        self.apply(_init_weights)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


VARIANTS = {
    "slak_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "slak_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "slak_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    # a few-second-to-train SLaK for 32x32 inputs (16, 8, 4, 2 maps): same structure, small sizes
    "slak_demo": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), width_factor=1.0,
                      kernel_size=(31, 15, 9, 7, 5), stem_kernel=2, stem_stride=2, num_classes=10),
}


# checkpoints -------------------------------------------------------------------------------------------
SEGMENT_RENAMES = {"Decom1": "LoRA1", "Decom2": "LoRA2"}  # key segments before the official rename


def rename_keys(sd) -> Tuple[dict, List[str]]:
    """Old ``Decom1``/``Decom2`` key segments to ``LoRA1``/``LoRA2``."""
    if not any(p in SEGMENT_RENAMES for k in sd for p in k.split(".")):
        return sd, []
    out = {".".join(SEGMENT_RENAMES.get(p, p) for p in k.split(".")): v for k, v in sd.items()}
    return out, ["renamed Decom1/Decom2 to LoRA1/LoRA2"]


def detect(sd) -> bool:
    return "downsample_layers.0.0.weight" in sd and any(".large_kernel." in k for k in sd) and not sw_keys.detect(sd)


def infer_config(sd, hints=None) -> dict:
    """``{"name", "kwargs"}`` from the shapes: depths, widths, stage and small kernels, strips, BN, classes."""
    stem = shape_of(sd, "downsample_layers.0.0.weight", "SLaK")  # (C0, in, k, k)
    widths = [stem[0]] + [shape_of(sd, f"downsample_layers.{i}.1.weight", "SLaK")[0] for i in (1, 2, 3)]
    counts = block_counts(sd, r"stages\.(\d+)\.(\d+)\.")
    depths = [counts.get(i, 0) for i in range(4)]
    kernels: List[Optional[int]] = []
    small = None
    decom = bn = False
    for i in range(4):
        if not depths[i]:
            kernels.append(None)
            continue
        p = f"stages.{i}.0.large_kernel."
        if p + "LoRA1.conv.weight" in sd:
            _, _, k, small = sd[p + "LoRA1.conv.weight"].shape
            decom = True
        elif p + "lkb_origin.conv.weight" in sd:
            k = sd[p + "lkb_origin.conv.weight"].shape[-1]
        else:
            raise CheckpointError(f"SLaK block {p[:-1]} has neither LoRA1 nor lkb_origin weights "
                                  "(a merged lkb_reparam SLaK is not supported)")
        if p + "small_conv.conv.weight" in sd:
            small = sd[p + "small_conv.conv.weight"].shape[-1]
        bn = bn or (p + ("LoRA1" if decom else "lkb_origin") + ".bn.weight") in sd
        kernels.append(int(k))
    known = [k for k in kernels if k is not None]
    small = int(small) if small is not None else max(known, default=5)  # no small branch anywhere
    kernels = [k if k is not None else small for k in kernels]
    first = next((i for i in range(4) if depths[i]), 0)
    kwargs = dict(depths=depths, dims=widths, width_factor=1.0, kernel_size=kernels + [small], decom=decom, bn=bn,
                  num_classes=shape_of(sd, "head.weight", "SLaK")[0], in_chans=stem[1], stem_kernel=stem[2],
                  stem_stride=stem[2], layer_scale_init_value=1e-6 if f"stages.{first}.0.gamma" in sd else 0.0)
    for name, variant in VARIANTS.items():
        cfg = SLaKConfig(**variant)
        if list(cfg.depths) == depths and list(cfg.widths) == widths:
            kwargs.update(dims=list(cfg.dims), width_factor=cfg.width_factor)
            return {"name": name, "kwargs": kwargs}
    return {"name": "slak", "kwargs": kwargs}


FAMILY = Family("slak", "SLaK", SLaK, VARIANTS, detect, infer_config, rename_keys)
