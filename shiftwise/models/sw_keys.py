"""SW checkpoints: which state dicts are SW networks, and their architecture from shapes and ``args``.

An official SW file (lidc54/shift-wiseConv ``main.py``) holds ``{'model', 'optimizer', 'epoch',
'scaler', 'args'}``. The shapes give the depths, widths, small kernel ``k``, the number of
paths (``large_kernel.LoRAs.{i}.weight``, or one merged ``large_kernel.LoRA.weight``), the
shift-wise channels ``repN`` (from ``bn_lora1``) and the planes ``P = repN * nk``, but not the
large kernel ``K`` (only ``nk = ceil(K / k)``), ``N_rep`` or the exact ghost ratio: those come
from the training ``args`` (``kernel_size``: the four stage kernels then ``k``; ``ghost_ratio``,
``N_path``, ``N_rep``, ``width_factor``, ``bn``). Without them the released recipe
(:data:`RELEASED`) is assumed, with a warning; ``args`` that contradict the shapes are refused.
"""
from __future__ import annotations

import logging
import math
import numbers
import re
from typing import Dict, List, Optional

from ..errors import CheckpointError
from ._family import StateDict, block_counts, shape_of, variant_name

logger = logging.getLogger(__name__)

TITLE = "SW"

VARIANTS: Dict[str, dict] = {
    "sw_tiny": dict(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640)),
    "sw_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "sw_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "sw_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}

# the recipe of the released SW-T (official --kernel_size 51 49 47 13 3 --ghost_ratio 0.23 --N_path 2 --N_rep 4)
RELEASED = dict(kernel_sizes=(51, 49, 47, 13), small_kernel=3, ghost_ratio=0.23, n_path=2, n_rep=4)

OFFICIAL_NAMES = {f"ShiftWise_v2_{size}": f"sw_{size}" for size in ("tiny", "small", "base", "large")}

_SW_KEY = re.compile(r"(?:^|\.)large_kernel\.(?:LoRAs?\.|bn_lora[12]\.|bn_small\.)")
_PATH_KEY = re.compile(r"stages\.(\d+)\.(\d+)\.large_kernel\.(?:LoRAs\.(\d+)|LoRA)\.weight$")


def is_sw_key(key: str) -> bool:
    """A key of an SW layer (``large_kernel.LoRAs.*``, ``LoRA.*``, ``bn_lora1/2.*``, ``bn_small.*``)."""
    return _SW_KEY.search(key) is not None


def detect(sd: StateDict) -> bool:
    """Whether the (prefix-stripped) keys hold SW layers. SLaK's ``LoRA1``/``LoRA2`` do not count."""
    return any(is_sw_key(k) for k in sd)


def infer_config(sd: StateDict, hints: Optional[dict] = None) -> dict:
    """``{"name", "kwargs"}`` (``ShiftWiseNetConfig`` fields) from the shapes and the file's ``args``.

    ``hints`` is the file's ``args`` as a dict (may be empty). Raises :class:`CheckpointError`
    when a path of an SW layer is missing, when the ``args`` are malformed, or when they
    contradict the shapes (``ceil(K / k)`` against the planes per shift-wise channel, the
    ghost ratio against ``repN``, ``N_path`` against the paths, ``k`` against the path weights,
    ``width_factor`` against the widths, ``bn`` against the BatchNorms).

    Example::

        >>> infer_config(sd, {"kernel_size": [51, 49, 47, 13, 3], "ghost_ratio": 0.23, "N_path": 2, "N_rep": 4})
        {'name': 'sw_tiny', 'kwargs': {'depths': [3, 3, 18, 3], ...}}
    """
    hints = hints or {}
    stem = shape_of(sd, "downsample_layers.0.0.weight", TITLE)
    dims = [shape_of(sd, "downsample_layers.0.3.weight", TITLE)[0]]
    dims += [shape_of(sd, f"downsample_layers.{i}.0.weight", TITLE)[0] for i in (1, 2, 3)]
    counts = block_counts(sd, r"stages\.(\d+)\.(\d+)\.")
    depths = [counts.get(i, 0) for i in range(4)]
    layers = _layers(sd, depths)
    merged = {layer["merged"] for layer in layers.values()}
    bn = {layer["bn"] for layer in layers.values()}
    smalls = {layer["small"] for layer in layers.values()}
    if len(merged) > 1 or len(bn) > 1 or len(smalls) > 1:
        what = "merged (LoRA) and unmerged (LoRAs) paths" if len(merged) > 1 else (
            "layers with and without BatchNorms" if len(bn) > 1 else f"small kernels {sorted(smalls)}")
        raise CheckpointError(f"SW weights mix {what} across blocks: incomplete or corrupt weights")
    merged_form = merged.pop() if merged else False
    has_bn = bn.pop() if bn else True
    paths = {layer["paths"] for layer in layers.values() if not layer["merged"]}
    if len(paths) > 1:
        few, many = min(paths), max(paths)
        where = next(name for name, layer in layers.items() if layer["paths"] == few and not layer["merged"])
        raise CheckpointError(f"SW layer {where} has {few} path(s) (LoRAs.*) where other layers have {many}: "
                              "a path is missing")

    args = _read_args(hints)
    missing = [name for name in ("kernel_size", "ghost_ratio", "N_rep") if name not in args]
    if merged_form and "N_path" not in args:
        missing.append("N_path")
    assumed = f" (the file's args lack {', '.join(missing)}: the released recipe was assumed)" if missing else ""
    kernels = args.get("kernel_size", list(RELEASED["kernel_sizes"]) + [RELEASED["small_kernel"]])
    stage_kernels, small = list(kernels[:4]), kernels[-1]
    ghost_ratio = args.get("ghost_ratio", RELEASED["ghost_ratio"])
    n_rep = args.get("N_rep", RELEASED["n_rep"])
    n_path = paths.pop() if paths else args.get("N_path", RELEASED["n_path"])

    if smalls and small != next(iter(smalls)):
        raise CheckpointError(f"args.kernel_size {_list(kernels)} ends with small kernel {small} but the SW path "
                              f"weights are {next(iter(smalls))}x{next(iter(smalls))}{assumed}")
    if "N_path" in args and not merged_form and layers and args["N_path"] != n_path:
        raise CheckpointError(f"args.N_path={args['N_path']} but the SW layers have {n_path} path(s) (LoRAs.*)"
                              + (": a path is missing" if n_path < args["N_path"] else ""))
    if "bn" in args and layers and args["bn"] != has_bn:
        raise CheckpointError(f"args.bn={args['bn']} but the SW layers have {'' if has_bn else 'no '}BatchNorms "
                              "(bn_lora1, bn_lora2, bn_small)")
    _check_widths(args, depths, dims)
    for name, layer in layers.items():
        stage = int(name.split(".")[1])
        _check_layer(name, layer, dims[stage], stage_kernels[stage], small, ghost_ratio,
                     "args." if "kernel_size" in args else "", "args." if "ghost_ratio" in args else "", assumed)

    if missing:  # after the checks: a file they refuse gets one line, the error, which says this too
        logger.warning("SW weights whose args lack %s: assuming the released recipe (--kernel_size %s --ghost_ratio "
                       "%s --N_path %d --N_rep %d)", ", ".join(missing),
                       " ".join(map(str, RELEASED["kernel_sizes"] + (RELEASED["small_kernel"],))),
                       RELEASED["ghost_ratio"], RELEASED["n_path"], RELEASED["n_rep"])
    first = next((i for i in range(4) if depths[i]), 0)
    kwargs = dict(depths=depths, dims=dims, kernel_sizes=stage_kernels, small_kernel=small, ghost_ratio=ghost_ratio,
                  n_path=n_path, n_rep=n_rep, merged=merged_form, bn=has_bn,
                  num_classes=shape_of(sd, "head.weight", TITLE)[0], in_chans=stem[1],
                  layer_scale_init_value=1e-6 if f"stages.{first}.0.gamma" in sd else 0.0)
    return {"name": variant_name(VARIANTS, {"depths": depths, "dims": dims}, "sw"), "kwargs": kwargs}


# shapes --------------------------------------------------------------------------------------------
def _layers(sd: StateDict, depths: List[int]) -> Dict[str, dict]:
    """``{"stages.i.j.large_kernel": {"planes", "small", "paths", "merged", "bn", "rep_n"}}`` of every block."""
    found: Dict[str, dict] = {}
    for key in sd:
        m = _PATH_KEY.match(key)
        if m:
            entry = found.setdefault(f"stages.{m.group(1)}.{m.group(2)}.large_kernel", {"ids": set(), "merged": False})
            if m.group(3) is None:
                entry["merged"] = True
            else:
                entry["ids"].add(int(m.group(3)))
    layers = {}
    for i, depth in enumerate(depths):
        for j in range(depth):
            name = f"stages.{i}.{j}.large_kernel"
            entry = found.get(name)
            if entry is None:
                raise CheckpointError(f"SW layer {name} has no path weights ({name}.LoRAs.0.weight or "
                                      f"{name}.LoRA.weight): a path is missing")
            ids = sorted(entry["ids"])
            if entry["merged"] and ids:
                raise CheckpointError(f"SW layer {name} holds both a merged path (LoRA) and paths LoRAs.{ids}: "
                                      "corrupt weights")
            if ids and ids != list(range(len(ids))):
                gap = min(set(range(max(ids) + 1)) - set(ids))
                raise CheckpointError(f"SW layer {name} has paths LoRAs.{{{','.join(map(str, ids))}}}: path "
                                      f"LoRAs.{gap} is missing")
            keys = [f"{name}.LoRA.weight"] if entry["merged"] else [f"{name}.LoRAs.{p}.weight" for p in ids]
            shapes = sorted({tuple(sd[k].shape) for k in keys})
            shape = shapes[0]
            if len(shapes) > 1 or len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3]:
                raise CheckpointError(f"SW layer {name}: path weights of shapes {', '.join(map(str, shapes))}; "
                                      "expected (planes, 1, k, k), the same for every path")
            bn = f"{name}.bn_lora1.weight" in sd
            layers[name] = dict(planes=shape[0], small=shape[-1], paths=len(ids), merged=entry["merged"], bn=bn,
                                rep_n=sd[f"{name}.bn_lora1.weight"].shape[0] if bn else None)
    return layers


def _check_layer(name: str, layer: dict, channels: int, big: int, small: int, ghost_ratio: float,
                 kernel_from: str, ghost_from: str, assumed: str) -> None:
    rep_n = int(channels * (1 - ghost_ratio)) // 2 * 2
    if layer["rep_n"] is not None and layer["rep_n"] != rep_n:
        raise CheckpointError(f"SW layer {name}: {ghost_from}ghost_ratio {ghost_ratio} gives {rep_n} shift-wise "
                              f"channels of {channels}, but its BatchNorms have {layer['rep_n']}{assumed}")
    nk = math.ceil(big / small)
    if rep_n <= 0 or layer["planes"] != rep_n * nk:
        per = f"{layer['planes'] / rep_n:g}" if rep_n > 0 else "?"
        raise CheckpointError(f"SW layer {name}: {kernel_from}kernel_size gives it kernel {big} with small kernel "
                              f"{small}, {nk} planes per shift-wise channel, but its path weights hold "
                              f"{layer['planes']} planes for {rep_n} channels ({per} each){assumed}")


def _check_widths(args: dict, depths: List[int], dims: List[int]) -> None:
    """The widths of ``args.model`` scaled by ``args.width_factor`` (as the official model does),
    when the depths say the file is that variant."""
    variant = OFFICIAL_NAMES.get(str(args.get("model", "")))
    if variant is None or "width_factor" not in args or list(VARIANTS[variant]["depths"]) != depths:
        return
    expected = [int(d * args["width_factor"]) for d in VARIANTS[variant]["dims"]]
    if expected != dims:
        raise CheckpointError(f"args.model {args['model']} with args.width_factor {args['width_factor']} gives widths "
                              f"{expected}, but the weights have {dims}")


# args ----------------------------------------------------------------------------------------------
def _read_args(hints: dict) -> dict:
    """The SW entries of ``hints`` that are present (not None), checked; malformed ones raise."""
    out = {}

    def present(name):
        return hints.get(name) is not None

    if present("kernel_size"):
        ks = hints["kernel_size"]
        if not (isinstance(ks, (list, tuple)) and len(ks) >= 4 and all(_is_int(k) and k >= 1 for k in ks)):
            raise CheckpointError(f"args.kernel_size={_short(ks)} is not a list of positive ints: the four stage "
                                  "kernels then the small kernel")
        out["kernel_size"] = [int(k) for k in ks]
    if present("ghost_ratio"):
        g = hints["ghost_ratio"]
        if not (isinstance(g, numbers.Real) and not isinstance(g, bool) and 0 <= g < 1):
            raise CheckpointError(f"args.ghost_ratio={_short(g)} is not a number in [0, 1)")
        out["ghost_ratio"] = float(g)
    for name in ("N_path", "N_rep"):
        if present(name):
            v = hints[name]
            if not (_is_int(v) and 1 <= v <= 64):
                raise CheckpointError(f"args.{name}={_short(v)} is not an int in 1..64")
            out[name] = int(v)
    if present("width_factor"):
        w = hints["width_factor"]
        if not (isinstance(w, numbers.Real) and not isinstance(w, bool) and 0 < w <= 64):
            raise CheckpointError(f"args.width_factor={_short(w)} is not a positive number")
        out["width_factor"] = float(w)
    if present("bn"):
        if not isinstance(hints["bn"], bool):
            raise CheckpointError(f"args.bn={_short(hints['bn'])} is not true or false")
        out["bn"] = hints["bn"]
    if present("model"):
        out["model"] = hints["model"]
    return out


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _list(values) -> str:
    return "[" + ", ".join(map(str, values)) + "]"


def _short(value) -> str:
    return repr(value)[:40]
