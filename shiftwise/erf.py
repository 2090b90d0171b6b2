"""Effective receptive field, measured as the RepLKNet paper does (its Table 10).

For each image: the feature map after the model's last stage, the ReLU of its centre pixel
summed over channels, the gradient of that with respect to the input, its ReLU, summed over
colour channels; averaged over images. For analysis the map is log-scaled (``log10(x + 1)``)
and rescaled to ``[0, 1]``; the *high-contribution area ratio* at threshold ``t`` is the area of
the smallest centred square holding more than ``t`` of the total, over the input area.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from shiftwise.convert.io import build_model, read_checkpoint
from shiftwise.convert.swap import convert_model

from .data import ImageFolder, make_loader, pil_to_tensor, resize, transform_for
from .errors import ShiftwiseError
from .evaluate import resolve_device
from .modules import ShiftWiseConv2d
from .progress import bar as progress_bar

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
AGREE_RTOL = 1e-4  # largest difference between two maps, relative to the peak, that counts as the same ERF


class _Stop(Exception):
    """Raised by the feature hook so the head is never run."""


def last_stage(model: nn.Module) -> nn.Module:
    """The module whose output is the last stage's feature map (``model.stages[-1]``)."""
    stages = getattr(model, "stages", None)
    if isinstance(stages, (nn.ModuleList, nn.Sequential)) and len(stages):
        return stages[-1]
    raise ValueError(f"{type(model).__name__} has no `stages`; pass the feature module explicitly (stage=...)")


def input_gradient(model: nn.Module, images: Tensor, stage: Optional[nn.Module] = None) -> Tensor:
    """Per-image contribution maps ``(B, H, W)``: ReLU of d(centre feature)/d(input), summed over channels."""
    stage = stage if stage is not None else last_stage(model)
    captured = {}

    def hook(_module, _inputs, output):
        captured["features"] = output
        raise _Stop

    images = images.detach().clone().requires_grad_(True)
    handle = stage.register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    feats = captured.get("features")
    if not isinstance(feats, Tensor) or feats.dim() != 4:
        raise ValueError("the feature module must return a (B, C, H, W) map")
    h, w = feats.shape[-2:]
    centre = torch.relu(feats[:, :, h // 2, w // 2]).sum()
    grad, = torch.autograd.grad(centre, images)
    return torch.relu(grad).sum(1)


def erf_map(model: nn.Module, loader, num_images: int = 50, stage: Optional[nn.Module] = None,
            device=None, progress: bool = False) -> np.ndarray:
    """The mean contribution map ``(H, W)`` over the first ``num_images`` images of ``loader``.

    Images whose map is not finite are skipped (as the paper's script does). ``model`` must be
    in eval mode (BatchNorm statistics frozen); it is not modified.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if model.training:
        raise ValueError("the model must be in eval mode (call model.eval()) so BatchNorm uses running statistics")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total, count, skipped = None, 0, 0
    bar = progress_bar(total=num_images, desc="erf", unit="img", enabled=progress)
    try:
        for batch in loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            maps = input_gradient(model, images[: num_images - count].to(device), stage).double().cpu()
            finite = torch.isfinite(maps).flatten(1).all(1)
            skipped += int((~finite).sum())
            maps = maps[finite]
            total = maps.sum(0) if total is None else total + maps.sum(0)
            count += maps.shape[0]
            bar.update(maps.shape[0])
            if count >= num_images:
                break
    finally:
        bar.close()
    if not count:
        raise ValueError("no image gave a finite gradient map" if skipped else "the data loader yielded no images")
    return (total / count).numpy()


def area_ratios(erf: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> Dict[str, dict]:
    """High-contribution area ratios of a contribution map (the paper's Table 10 form).

    Returns ``{str(t): {"side": s, "ratio": s*s/(H*W)}}``: ``s`` is the side of the smallest
    centred square whose share of the log-scaled map exceeds ``t`` (the whole map if none does).
    """
    data = np.log10(np.asarray(erf, dtype=np.float64) + 1)
    if data.max() > 0:
        data = data / data.max()
    h, w = data.shape
    total = data.sum()
    cy, cx = h // 2, w // 2
    out = {}
    for t in thresholds:
        side = None
        for i in range(1, max(h, w) // 2 + 1):
            if data[max(0, cy - i):cy + i + 1, max(0, cx - i):cx + i + 1].sum() > t * total:
                side = 2 * i + 1
                break
        side = side if side is not None else max(h, w)
        out[str(t)] = {"side": side, "ratio": min(side, h) * min(side, w) / (h * w)}
    return out


def save_heatmap(erf: np.ndarray, path: str, title: str = "") -> None:
    """Write the log-scaled, ``[0, 1]``-rescaled map as a PNG heatmap (needs matplotlib)."""
    try:
        import matplotlib  # noqa: PLC0415 (optional dependency)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise ShiftwiseError("--plot needs matplotlib: pip install matplotlib") from None
    data = np.log10(np.asarray(erf, dtype=np.float64) + 1)
    data = data / data.max() if data.max() > 0 else data
    fig, ax = plt.subplots(figsize=(5, 5.4), dpi=100)
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.05, pad=0.04)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


class SquareTransform:
    """Resize to ``(S, S)`` without cropping (the paper's ERF input), then normalise as ``base`` does."""

    def __init__(self, base, size: int):
        self.base, self.size = base, size

    def __call__(self, image) -> Tensor:
        pixels = resize(pil_to_tensor(image), (self.size, self.size))
        return (pixels.float() / 255.0 - self.base.mean) / self.base.std


@dataclasses.dataclass
class CheckpointErf:
    """The ERF of a checkpoint's model and, unless left out, of its shift-wise conversion.

    ``map`` is the model's mean contribution map ``(S, S)``; ``compare`` holds the other model's
    area ratios and its largest difference from ``map``.
    """

    checkpoint: str
    name: str
    num_images: int
    image_size: int
    converted: bool  # the checkpoint holds a shift-wise model
    map: np.ndarray
    area_ratio: Dict[str, dict]
    seconds: float
    compare: Optional[dict] = None  # {"label", "area_ratio", "max_abs_diff", "max_rel_diff"}

    @property
    def agrees(self) -> bool:
        """Both models have the same area ratios and maps within ``AGREE_RTOL`` of the peak (True
        when nothing was compared)."""
        c = self.compare
        return c is None or (c["max_rel_diff"] <= AGREE_RTOL and c["area_ratio"] == self.area_ratio)

    def as_dict(self) -> dict:
        out = {"checkpoint": self.checkpoint, "num_images": self.num_images, "size": self.image_size,
               "model": {"converted": self.converted, "area_ratio": self.area_ratio,
                         "seconds": round(self.seconds, 2)}}
        if self.compare is not None:
            out["compare"] = dict(self.compare, agrees=self.agrees)
        return out

    def report(self) -> str:
        """The table that ``shiftwise erf`` prints: area ratios per threshold, side by side."""
        c = self.compare
        lines = [f"ERF of {self.name} over {self.num_images} images at {self.image_size}x{self.image_size}",
                 f"{'threshold':>10} {'side':>6} {'area ratio':>11}" + ("   converted: side  ratio" if c else "")]
        for t in self.area_ratio:
            a = self.area_ratio[t]
            line = f"{float(t) * 100:>9.0f}% {a['side']:>6} {a['ratio'] * 100:>10.2f}%"
            if c:
                b = c["area_ratio"][t]
                line += f"   {b['side']:>15} {b['ratio'] * 100:>6.2f}%"
            lines.append(line)
        if c:
            lines.append(f"original vs {c['label']}: max |diff| {c['max_abs_diff']:.3e} "
                         f"({c['max_rel_diff']:.1e} of the peak): {'identical' if self.agrees else 'DIFFERENT'}")
        return "\n".join(lines)


def erf_checkpoint(path, data: str, num_images: int = 50, image_size: int = 1024, device="cpu",
                   tile_size: Optional[int] = None, compare: bool = True, progress: bool = False) -> CheckpointErf:
    """The ERF of the model in checkpoint ``path`` over ``num_images`` images of the image folder
    ``data``, each resized to ``image_size`` square.

    With ``compare`` the other form is measured too: an original checkpoint is converted (tile
    side ``tile_size``, default the model's small kernel); a converted one is read again.

    Example, with an ImageNet validation folder (any folder of class subfolders will do)::

        result = erf_checkpoint("SLaK_tiny_checkpoint.pth", "imagenet/val", num_images=50)
        text = result.report()  # area ratios of the original and the converted model, as a table
        numpy.save("erf.npy", result.map)
    """
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"number of images must be a positive int, got {num_images!r}")
    path = os.fspath(path)
    device = resolve_device(device)
    ckpt = read_checkpoint(path)
    model = build_model(ckpt).to(device)
    transform = SquareTransform(transform_for(ckpt.config, image_size), image_size)
    loader = make_loader(ImageFolder(data, transform), batch_size=1, limit=num_images, device=device)
    start = time.perf_counter()
    erf = erf_map(model, loader, num_images, device=device, progress=progress)
    seconds = time.perf_counter() - start
    converted = any(isinstance(m, ShiftWiseConv2d) for m in model.modules())
    result = CheckpointErf(path, ckpt.config["name"], num_images, image_size, converted, erf, area_ratios(erf),
                           seconds)
    if compare:
        if converted:
            other, label = build_model(ckpt).to(device), "converted (again)"
        else:
            other, label = convert_model(model, tile_size=tile_size), "converted"
        other_erf = erf_map(other.eval(), loader, num_images, device=device, progress=progress)
        diff = float(np.abs(other_erf - erf).max())
        result.compare = {"label": label, "area_ratio": area_ratios(other_erf), "max_abs_diff": diff,
                          "max_rel_diff": diff / max(float(np.abs(erf).max()), 1e-30)}
    return result
