"""``nn.Module`` wrappers of the shift-wise ops."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .functional import BACKENDS, shiftwise_conv2d
from .tiling import LAYOUTS, TilePlan, _pair, fold_bn, merge_tiles, split_branches

_PLAN_BUFFERS = ("tile_offsets", "tile_dy", "tile_dx")


class ShiftWiseConv2d(nn.Module):
    """Depthwise large-kernel convolution computed as a sum of shifted ``N x N`` tiles.

    Output has the input's size (stride 1, zero padding). Each channel owns a list of tiles
    (its count may differ per channel, e.g. after sparse training); the tile plan is stored as
    int32 buffers, so ``state_dict`` round-trips it, and loading a state dict with another tile
    count resizes the module to it.

    Args:
        in_channels: ``C`` (output channels are the same; depthwise).
        kernel_size: receptive field to cover, int or ``(KH, KW)`` (default layout covers it
            with the fewest tiles).
        small_kernel: tile side ``N`` (default 5).
        bias: learn a per-channel bias (default True).
        layout: ``"auto"`` (fewest tiles), ``"centered"`` or ``"compact"``.
        backend: ``None`` (``SHIFTWISE_BACKEND``, else ``"auto"``) or one of
            :data:`~shiftwise.functional.BACKENDS` (``docs/backends.md``).

    Shape: ``(B, C, H, W) -> (B, C, H, W)``.

    Example::

        >>> conv = nn.Conv2d(8, 8, (51, 5), padding=(25, 2), groups=8)
        >>> sw = ShiftWiseConv2d.from_dense(conv, small_kernel=5)
        >>> x = torch.randn(2, 8, 32, 32)
        >>> torch.allclose(sw(x), conv(x), atol=1e-5)
        True
    """

    def __init__(self, in_channels: int, kernel_size: Union[int, Tuple[int, int]], small_kernel: int = 5,
                 bias: bool = True, layout: str = "auto", backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        self.in_channels = self.out_channels = in_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        if not isinstance(small_kernel, int) or small_kernel < 1:
            raise ValueError(f"small_kernel must be a positive int, got {small_kernel!r}")
        self.small_kernel = small_kernel
        self.backend = backend
        plan = TilePlan.grid(in_channels, self.kernel_size, small_kernel, layout)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(plan.num_tiles, small_kernel, small_kernel, **factory))
        self.bias = nn.Parameter(torch.empty(in_channels, **factory)) if bias else None
        for name, t in zip(_PLAN_BUFFERS, (plan.offsets, plan.dy, plan.dx)):
            self.register_buffer(name, t.to(self.weight.device))
        self._info = plan.info
        self.reset_parameters()

    # construction -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Uniform in ``+-1/sqrt(taps per channel)``, as ``nn.Conv2d`` initialises a depthwise conv."""
        taps = max(1, self._info.num_tiles // self.in_channels) * self.small_kernel ** 2
        bound = 1.0 / math.sqrt(taps)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_tiles(cls, tiles: Tensor, plan: TilePlan, bias: Optional[Tensor] = None,
                   kernel_size=None, backend: Optional[str] = None) -> "ShiftWiseConv2d":
        """A module holding exactly ``tiles`` ``(T, N, N)`` laid out by ``plan``."""
        n = plan.tile_size
        module = cls(plan.channels, kernel_size or plan.info.extent, n, bias=bias is not None,
                     backend=backend, device=tiles.device, dtype=tiles.dtype)
        module.set_tiles(tiles, plan)
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
        return module

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, small_kernel: int = 5, bn: Optional[nn.BatchNorm2d] = None,
                   layout: str = "auto", drop_zero: bool = False,
                   backend: Optional[str] = None) -> "ShiftWiseConv2d":
        """Exact shift-wise equivalent of a depthwise ``nn.Conv2d`` (optionally followed by ``bn``).

        ``conv`` must have ``groups == in_channels == out_channels``, stride 1, dilation 1,
        zeros padding of ``(KH//2, KW//2)`` and odd kernel sides (an even side changes the
        output size). ``bn`` (eval statistics) is folded into the tiles and bias.
        """
        _check_depthwise(conv)
        return cls.from_branches([(conv, bn)], small_kernel, layout=layout, drop_zero=drop_zero, backend=backend)

    @classmethod
    def from_branches(cls, branches: Sequence[Tuple[Union[nn.Conv2d, Tensor], Optional[nn.Module]]],
                      small_kernel: int = 5, layout: str = "auto", drop_zero: bool = False,
                      backend: Optional[str] = None) -> "ShiftWiseConv2d":
        """Merge parallel centred depthwise branches (each ``(conv or weight, bn or None)``), summed.

        This is the structure of SLaK (``K x 5`` + ``5 x K`` + ``5 x 5``, each conv+BN) and
        RepLKNet (``K x K`` + ``5 x 5``). Coincident tiles are summed; the layout with the
        fewest tiles is chosen per branch.
        """
        parts = []
        kh = kw = 1
        for i, (conv, bn) in enumerate(branches):
            if isinstance(conv, nn.Conv2d):
                _check_depthwise(conv, f"branch {i}")
                weight, bias = conv.weight.detach()[:, 0], (conv.bias.detach() if conv.bias is not None else None)
            else:
                weight, bias = conv.detach(), None
            if bn is not None:
                weight, bias = fold_bn(weight, bias, bn)
                bias = bias.detach()
                weight = weight.detach()
            kh, kw = max(kh, weight.shape[-2]), max(kw, weight.shape[-1])
            parts.append((weight, bias))
        tiles, bias, plan = split_branches(parts, small_kernel, layout, drop_zero)
        return cls.from_tiles(tiles, plan, bias, kernel_size=(kh, kw), backend=backend)

    # plan ----------------------------------------------------------------------------------
    @property
    def plan(self) -> TilePlan:
        """The tile plan of the buffers; the same object while the buffers and the plan's
        :class:`PlanInfo` stay the same objects (it caches per-size answers such as
        :meth:`TilePlan.live`). Plans change through :meth:`set_tiles` or ``load_state_dict``,
        which replace the info; the buffers are not meant to be edited in place (the info,
        computed once, would no longer describe them either). In-place writes of the same
        values, as DDP's buffer broadcast does every step, keep the cache."""
        bufs = (self.tile_offsets, self.tile_dy, self.tile_dx)
        if torch.compiler.is_compiling():
            return TilePlan(*bufs, self.small_kernel, self._info)
        cached = self.__dict__.get("_plan_cache")
        if (cached is None or any(a is not b for a, b in zip(cached[0], bufs)) or cached[1] is not self._info
                or cached[2].tile_size != self.small_kernel):
            cached = (bufs, self._info, TilePlan(*bufs, self.small_kernel, self._info))
            self.__dict__["_plan_cache"] = cached
        return cached[2]

    def set_tiles(self, tiles: Tensor, plan: TilePlan) -> None:
        """Replace the tiles and plan (e.g. after compaction). The weight Parameter keeps its identity."""
        if plan.channels != self.in_channels:
            raise ValueError(f"plan has {plan.channels} channels; this module has {self.in_channels}")
        if tiles.shape != (plan.num_tiles, plan.tile_size, plan.tile_size):
            raise ValueError(f"tiles must have shape {(plan.num_tiles, plan.tile_size, plan.tile_size)}, "
                             f"got {tuple(tiles.shape)}")
        dev = self.weight.device
        self.weight.data = tiles.detach().to(device=dev, dtype=self.weight.dtype).clone()
        for name, t in zip(_PLAN_BUFFERS, (plan.offsets, plan.dy, plan.dx)):
            setattr(self, name, t.detach().to(device=dev, dtype=torch.int32).clone())
        self._info = plan.info
        self.small_kernel = plan.tile_size

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = [prefix + n for n in _PLAN_BUFFERS]
        if all(n in state_dict for n in names) and prefix + "weight" in state_dict:
            w = state_dict[prefix + "weight"]
            tile = w.shape[-1] if w.dim() == 3 and w.shape[1] == w.shape[2] else self.small_kernel
            try:
                incoming = TilePlan(*(state_dict[n] for n in names), tile)  # validates
            except ValueError as exc:
                error_msgs.append(f"{prefix}: invalid tile plan: {exc}")
                return
            if incoming.channels != self.in_channels:
                error_msgs.append(f"{prefix}: plan has {incoming.channels} channels, module has {self.in_channels}")
                return
            if tuple(w.shape) != tuple(self.weight.shape) or not torch.equal(incoming.offsets.cpu(),
                                                                                self.tile_offsets.cpu()):
                self.set_tiles(torch.zeros(w.shape, dtype=self.weight.dtype), incoming)
            else:
                self._info = incoming.info
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # conversion ------------------------------------------------------------------------------
    def dense_kernel(self) -> Tensor:
        """The equivalent dense kernel ``(C, KH, KW)``: ``kernel_size`` when the tiles fit in it."""
        kh, kw = self.kernel_size
        plan = self.plan
        if kh % 2 and kw % 2 and (kh, kw) != plan.info.extent:
            try:
                return merge_tiles(self.weight, plan, (kh, kw))
            except ValueError:
                pass  # tiles reach beyond kernel_size (trained from scratch): keep the full extent
        return merge_tiles(self.weight, plan)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent depthwise ``nn.Conv2d`` (a new module; this one is unchanged)."""
        kernel = self.dense_kernel().detach()
        kh, kw = kernel.shape[1:]
        conv = nn.Conv2d(self.in_channels, self.in_channels, (kh, kw), padding=(kh // 2, kw // 2),
                         groups=self.in_channels, bias=self.bias is not None,
                         device=kernel.device, dtype=kernel.dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel.unsqueeze(1))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: Tensor) -> Tensor:
        return shiftwise_conv2d(x, self.weight, self.plan, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        info = self._info
        per = info.uniform if info.uniform is not None else f"{info.num_tiles / info.channels:.2f} avg"
        s = (f"{self.in_channels}, kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, "
             f"tiles={info.num_tiles} ({per}/channel)")
        if self.bias is None:
            s += ", bias=False"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


def _check_depthwise(conv: nn.Module, what: str = "conv") -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{what} must be an nn.Conv2d, got {type(conv).__name__}")
    c = conv.in_channels
    if not (conv.groups == c == conv.out_channels):
        raise ValueError(f"{what} must be depthwise (groups == in_channels == out_channels), got "
                         f"in={conv.in_channels}, out={conv.out_channels}, groups={conv.groups}")
    if tuple(conv.stride) != (1, 1):
        raise ValueError(f"{what} has stride {tuple(conv.stride)}; shift-wise conv supports stride 1 only")
    if tuple(conv.dilation) != (1, 1):
        raise ValueError(f"{what} has dilation {tuple(conv.dilation)}; convert it with "
                         "shiftwise.tiling.dilate_kernel first (a dilated kernel is a sparse dense kernel)")
    kh, kw = conv.kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"{what} has even kernel size {(kh, kw)}: padding K//2 then changes the output size; "
                         "only odd kernel sides convert exactly")
    padding = conv.padding
    if padding == "same":
        padding = (kh // 2, kw // 2)
    if tuple(padding) != (kh // 2, kw // 2) or conv.padding_mode != "zeros":
        raise ValueError(f"{what} has padding {conv.padding!r} (mode {conv.padding_mode!r}); "
                         f"expected zeros padding {(kh // 2, kw // 2)} so the output keeps the input size")


def has_plane_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds layers whose weights are planes of small kernels, trained as they
    are and converted for inference: modules with ``path_weights()``, the SW layer of
    :mod:`shiftwise.models.sw` in its training form."""
    return any(callable(getattr(m, "path_weights", None)) for m in model.modules())


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Set the backend of every :class:`ShiftWiseConv2d` in ``model``, and of every other module
    that makes shift-wise calls of its own (a class with ``takes_shiftwise_backend = True``, as the
    SW layer of :mod:`shiftwise.models.sw`); ``None``: leave them as they are. Returns ``model``."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for m in model.modules():
            if isinstance(m, ShiftWiseConv2d) or getattr(type(m), "takes_shiftwise_backend", False):
                m.backend = backend
    return model
