"""Forward of a registered model at a share of its tiles, per backend of its shift-wise layers.

Builds the model with random weights, converts it, keeps ``--density`` of each channel's tiles
(largest L1 first) and compacts it; then times the whole forward pass with every shift-wise
layer on ``auto``, ``taichi`` and ``torch``, each shift-wise layer alone on its own input, and
the floor (the network without its large-kernel layers).

    python benchmarks/sparse_model_backends.py --model slak_tiny --density 0.25
"""
import argparse
import statistics
import time

import torch

from shiftwise.bench.models import floor_model, magnitude_masks
from shiftwise.convert.swap import convert_model
from shiftwise.models import create_model, randomize_
from shiftwise.modules import ShiftWiseConv2d
from shiftwise.sparse import compact


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="slak_tiny")
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = convert_model(randomize_(create_model(args.model).eval(), calibrate=None), inplace=True)
    small = compact(model, magnitude_masks(model, args.density)).eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    layers = [m for m in small.modules() if isinstance(m, ShiftWiseConv2d)]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, inp: inputs.setdefault(id(m), inp[0])) for m in layers]
    small(x)
    for h in hooks:
        h.remove()
    tiles = sum(m.weight.shape[0] for m in layers)
    print(f"{args.model}: {len(layers)} shift-wise layers, {tiles} tiles kept, batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, {args.threads} threads")
    for backend in ("auto", "taichi", "torch"):
        for m in layers:
            m.backend = backend
        whole = median_ms(lambda: small(x), args.repeats)
        alone = sum(median_ms(lambda m=m: m(inputs[id(m)]), args.repeats) for m in layers)
        print(f"{backend:>7}: whole forward {whole:8.1f} ms, shift-wise layers alone {alone:8.1f} ms")
    floor = floor_model(small)
    print(f"  floor: whole forward {median_ms(lambda: floor(x), args.repeats):8.1f} ms")


if __name__ == "__main__":
    main()
