"""Whole-model CPU inference of converted models: backend "taichi" (fused kernel everywhere)
against "auto" (dense conv or fused kernel per layer, ``shiftwise.dispatch.choose_auto_path``).

Random weights (the speed does not depend on them), 224 x 224 inputs, ``torch.no_grad()``::

    python benchmarks/models_e2e.py slak_tiny replknet_31b unireplknet_t --batch-size 4
"""
import argparse

import torch

from shiftwise.convert.swap import convert_model
from shiftwise import ShiftWiseConv2d
from shiftwise.bench import time_calls
from shiftwise.models import create_model

CPU = torch.device("cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    for name in args.models:
        torch.manual_seed(0)
        model = convert_model(create_model(name).eval(), inplace=True)
        layers = [m for m in model.modules() if isinstance(m, ShiftWiseConv2d)]
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        times, outputs = {}, {}
        with torch.no_grad():
            for backend in ("taichi", "auto"):
                for m in layers:
                    m.backend = backend
                times[backend] = time_calls(lambda: model(x), CPU, args.repeats, 0)["median_ms"]
                outputs[backend] = model(x)
        diff = (outputs["taichi"] - outputs["auto"]).abs().max().item()
        print(f"{name}: {len(layers)} shift-wise layers, batch {args.batch_size}, {torch.get_num_threads()} threads: "
              f"taichi {times['taichi']:.0f} ms, auto {times['auto']:.0f} ms "
              f"({times['taichi'] / times['auto']:.2f}x); max |logit diff| {diff:.1e}")


if __name__ == "__main__":
    main()
