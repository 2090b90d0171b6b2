"""Check the converter against the official model code: official model -> file -> convert -> same logits.

    python scripts/check_official.py --slak ~/src/SLaK --replknet ~/src/RepLKNet-pytorch \\
        --unireplknet ~/src/UniRepLKNet [--images a.jpg b.png] [--tile-size 3] [--keep DIR]

Each path is a clone of the official repository or its model file (SLaK: ``models/SLaK.py``,
RepLKNet: ``replknet.py``, UniRepLKNet: ``unireplknet.py``); give any subset. The official model
definitions are imported from those paths at run time; nothing of them is part of shiftwise.
The few timm symbols they import (``trunc_normal_``, ``DropPath``, ``to_2tuple``,
``register_model``) and the optional iGEMM large-kernel conv (``depthwise_conv2d_implicit_gemm``,
CUDA-only upstream) are replaced by the minimal stand-ins below, so neither needs installing.

For SLaK-T (51/49/47/13, width 1.3, LoRA strips), RepLKNet-31B and UniRepLKNet-T:

1. build the official model with random weights (``shiftwise.models.randomize_``: every weight
   ``N(0, 1/fan_in)``, layer scale O(1), BatchNorm statistics calibrated on the evaluation
   images and then perturbed, so a wrong branch or fold shows in the logits, which stay O(1));
2. save its state dict in the official file layout (SLaK: ``{'model', 'args', 'epoch', ...}``
   with ``args`` an ``argparse.Namespace``; RepLKNet, UniRepLKNet: flat);
3. run ``shiftwise convert`` on that file (through ``shiftwise.cli.main``) and load the result
   with ``shiftwise.load_model``;
4. run the official model and the converted one on real photographs through the evaluation
   transform (``shiftwise.data.transform_for``, 224): by default the photographs that ship with
   matplotlib (``grace_hopper.jpg``, ``Minduka_Present_Blue_Pack.png``) plus ``--images``.

PASS per model: max |logit difference| <= 1e-4 and the same top-1 on every image. Also shown:
``top-1 gap``, the smallest margin between the official top-1 and top-2 logits (top-1 agreement
means something only where it is well above the difference), and ``ref diff``, our reference
architecture (``shiftwise.load_model`` on the official file) against the official model, which
tells a model-definition error from a conversion error. Exit 0 only if every model passes.
float32, CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import io
import math
import os
import sys
import tempfile
import time
import types

import torch
from PIL import Image
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import shiftwise  # noqa: E402
from shiftwise.cli import main as shiftwise_main  # noqa: E402
from shiftwise.data import transform_for  # noqa: E402
from shiftwise.convert.keys import infer_config, normalize_keys  # noqa: E402
from shiftwise.models import randomize_  # noqa: E402

TOLERANCE = 1e-4
SIZE = 224
SLAK_T_KERNELS = [51, 49, 47, 13, 5]
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
# where each repository keeps its model file
MODEL_FILES = {
    "slak": ("models/SLaK.py", "SLaK.py"),
    "replknet": ("replknet.py",),
    "unireplknet": ("unireplknet.py", "Image/unireplknet.py"),
}


# stand-ins for what the official files import ---------------------------------------------------
def _trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _register_model(fn):
    return fn


class _DropPath(nn.Module):
    """Stochastic depth per sample; the identity in eval mode (all this script uses)."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = float(drop_prob or 0.0), scale_by_keep

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class _DepthwiseConvSame(nn.Conv2d):
    """Plain-PyTorch stand-in for the iGEMM depthwise conv: depthwise, stride 1, padding k // 2 per axis."""

    def __init__(self, channels, kernel, bias=False):
        k = _to_2tuple(kernel)
        super().__init__(channels, channels, k, padding=(k[0] // 2, k[1] // 2), groups=channels, bias=bias)


def _standin_modules() -> dict:
    layers = types.ModuleType("timm.models.layers")
    layers.trunc_normal_, layers.DropPath, layers.to_2tuple = _trunc_normal_, _DropPath, _to_2tuple
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = _register_model
    models = types.ModuleType("timm.models")
    models.layers, models.registry, models.register_model = layers, registry, _register_model
    timm = types.ModuleType("timm")
    timm.models, timm.layers = models, layers
    igemm = types.ModuleType("depthwise_conv2d_implicit_gemm")
    igemm.DepthWiseConv2dImplicitGEMM = _DepthwiseConvSame
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.layers": layers,
            "timm.models.registry": registry, "depthwise_conv2d_implicit_gemm": igemm}


@contextlib.contextmanager
def standins():
    """Our stand-ins in ``sys.modules`` (and the official files' prints silenced) while inside."""
    mods = _standin_modules()
    saved = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


# the official code -------------------------------------------------------------------------------
def find_model_file(family: str, path: str) -> str:
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise SystemExit(f"check_official: --{family}: no such file or directory: {path}")
    for rel in MODEL_FILES[family]:
        if os.path.isfile(os.path.join(path, rel)):
            return os.path.join(path, rel)
    name = os.path.basename(MODEL_FILES[family][0])
    found = sorted(glob.glob(os.path.join(path, "**", name), recursive=True), key=lambda p: (p.count(os.sep), p))
    if not found:
        raise SystemExit(f"check_official: --{family}: no {name} under {path}")
    return found[0]


def import_file(path: str, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with standins():
        spec.loader.exec_module(module)
    return module


def build_official(family: str, module: types.ModuleType) -> tuple:
    """(display name, official model with its own initialisation)."""
    with standins():
        if family == "slak":
            model = module.SLaK_tiny(Decom=True, width_factor=1.3, kernel_size=list(SLAK_T_KERNELS), bn=True)
            return "SLaK-T", model
        if family == "replknet":
            return "RepLKNet-31B", module.create_RepLKNet31B(drop_path_rate=0.0, num_classes=1000, use_checkpoint=False)
        return "UniRepLKNet-T", module.unireplknet_t(attempt_use_lk_impl=False)


def official_file_object(family: str, model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if family != "slak":
        return state  # RepLKNet and UniRepLKNet release flat state dicts
    args = argparse.Namespace(model="SLaK_tiny", input_size=SIZE, nb_classes=1000, drop_path=0.1,
                              kernel_size=list(SLAK_T_KERNELS), width_factor=1.3, Decom=True, bn=True,
                              sparse=False, model_ema=False, epochs=300, batch_size=128, lr=4e-3)
    return {"model": state, "optimizer": {}, "epoch": 299, "scaler": {}, "args": args}


def calibrate_bn_(model: nn.Module, images: torch.Tensor, seed: int) -> None:
    """Set each BatchNorm's statistics from its input on ``images`` (perturbed), in forward order.

    ``randomize_`` calibrates on Gaussian noise; real photographs have other statistics, and deep
    BN-normalised stacks (RepLKNet) amplify the mismatch. Same perturbation as ``randomize_``.
    """
    g = torch.Generator().manual_seed(seed)

    def measure(bn, inputs):
        x = inputs[0].detach()
        var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())), correction=0)
        var = var.clamp_min(1e-2 * float(var.mean()) + 1e-12)
        bn.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(mean.shape, generator=g).to(mean))
        bn.running_var.copy_(var * (0.5 + torch.rand(var.shape, generator=g).to(var)))

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    hooks = [bn.register_forward_pre_hook(measure) for bn in bns]
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            model.eval()(images)
    finally:
        for h in hooks:
            h.remove()


# the check ---------------------------------------------------------------------------------------
def load_images(paths, model_cfg) -> torch.Tensor:
    transform = transform_for(model_cfg, SIZE)
    batch = []
    for p in paths:
        with Image.open(p) as im:
            batch.append(transform(im.convert("RGB")))
    return torch.stack(batch)


def default_images() -> list:
    try:
        import matplotlib  # noqa: PLC0415 (optional: the default photographs ship with it)
    except ImportError:
        return []
    folder = os.path.join(matplotlib.get_data_path(), "sample_data")
    return [os.path.join(folder, n) for n in MATPLOTLIB_PHOTOS if os.path.isfile(os.path.join(folder, n))]


def check(family: str, path: str, image_paths: list, workdir: str, tile, seed: int) -> dict:
    t0 = time.perf_counter()
    source = find_model_file(family, path)
    module = import_file(source, f"_official_{family}")
    name, official = build_official(family, module)
    randomize_(official, seed=seed, calibrate=None)
    # the family's evaluation transform, for the architecture the converter will read off the file
    images = load_images(image_paths, infer_config(normalize_keys(official.state_dict())[0])[1])
    calibrate_bn_(official, images, seed)
    official.eval()
    src = os.path.join(workdir, f"{family}_official.pth")
    dst = os.path.join(workdir, f"{family}_shiftwise.pth")
    torch.save(official_file_object(family, official), src)

    argv = ["convert", src, "-o", dst, "--force"] + ([] if tile is None else ["--tile-size", str(tile)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = shiftwise_main(argv)
    if rc != 0:
        raise SystemExit(f"check_official: shiftwise {' '.join(argv)} exited {rc}")
    converted = shiftwise.load_model(dst)
    for m in converted.modules():  # the Taichi kernels themselves ("auto" may run small maps densely)
        if isinstance(m, shiftwise.ShiftWiseConv2d):
            m.backend = "taichi"
    reference = shiftwise.load_model(src)
    with torch.no_grad():
        with contextlib.redirect_stdout(io.StringIO()):
            a = official(images)
        b = converted(images)
        r = reference(images)
    return {
        "model": name, "file": source, "convert": out.getvalue().strip(),
        "max_logit": float(a.abs().max()), "diff": float((a - b).abs().max()), "ref_diff": float((a - r).abs().max()),
        "top1_same": int((a.argmax(1) == b.argmax(1)).sum()), "n": a.shape[0],
        "margin": float((lambda t: t[:, 0] - t[:, 1])(a.topk(2, dim=1).values).min()),
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slak", metavar="PATH", help="clone of the official SLaK repository, or its models/SLaK.py")
    p.add_argument("--replknet", metavar="PATH", help="clone of RepLKNet-pytorch, or its replknet.py")
    p.add_argument("--unireplknet", metavar="PATH", help="clone of UniRepLKNet, or its unireplknet.py")
    p.add_argument("--images", nargs="+", default=[], metavar="FILE", help="more photographs to compare on")
    p.add_argument("--tile-size", type=int, metavar="N",
                   help="tile size for shiftwise convert (default: the model's small kernel)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--keep", metavar="DIR", help="write the official and converted files here instead of a temp dir")
    args = p.parse_args(argv)

    families = [f for f in ("slak", "replknet", "unireplknet") if getattr(args, f)]
    if not families:
        p.error("give at least one of --slak, --replknet, --unireplknet")
    images = default_images() + list(args.images)
    if not images:
        p.error("no photographs: matplotlib is not installed; pass --images")
    torch.manual_seed(args.seed)
    print(f"check_official: shiftwise {shiftwise.__version__}, torch {torch.__version__}, float32, CPU, "
          f"{torch.get_num_threads()} threads, {SIZE}x{SIZE}, tile {args.tile_size or 'default'}")
    print("images: " + ", ".join(os.path.basename(i) for i in images))

    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="check_official_") as tmp:
        workdir = args.keep or tmp
        os.makedirs(workdir, exist_ok=True)
        for family in families:
            r = check(family, getattr(args, family), images, workdir, args.tile_size, args.seed)
            print(f"{r['model']}: official {r['file']}; {r['convert']}")
            results.append(r)

    header = (f"{'model':14s} {'max|logit|':>10s} {'top-1 gap':>10s} {'max|diff|':>10s} {'ref diff':>10s} "
              f"{'top-1 same':>10s} {'time':>7s}  result")
    print(header)
    print("-" * len(header))
    ok = True
    for r in results:
        passed = r["diff"] <= TOLERANCE and r["top1_same"] == r["n"] and math.isfinite(r["max_logit"])
        ok &= passed
        print(f"{r['model']:14s} {r['max_logit']:10.3g} {r['margin']:10.3g} {r['diff']:10.3g} {r['ref_diff']:10.3g} "
              f"{r['top1_same']:>6d}/{r['n']:<3d} {r['seconds']:6.1f}s  {'PASS' if passed else 'FAIL'}")
    print(f"{'PASS' if ok else 'FAIL'}: max |logit difference| <= {TOLERANCE:g} and identical top-1 "
          f"({len(results)} models); wall time {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
