"""RepLKNet: 31x31 depthwise kernels with a re-parameterised 5x5 branch.

"Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs", Ding et al.,
CVPR 2022 (https://arxiv.org/abs/2203.06717). The ``state_dict`` has the key names and shapes
of the official ``replknet.py`` (DingXiaoH/RepLKNet-pytorch), training form (``lkb_origin`` +
``small_conv``, each conv+BN) or merged form (``lkb_reparam`` with bias, ``merged=True``):
31B and 31L have 1171 tensors (merged 931), XL 1027 (merged 931). mmpretrain's re-hosting
(``backbone.`` prefix, ``head.fc``, the final BN as ``stages.3.norm``) is renamed on reading.

Shift-wise form: each block's ``large_kernel`` becomes one ``ShiftWiseConv2d`` (see
``ReparamLargeKernelConv.to_shiftwise``); the default tile is the small kernel (5; 5 for XL,
which has none).
"""
from __future__ import annotations

import dataclasses
import re
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ._family import Family, block_counts, shape_of, variant_name
from ._layers import DropPath, ReparamLargeKernelConv, conv_bn, drop_path_rates


@dataclasses.dataclass(frozen=True)
class RepLKNetConfig:
    """Architecture of a :class:`RepLKNet` (JSON-serialisable; lists are normalised to tuples).

    Args:
        large_kernel_sizes: kernel per stage (default 31B ``(31, 29, 27, 13)``).
        layers: RepLK blocks per stage, each followed by a ConvFFN (default ``(2, 2, 18, 2)``).
        channels: stage widths (default ``(128, 256, 512, 1024)``).
        small_kernel: the re-parameterisation kernel (default 5; ``None`` for XL: no small branch).
        dw_ratio: depthwise width / stage width (default 1; 1.5 for XL).
        ffn_ratio: ConvFFN hidden width / stage width (default 4).
        merged: the deploy form ``lkb_reparam`` (default False).
        num_classes: head outputs (default 1000; 21841 for the ImageNet-22K heads).
        in_chans: input channels (default 3).
        drop_path_rate: stochastic depth at the last block (default 0).
    """

    large_kernel_sizes: Tuple[int, ...] = (31, 29, 27, 13)
    layers: Tuple[int, ...] = (2, 2, 18, 2)
    channels: Tuple[int, ...] = (128, 256, 512, 1024)
    small_kernel: Optional[int] = 5
    dw_ratio: float = 1.0
    ffn_ratio: float = 4.0
    merged: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    drop_path_rate: float = 0.0

    def __post_init__(self):
        for name in ("large_kernel_sizes", "layers", "channels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.layers)
        if n < 1 or len(self.channels) != n or len(self.large_kernel_sizes) != n:
            raise ValueError(f"layers, channels and large_kernel_sizes need one entry per stage, got "
                             f"{self.layers}, {self.channels}, {self.large_kernel_sizes}")
        if any(k < 1 or k % 2 == 0 for k in self.large_kernel_sizes):
            raise ValueError(f"large_kernel_sizes must be odd, got {self.large_kernel_sizes}")
        s = self.small_kernel
        if s is not None and (s < 1 or s % 2 == 0 or s > min(self.large_kernel_sizes)):
            raise ValueError(f"small_kernel must be odd and at most every large kernel "
                             f"{self.large_kernel_sizes}, got {s}")


class RepLKBlock(nn.Module):
    """BN, 1x1 conv+BN+ReLU, large-kernel depthwise conv, ReLU, 1x1 conv+BN, residual."""

    def __init__(self, in_channels: int, dw_channels: int, kernel_size: int, small_kernel: Optional[int],
                 drop_path: float = 0.0, merged: bool = False):
        super().__init__()
        self.pw1 = conv_bn(in_channels, dw_channels, 1, relu=True)
        self.pw2 = conv_bn(dw_channels, in_channels, 1)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, kernel_size, small_kernel,
                                                   with_small_conv=small_kernel is not None, merged=merged)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(in_channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.pw1(self.prelkb_bn(x))
        y = self.pw2(self.lk_nonlinear(self.large_kernel(y)))
        return x + self.drop_path(y)


class ConvFFN(nn.Module):
    """BN, 1x1 conv+BN, GELU, 1x1 conv+BN, residual."""

    def __init__(self, channels: int, hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.preffn_bn = nn.BatchNorm2d(channels)
        self.pw1 = conv_bn(channels, hidden, 1)
        self.pw2 = conv_bn(hidden, channels, 1)
        self.nonlinear = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


class RepLKNetStage(nn.Module):
    """``blocks`` alternate RepLKBlock and ConvFFN (keys ``blocks.{2m}`` and ``blocks.{2m+1}``)."""

    def __init__(self, channels: int, num_blocks: int, kernel_size: int, small_kernel: Optional[int],
                 drop_path: list, dw_ratio: float = 1.0, ffn_ratio: float = 4.0, merged: bool = False):
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), kernel_size, small_kernel,
                                     drop_path[i], merged))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), drop_path[i]))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class RepLKNet(nn.Module):
    """RepLKNet classifier. Keyword arguments are the fields of :class:`RepLKNetConfig`.

    Shape: ``(B, in_chans, H, W) -> (B, num_classes)``; the stem and each transition halve the
    map (224 -> 56, 28, 14, 7).

    Example::

        >>> model = RepLKNet(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)).eval()
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """

    config_class = RepLKNetConfig

    def __init__(self, **kwargs):
        super().__init__()
        cfg = self.config = RepLKNetConfig(**kwargs)
        base = cfg.channels[0]
        self.stem = nn.ModuleList([
            conv_bn(cfg.in_chans, base, 3, stride=2, padding=1, relu=True),
            conv_bn(base, base, 3, padding=1, groups=base, relu=True),
            conv_bn(base, base, 1, relu=True),
            conv_bn(base, base, 3, stride=2, padding=1, groups=base, relu=True)])
        rates = drop_path_rates(cfg.drop_path_rate, cfg.layers)
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, c in enumerate(cfg.channels):
            self.stages.append(RepLKNetStage(c, cfg.layers[i], cfg.large_kernel_sizes[i], cfg.small_kernel,
                                             rates[i], cfg.dw_ratio, cfg.ffn_ratio, cfg.merged))
            if i + 1 < len(cfg.channels):
                nxt = cfg.channels[i + 1]
                self.transitions.append(nn.Sequential(
                    conv_bn(c, nxt, 1, relu=True),
                    conv_bn(nxt, nxt, 3, stride=2, padding=1, groups=nxt, relu=True)))
        self.norm = nn.BatchNorm2d(cfg.channels[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cfg.channels[-1], cfg.num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        for layer in self.stem:
            x = layer(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.norm(self.forward_features(x)))
        return self.head(torch.flatten(x, 1))


VARIANTS = {
    "replknet_31b": dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024)),
    "replknet_31l": dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2), channels=(192, 384, 768, 1536)),
    "replknet_xl": dict(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2), channels=(256, 512, 1024, 2048),
                        small_kernel=None, dw_ratio=1.5),
}


# checkpoints -------------------------------------------------------------------------------------------
def rename_keys(sd) -> Tuple[dict, List[str]]:
    """mmpretrain's names to the official ones: ``head.fc.*`` -> ``head.*``, ``stages.<last>.norm.*`` -> ``norm.*``."""
    notes = []
    if any(k.startswith("head.fc.") for k in sd) and not any(k in sd for k in ("head.weight", "head.bias")):
        sd = {("head." + k[len("head.fc."):] if k.startswith("head.fc.") else k): v for k, v in sd.items()}
        notes.append("renamed mmpretrain 'head.fc' to 'head'")
    # mmpretrain keeps the final BN as the last stage's norm (out_indices=(3,))
    stage_norms = sorted({int(k.split(".")[1]) for k in sd if re.match(r"stages\.\d+\.norm\.", k)})
    if stage_norms and not any(k.startswith("norm.") for k in sd):
        last = f"stages.{stage_norms[-1]}.norm."
        sd = {("norm." + k[len(last):] if k.startswith(last) else k): v for k, v in sd.items()}
        notes.append(f"renamed mmpretrain '{last[:-1]}' to 'norm'")
    return sd, notes


def detect(sd) -> bool:
    return "stem.0.conv.weight" in sd and any(".blocks." in k and ".large_kernel." in k for k in sd)


def infer_config(sd, hints=None) -> dict:
    """``{"name", "kwargs"}`` from the shapes: blocks, widths, kernels, small kernel, ratios, form, classes."""
    counts = block_counts(sd, r"stages\.(\d+)\.blocks\.(\d+)\.")
    stages = range(len(counts))
    channels = [shape_of(sd, f"stages.{i}.blocks.0.prelkb_bn.weight", "RepLKNet")[0] for i in stages]
    layers = [counts[i] // 2 for i in stages]
    kernels, small, merged = [], None, False
    dw_ratio = ffn_ratio = 1.0
    for i in stages:
        p = f"stages.{i}.blocks.0.large_kernel."
        if p + "lkb_reparam.weight" in sd:
            kernels.append(sd[p + "lkb_reparam.weight"].shape[-1])
            merged = True
        else:
            kernels.append(shape_of(sd, p + "lkb_origin.conv.weight", "RepLKNet")[-1])
        if p + "small_conv.conv.weight" in sd:
            small = sd[p + "small_conv.conv.weight"].shape[-1]
        dw_ratio = shape_of(sd, f"stages.{i}.blocks.0.pw1.conv.weight", "RepLKNet")[0] / channels[i]
        ffn_ratio = shape_of(sd, f"stages.{i}.blocks.1.pw1.conv.weight", "RepLKNet")[0] / channels[i]
    kwargs = dict(large_kernel_sizes=kernels, layers=layers, channels=channels,
                  small_kernel=None if merged or small is None else int(small), dw_ratio=dw_ratio,
                  ffn_ratio=ffn_ratio, merged=merged, num_classes=shape_of(sd, "head.weight", "RepLKNet")[0],
                  in_chans=shape_of(sd, "stem.0.conv.weight", "RepLKNet")[1])
    if merged:  # the small kernel is folded in; keep the variant's value so the config reads as the original
        kwargs.pop("small_kernel")
    return {"name": variant_name(VARIANTS, {"layers": layers, "channels": channels}, "replknet"), "kwargs": kwargs}


FAMILY = Family("replknet", "RepLKNet", RepLKNet, VARIANTS, detect, infer_config, rename_keys)
