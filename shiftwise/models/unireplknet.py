"""UniRepLKNet: 13x13 depthwise kernels re-parameterised from dilated small kernels.

"UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud,
Time-Series and Image Recognition", Ding et al., CVPR 2024 (https://arxiv.org/abs/2311.15599).
The ``state_dict`` has the key names and shapes of the official ``unireplknet.py``
(AILab-CVC/UniRepLKNet), training form (``dwconv.lk_origin`` + ``origin_bn`` + dilated branches
``dil_conv_k{k}_{r}`` / ``dil_bn_k{k}_{r}``, then the block's ``norm`` BN) or deploy form
(``deploy=True``: one ``lk_origin`` with bias, no ``norm``, ``gamma`` and GRN bias folded).
Tensors (training / deploy): A, F, P 626 / 156; N 738 / 178; T 1116 / 321; S, B, L, XL 1305 / 420.

Shift-wise form: each block with a dilated reparam ``dwconv`` becomes one ``ShiftWiseConv2d``
holding the sum of its BN-folded branches (dilated kernels written densely) with the block's
post-conv ``norm`` BN folded in (``norm`` becomes ``nn.Identity``). The summed kernel is
``K x K`` (13 in every released variant), tiled as one; the default tile is 5, the largest
undilated branch, so 13x13 is 3 x 3 = 9 tiles per channel (tile 3: 25 smaller tiles, the same
taps). Blocks with a plain 3x3 conv stay as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..modules import ShiftWiseConv2d
from ..tiling import dilate_kernel, fold_bn, split_kernel
from . import sw_keys
from ._family import Family, block_counts, shape_of, variant_name
from ._layers import (DropPath, FourStageNet, LayerNorm2d, Permute,
                      check_foldable, depthwise_conv, drop_path_rates, with_children)

DEFAULT_TILE_SIZE = 5  # the largest undilated branch of a dilated reparam block

# kernel size -> (small kernel sizes, dilation rates) of the parallel dilated branches
DILATED_BRANCHES = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}

# official per-block kernels, keyed by depths (A/F/P, N, T, S/B/L/XL)
DEPTHS_AFP, DEPTHS_N, DEPTHS_T, DEPTHS_SBLXL = (2, 2, 6, 2), (2, 2, 8, 2), (3, 3, 18, 3), (3, 3, 27, 3)
DEFAULT_KERNEL_SIZES = {
    DEPTHS_AFP: ((3, 3), (13, 13), (13,) * 6, (13, 13)),
    DEPTHS_N: ((3, 3), (13, 13), (13,) * 8, (13, 13)),
    DEPTHS_T: ((3, 3, 3), (13, 13, 13), (13, 3) * 9, (13, 13, 13)),
    DEPTHS_SBLXL: ((3, 3, 3), (13, 13, 13), (13, 3, 3) * 9, (13, 13, 13)),
}


@dataclasses.dataclass(frozen=True)
class UniRepLKNetConfig:
    """Architecture of a :class:`UniRepLKNet` (JSON-serialisable; lists are normalised to tuples).

    Args:
        depths: blocks per stage (default S/B/L/XL ``(3, 3, 27, 3)``).
        dims: stage widths (default ``(96, 192, 384, 768)``).
        kernel_sizes: per stage, the kernel of every block: 0 (no conv), 3 or 5 (plain depthwise),
            7..17 (dilated reparam block). ``None``: the official default for ``depths``.
        deploy: the re-parameterised inference form (default False).
        num_classes: head outputs (default 1000).
        in_chans: input channels (default 3).
        layer_scale_init_value: initial ``gamma`` (default 1e-6; training form only).
        drop_path_rate: stochastic depth at the last block (default 0).
    """

    depths: Tuple[int, ...] = (3, 3, 27, 3)
    dims: Tuple[int, ...] = (96, 192, 384, 768)
    kernel_sizes: Optional[Tuple[Tuple[int, ...], ...]] = None
    deploy: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0

    def __post_init__(self):
        for name in ("depths", "dims"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(f"UniRepLKNet needs 4 depths and 4 dims, got {self.depths} and {self.dims}")
        ks = self.kernel_sizes
        if ks is None:
            if self.depths not in DEFAULT_KERNEL_SIZES:
                raise ValueError(f"no default kernel_sizes for depths {self.depths}; pass kernel_sizes, one "
                                 f"tuple per stage with one kernel per block")
            ks = DEFAULT_KERNEL_SIZES[self.depths]
        ks = tuple(tuple(int(k) for k in stage) for stage in ks)
        if tuple(len(s) for s in ks) != self.depths:
            raise ValueError(f"kernel_sizes {ks} do not match depths {self.depths}")
        bad = sorted({k for s in ks for k in s if k not in (0, 3) and k not in DILATED_BRANCHES})
        if bad:
            raise ValueError(f"unsupported block kernel sizes {bad}; use 0, 3, 5, 7, 9, 11, 13, 15 or 17")
        object.__setattr__(self, "kernel_sizes", ks)


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt V2) on ``(N, H, W, C)``; ``beta`` only when ``use_bias``."""

    def __init__(self, dim: int, use_bias: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim)) if use_bias else None

    def forward(self, x: Tensor) -> Tensor:
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        y = (self.gamma * nx + 1) * x
        return y + self.beta if self.beta is not None else y


class SEBlock(nn.Module):
    """Squeeze-and-excitation with 1x1 convs ``down`` and ``up`` on ``(N, C, H, W)``."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)
        self.nonlinear = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        s = self.up(self.nonlinear(self.down(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(s)


class DilatedReparamBlock(nn.Module):
    """``K x K`` depthwise conv plus parallel dilated depthwise convs, each followed by BN, summed.

    Branches come from :data:`DILATED_BRANCHES`: a ``k x k`` kernel at rate ``r`` spans
    ``r(k-1)+1``; every branch keeps the map size. ``deploy=True`` holds only ``lk_origin``
    with bias (the merged kernel).
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f"DilatedReparamBlock kernel_size must be one of {sorted(DILATED_BRANCHES)}, "
                             f"got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.lk_origin = depthwise_conv(channels, kernel_size, bias=deploy)
        self.kernel_sizes, self.dilates = DILATED_BRANCHES[kernel_size]
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                setattr(self, f"dil_conv_k{k}_{r}", nn.Conv2d(channels, channels, k, padding=(r * (k - 1) + 1) // 2,
                                                              dilation=r, groups=channels, bias=False))
                setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def branches(self) -> list:
        """``(conv, bn or None, dilation)`` of every summed branch, ``lk_origin`` first."""
        if not hasattr(self, "origin_bn"):
            return [(self.lk_origin, None, 1)]
        return [(self.lk_origin, self.origin_bn, 1)] + [
            (getattr(self, f"dil_conv_k{k}_{r}"), getattr(self, f"dil_bn_k{k}_{r}"), r)
            for k, r in zip(self.kernel_sizes, self.dilates)]

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for conv, bn, _ in self.branches():
            y = conv(x) if bn is None else bn(conv(x))
            out = y if out is None else out + y
        return out

    @torch.no_grad()
    def merged_kernel(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``(weight (C, K, K), bias (C,) or None)``: the single conv equal to the BN-folded sum of the branches."""
        k = self.kernel_size
        weight = bias = None
        for conv, bn, rate in self.branches():
            w = dilate_kernel(conv.weight, rate) if rate > 1 else conv.weight[:, 0]
            b = conv.bias
            if bn is not None:
                w, b = fold_bn(w, b, bn)
            pad = (k - w.shape[-1]) // 2
            w = F.pad(w, [pad] * 4)
            weight = w if weight is None else weight + w
            if b is not None:
                bias = b if bias is None else bias + b
        return weight, bias


class UniRepLKNetBlock(nn.Module):
    """Depthwise conv, BN (``norm``), SE, MLP with GRN, layer scale, residual.

    Args:
        dim: channels.
        kernel_size: 0 (identity), 3 or 5 (plain depthwise conv), 7..17 (:class:`DilatedReparamBlock`).
        drop_path: stochastic depth probability (default 0).
        layer_scale_init_value: initial ``gamma`` (default 1e-6; training form only).
        deploy: the re-parameterised form (default False).
        ffn_factor: MLP hidden width / ``dim`` (default 4).
    """

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 deploy: bool = False, ffn_factor: int = 4):
        super().__init__()
        if kernel_size == 0:
            self.dwconv = nn.Identity()
        elif kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=deploy)
        elif kernel_size in (3, 5):
            self.dwconv = depthwise_conv(dim, kernel_size, bias=deploy)
        else:
            raise ValueError(f"block kernel_size must be 0, 3, 5 or 7..17, got {kernel_size!r}")
        self.norm = nn.Identity() if deploy or kernel_size == 0 else nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        hidden = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(Permute(0, 2, 3, 1), nn.Linear(dim, hidden))  # (N, C, H, W) -> (N, H, W, C)
        self.act = nn.Sequential(nn.GELU(), GRN(hidden, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(hidden, dim), Permute(0, 3, 1, 2))
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(hidden, dim, bias=False), Permute(0, 3, 1, 2), nn.BatchNorm2d(dim))
        use_gamma = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) if use_gamma else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    default_tile_size = DEFAULT_TILE_SIZE

    @torch.no_grad()
    def to_shiftwise(self, tile_size: Optional[int] = None, layout: str = "auto",
                     backend: Optional[str] = None) -> Optional["UniRepLKNetBlock"]:
        """This block with ``dwconv`` and ``norm`` as one :class:`ShiftWiseConv2d` and ``nn.Identity``.

        Returns a new block sharing every other layer (``self`` is left as it is), or ``None``
        for a block without a dilated reparam ``dwconv`` (plain 3x3, or already converted).
        """
        dw = self.dwconv
        if not isinstance(dw, DilatedReparamBlock):
            return None
        norm = self.norm if isinstance(self.norm, nn.BatchNorm2d) else None
        check_foldable([bn for _, bn, _ in dw.branches()] + [norm])
        weight, bias = dw.merged_kernel()
        if norm is not None:
            weight, bias = fold_bn(weight, bias, norm)
        tile = self.default_tile_size if tile_size is None else tile_size
        tiles, plan = split_kernel(weight, tile, layout)
        sw = ShiftWiseConv2d.from_tiles(tiles, plan, bias, kernel_size=(dw.kernel_size,) * 2, backend=backend)
        return with_children(self, dwconv=sw.train(dw.training), norm=nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)


class UniRepLKNet(FourStageNet):
    """UniRepLKNet classifier. Keyword arguments are the fields of :class:`UniRepLKNetConfig`.

    Shape: ``(B, in_chans, H, W) -> (B, num_classes)``; the two-conv stem divides by 4, each
    downsampling by 2 (224 -> 56, 28, 14, 7).

    Example::

        >>> model = UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64),
        ...                     kernel_sizes=((3,), (13,), (13,), (13,))).eval()
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """

    config_class = UniRepLKNetConfig

    def __init__(self, **kwargs):
        super().__init__()
        cfg = self.config = UniRepLKNetConfig(**kwargs)
        dims = cfg.dims
        self.downsample_layers = stem_and_downsampling(cfg.in_chans, dims)
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        self.stages = nn.ModuleList(
            nn.Sequential(*(UniRepLKNetBlock(dims[i], cfg.kernel_sizes[i][j], rates[i][j],
                                             cfg.layer_scale_init_value, cfg.deploy) for j in range(cfg.depths[i])))
            for i in range(4))
        self._add_head(dims[-1], cfg.num_classes)
        self.apply(_init_weights)


def stem_and_downsampling(in_chans: int, dims) -> nn.ModuleList:
    """The two-conv stem (3x3 stride 2, LN, GELU, 3x3 stride 2, LN) and the three 3x3 stride-2
    downsampling convs with LN: ``downsample_layers`` of UniRepLKNet and of SW."""
    layers = nn.ModuleList([nn.Sequential(
        nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1),
        LayerNorm2d(dims[0] // 2, eps=1e-6),
        nn.GELU(),
        nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1),
        LayerNorm2d(dims[0], eps=1e-6))])
    for i in range(3):
        layers.append(nn.Sequential(
            nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), LayerNorm2d(dims[i + 1], eps=1e-6)))
    return layers


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# checkpoints -------------------------------------------------------------------------------------------
def detect(sd) -> bool:
    return "downsample_layers.0.0.weight" in sd and any(".se.down.weight" in k for k in sd) and not sw_keys.detect(sd)


def infer_config(sd, hints=None) -> dict:
    """``{"name", "kwargs"}`` from the shapes: depths, widths, every block's kernel, form, classes."""
    stem = shape_of(sd, "downsample_layers.0.0.weight", "UniRepLKNet")
    dims = [shape_of(sd, "downsample_layers.0.3.weight", "UniRepLKNet")[0]]
    dims += [shape_of(sd, f"downsample_layers.{i}.0.weight", "UniRepLKNet")[0] for i in (1, 2, 3)]
    counts = block_counts(sd, r"stages\.(\d+)\.(\d+)\.")
    depths = [counts.get(i, 0) for i in range(4)]
    kernel_sizes = []
    for i in range(4):
        stage = []
        for j in range(depths[i]):
            p = f"stages.{i}.{j}.dwconv."
            w = sd.get(p + "lk_origin.weight", sd.get(p + "weight"))
            stage.append(0 if w is None else int(w.shape[-1]))
        kernel_sizes.append(stage)
    deploy = any(k.endswith(".pwconv2.0.bias") for k in sd)
    first = next((i for i in range(4) if depths[i]), 0)
    kwargs = dict(depths=depths, dims=dims, kernel_sizes=kernel_sizes, deploy=deploy,
                  num_classes=shape_of(sd, "head.weight", "UniRepLKNet")[0], in_chans=stem[1])
    if not deploy:  # the deploy form folds gamma away whatever its initial value was
        kwargs["layer_scale_init_value"] = 1e-6 if f"stages.{first}.0.gamma" in sd else 0.0
    return {"name": variant_name(VARIANTS, {"depths": depths, "dims": dims}, "unireplknet"), "kwargs": kwargs}


VARIANTS = {
    "unireplknet_a": dict(depths=DEPTHS_AFP, dims=(40, 80, 160, 320)),
    "unireplknet_f": dict(depths=DEPTHS_AFP, dims=(48, 96, 192, 384)),
    "unireplknet_p": dict(depths=DEPTHS_AFP, dims=(64, 128, 256, 512)),
    "unireplknet_n": dict(depths=DEPTHS_N, dims=(80, 160, 320, 640)),
    "unireplknet_t": dict(depths=DEPTHS_T, dims=(80, 160, 320, 640)),
    "unireplknet_s": dict(depths=DEPTHS_SBLXL, dims=(96, 192, 384, 768)),
    "unireplknet_b": dict(depths=DEPTHS_SBLXL, dims=(128, 256, 512, 1024)),
    "unireplknet_l": dict(depths=DEPTHS_SBLXL, dims=(192, 384, 768, 1536)),
    "unireplknet_xl": dict(depths=DEPTHS_SBLXL, dims=(256, 512, 1024, 2048)),
}

FAMILY = Family("unireplknet", "UniRepLKNet", UniRepLKNet, VARIANTS, detect, infer_config)
