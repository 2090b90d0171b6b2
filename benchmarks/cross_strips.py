"""Cross-shaped plans on the CPU: two dense strips (``dispatch.cross_conv``) against the fused kernel.

Per converted layer (the first ``ShiftWiseConv2d`` of each stage of SW-T and SLaK-T, batch 4 at
224, input channels_last as the layers see it inside the models) the median forward of the fused
kernel, of the two strips and of the merged dense conv; then whole converted models with the
strips allowed and not (``CROSS_TAP_COST`` set out of reach), alternating.

    python benchmarks/cross_strips.py [--models sw_tiny slak_tiny] [--repeats 7] [--no-whole]
"""
import argparse
import time

import torch

from shiftwise import dispatch
from shiftwise.convert import convert_model
from shiftwise.functional import shiftwise_conv2d
from shiftwise.models import create_model, randomize_
from shiftwise.modules import ShiftWiseConv2d

SIDES = {0: 56, 1: 28, 2: 14, 3: 7}  # map side per stage at 224


def median_ms(fn, repeats):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def layers(model):
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, ShiftWiseConv2d):
            seen.setdefault(int(name.split(".")[1]), module)
    return seen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sw_tiny", "slak_tiny"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-whole", action="store_true", help="per-layer times only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    converted = {}
    for name in args.models:
        torch.manual_seed(0)
        converted[name] = convert_model(randomize_(create_model(name), calibrate=224).eval())
    with torch.no_grad():
        for name, model in converted.items():
            for stage, layer in sorted(layers(model).items()):
                side = SIDES[stage]
                x = torch.randn(4, layer.in_channels, side, side).contiguous(memory_format=torch.channels_last)
                w, plan, b = layer.weight, layer.plan, layer.bias
                fused = median_ms(lambda: shiftwise_conv2d(x, w, plan, b, backend="taichi_fused"), args.repeats)
                dense = median_ms(lambda: dispatch.dense_conv(x, w, plan, b), args.repeats)
                cross = (median_ms(lambda: dispatch.cross_conv(x, w, plan, b), args.repeats)
                         if dispatch.cross_strips(plan) else float("nan"))
                auto = dispatch.choose_auto_path(x.device, plan, x.shape, weight=w)
                print(f"{name} stage {stage + 1} ({side}x{side}, {plan.num_tiles} tiles of {plan.tile_size}): "
                      f"fused {fused:.1f} ms, strips {cross:.1f} ms, dense {dense:.1f} ms; auto: {auto}", flush=True)
        if args.no_whole:
            return
        x = torch.randn(4, 3, 224, 224)
        saved = dict(dispatch.CROSS_TAP_COST)
        try:
            for rnd in range(2):
                for label, cost in (("with strips", saved), ("without", {k: float("inf") for k in saved})):
                    dispatch.CROSS_TAP_COST = cost
                    dispatch._CACHE.clear()
                    for name, model in converted.items():
                        ms = median_ms(lambda: model(x), max(3, args.repeats // 2))
                        print(f"round {rnd + 1}: {name} converted forward {label}: {ms:.1f} ms", flush=True)
        finally:
            dispatch.CROSS_TAP_COST = saved


if __name__ == "__main__":
    main()
