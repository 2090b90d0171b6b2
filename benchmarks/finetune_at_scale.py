"""``shiftwise train --pretrained`` on a full-size network: time per step, peak memory, masks, resume
and compaction at 224 x 224.

Writes a SLaK-T (or another registered model) with random weights in the official checkpoint
layout, converts it with ``shiftwise convert``, makes a small image folder of random images, then
fine-tunes the converted file to the density asked for in two halves (``--stop-after``, then
``--resume``) and reads the results back. Prints one JSON object on stdout.

    python benchmarks/finetune_at_scale.py --model slak_tiny --density 0.25 --steps 6 --batch-size 4
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from shiftwise.convert.io import read_checkpoint
from shiftwise.models import create_model, randomize_


def _folder(root: Path, classes: int, per_class: int, size: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"{i}.jpg", quality=90)


def _shiftwise(*args: str) -> tuple:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "shiftwise", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"shiftwise {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="slak_tiny")
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = randomize_(create_model(args.model).eval(), calibrate=None)
        torch.save({"model": model.state_dict()}, tmp / "official.pth")
        del model
        _, convert_s = _shiftwise("convert", str(tmp / "official.pth"), "-o", str(tmp / "converted.pth"))
        _folder(tmp / "data", args.classes, args.batch_size, args.image_size + 32, seed=0)
        half = max(1, args.steps // 2)
        common = ["train", "--pretrained", str(tmp / "converted.pth"), "--data", str(tmp / "data"),
                  "--num-classes", str(args.classes), "--density", str(args.density), "--steps", str(args.steps),
                  "--batch-size", str(args.batch_size), "--update-every", "1", "--schedule-end", str(half),
                  "--eval-every", str(args.steps), "--log-every", "1", "--image-size", str(args.image_size), "--quiet", "--json",
                  "-o", str(tmp / "run")]
        _, first_s = _shiftwise(*common, "--stop-after", str(half))
        out, second_s = _shiftwise(*common, "--resume")
        summary = json.loads(out)
        steps = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        seconds = [r["seconds"] for r in steps if r.get("event") == "train"]
        per_step = [round(b - a, 2) for a, b in zip(seconds, seconds[1:]) if b > a]  # within one process
        compact = read_checkpoint(tmp / "run" / "compact.pt")
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result = {
            "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
            "threads": torch.get_num_threads(), "steps": args.steps, "density_target": args.density,
            "density_reached": summary["density"], "compact_tiles": compact.tiles,
            "compact_density": compact.density, "resumed_at": half,
            "seconds_per_step": per_step, "convert_seconds": round(convert_s, 1),
            "first_half_wall_seconds": round(first_s, 1), "second_half_wall_seconds": round(second_s, 1),
            "peak_rss_mib_of_any_command": round(peak_mib),
            "cpu": os.cpu_count(), "torch": torch.__version__,
        }
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
