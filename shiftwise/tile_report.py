"""Tile density of a checkpoint's shift-wise layers, and how many tiles each channel keeps.

The table is the paper's Table 2 form: for every shift-wise layer, the number of channels
that keep 0, 1, 2, ... tiles. It reads a ``shiftwise train`` checkpoint (its masks), a
compacted model (``compact.pt``) or any state dict with ``ShiftWiseConv2d`` tile plans (then a
tile counts as kept when it is not all zero). ``shiftwise inspect`` prints it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from shiftwise.convert.io import build_model, checkpoint_path, read_checkpoint
from shiftwise.convert.swap import convert_model
from shiftwise.convert.safe import safe_load

from .errors import CheckpointError, ShiftwiseError
from .sparse import channel_histogram

PLAN_KEY = "tile_offsets"  # a state-dict key ending in this marks a shift-wise layer


def load_state(path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]], Optional[Dict[str, int]]]:
    """``(state_dict, masks or None, dense tile counts or None)`` of a checkpoint file (never runs
    pickled code)."""
    path = Path(checkpoint_path(path))
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    masks = ckpt.get("sparse", {}).get("masks") if isinstance(ckpt.get("sparse"), dict) else None
    state = next((ckpt[k] for k in ("model", "state_dict", "model_ema") if isinstance(ckpt.get(k), dict)), ckpt)
    dense = ckpt.get("dense_tiles")
    for what, table, kind in (("weights", state, torch.Tensor), ("masks", masks, torch.Tensor),
                              ("dense_tiles", dense, int)):
        if table is not None and not (isinstance(table, dict) and
                                      all(isinstance(k, str) and isinstance(v, kind) for k, v in table.items())):
            raise CheckpointError(f"{path}: its {what} are not a mapping of names to {kind.__name__}s")
    return state, masks, dense


def checkpoint_report(path) -> List[dict]:
    """:func:`tile_report` of the checkpoint file ``path`` (an official one: of its full conversion);
    raises if it has no shift-wise layer.

    Example::

        >>> rows = checkpoint_report("runs/sparse/checkpoint.pt")
        >>> print(format_table(rows)); overall_density(rows)
    """
    rows = tile_report(*load_state(path))
    if not rows:
        try:  # an official checkpoint: the tiles of its full conversion
            ckpt = read_checkpoint(path)
        except CheckpointError:
            ckpt = None
        if ckpt is None or ckpt.converted:
            raise ShiftwiseError(f"{os.fspath(path)} has no shift-wise layer (no '*.{PLAN_KEY}' entries)")
        # an SW training file: its masked planes are zero, and its metadata counts the full conversion's tiles
        dense = (ckpt.tiles or {}).get("layers") if ckpt.kind == "train" else None
        rows = tile_report(convert_model(build_model(ckpt), inplace=True).state_dict(), dense_tiles=dense)
    return rows


def overall_density(rows: List[dict]) -> float:
    """Kept tiles over all tiles of the layers in ``rows``."""
    return sum(r["kept"] for r in rows) / sum(r["tiles"] for r in rows)


def tile_report(state: Dict[str, torch.Tensor], masks: Optional[Dict[str, torch.Tensor]] = None,
                dense_tiles: Optional[Dict[str, int]] = None) -> List[dict]:
    """One row per shift-wise layer: name, channels, tiles, kept, density, histogram.

    ``masks`` (layer -> ``(T,)`` bool) say which tiles are kept. A compacted model, told by
    ``dense_tiles`` (layer -> ``T`` before compaction), keeps every tile of its plan. Otherwise a
    tile is kept when any of its weights is non-zero.
    """
    rows = []
    for key in state:
        if not key.endswith(PLAN_KEY):
            continue
        name = key[: -len(PLAN_KEY)].rstrip(".")
        prefix = name + "." if name else ""
        offsets = state[key].long()
        weight = state.get(prefix + "weight")
        if weight is None:
            raise CheckpointError(f"{name} has a tile plan but no weight")
        if masks and name in masks:
            mask = masks[name]
        elif dense_tiles and name in dense_tiles:
            mask = torch.ones(weight.shape[0], dtype=torch.bool)
        else:
            mask = weight.reshape(weight.shape[0], -1).ne(0).any(1)
        tiles = int(offsets[-1])
        total = int((dense_tiles or {}).get(name, tiles))
        kept = int(mask.sum())
        rows.append({"name": name, "channels": offsets.numel() - 1, "tiles": total, "kept": kept,
                     "density": kept / total if total else 1.0, "histogram": channel_histogram(mask.bool(), offsets)})
    return rows


def format_table(rows: List[dict]) -> str:
    """The Table 2 form: a column per tile count, a row per layer."""
    width = max(len(r["histogram"]) for r in rows)
    name_w = max(5, max(len(r["name"]) for r in rows))
    head = f"{'layer':<{name_w}}  {'chan':>5} {'kept/tiles':>13} {'density':>7}  channels keeping k tiles, k ="
    lines = [head, f"{'':<{name_w}}  {'':>5} {'':>13} {'':>7}  " + " ".join(f"{k:>4}" for k in range(width))]
    for r in rows:
        hist = " ".join(f"{c:>4}" for c in r["histogram"])
        lines.append(f"{r['name']:<{name_w}}  {r['channels']:>5} {str(r['kept']) + '/' + str(r['tiles']):>13} "
                     f"{r['density']:>7.4f}  {hist}")
    kept, total = sum(r["kept"] for r in rows), sum(r["tiles"] for r in rows)
    lines.append(f"overall density {overall_density(rows):.4f} ({kept}/{total} tiles)")
    return "\n".join(lines)


def plot(rows: List[dict], path, title: str = "") -> None:
    """Bar charts of each layer's tile-count histogram, saved as a PNG."""
    try:
        import matplotlib  # noqa: PLC0415 (optional dependency)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise ShiftwiseError("--plot needs matplotlib: pip install matplotlib") from None
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        ax.bar(range(len(r["histogram"])), r["histogram"], color="tab:blue")
        ax.set_title(f"{r['name']}\ndensity {r['density']:.3f}", fontsize=8)
        ax.set_xlabel("tiles kept", fontsize=8)
        ax.set_ylabel("channels", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
