"""Make the embedded demo: the UCI digits as a compact array file, and a small SLaK trained on them.

    python scripts/make_demo.py            # train slak_demo, write shiftwise/data/slak_demo.pth
    python scripts/make_demo.py --digits   # (re)extract shiftwise/data/digits.npz (needs scikit-learn)

The digits (E. Alpaydin, C. Kaynak, UCI Machine Learning Repository, CC BY 4.0) are read once
from scikit-learn's bundled copy; shiftwise itself never imports scikit-learn. The model is the
registry's ``slak_demo`` (SLaK architecture: LoRA strips + 5x5 small kernel, BN, layer scale),
trained with plain AdamW on the fixed train split, deterministic (seed 0, one thread), and saved
in the official SLaK checkpoint layout ``{'model', 'model_ema', 'optimizer', 'epoch', 'args', ...}``
with ``args`` an ``argparse.Namespace``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "shiftwise", "data")
sys.path.insert(0, ROOT)

from shiftwise.data import DIGITS_FILE, DIGITS_SIZE, Digits  # noqa: E402
from shiftwise.models import create_model  # noqa: E402

TEST_FRACTION = 0.2


def extract_digits(path: str) -> None:
    """Write the 1797 digits as uint8 arrays with a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 (only this step needs it)

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    labels = digits.target.astype(np.uint8)
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[:round(TEST_FRACTION * len(idx))]] = True
    np.savez_compressed(path, train_images=images[~test], train_labels=labels[~test],
                        test_images=images[test], test_labels=labels[test])
    print(f"wrote {path}: {int((~test).sum())} train, {int(test.sum())} test images ({os.path.getsize(path)} bytes)")


def _translate(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels (edge-replicated), a cheap augmentation."""
    padded = F.pad(x, [pad] * 4, mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (len(x), 2), generator=gen).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def _accuracy(model, images, labels) -> float:
    model.eval()
    pred = torch.cat([model(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])
    return 100.0 * pred.eq(labels).float().mean().item()


def train(args) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train_set, test_set = Digits("train"), Digits("test")
    x_train = torch.stack([train_set[i][0] for i in range(len(train_set))])
    y_train = train_set.targets
    x_test = torch.stack([test_set[i][0] for i in range(len(test_set))])
    y_test = test_set.targets

    model = create_model("slak_demo")
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch

    def lr_factor(step):  # linear warm-up for one epoch, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        running = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(_translate(x_train[idx], gen)), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                    e.copy_(e * args.ema_decay + p * (1 - args.ema_decay) if e.is_floating_point() else p)
            running += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {running / len(x_train):.3f}, test top-1 "
              f"{_accuracy(model, x_test, y_test):.2f}% (EMA {_accuracy(ema, x_test, y_test):.2f}%), "
              f"{time.perf_counter() - start:.0f} s")
    namespace = argparse.Namespace(
        model="SLaK_demo", data_set="UCI-digits", input_size=DIGITS_SIZE, nb_classes=10, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=0.05, smoothing=0.1, kernel_size=[31, 15, 9, 7, 5],
        width_factor=1.0, Decom=True, bn=True, model_ema=True, model_ema_decay=args.ema_decay, seed=0, sparse=False)
    # the official layout less the optimizer state, which would triple the file for no use here
    checkpoint = {"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": args.epochs - 1,
                  "scaler": {}, "args": namespace}
    path = os.path.join(DATA, "slak_demo.pth")
    torch.save(checkpoint, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes) in {time.perf_counter() - start:.0f} s: test top-1 "
          f"{_accuracy(model, x_test, y_test):.2f}%, EMA {_accuracy(ema, x_test, y_test):.2f}%")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", action="store_true", help="extract digits.npz from scikit-learn")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    args = parser.parse_args(argv)
    if args.digits or not os.path.exists(os.path.join(DATA, DIGITS_FILE)):
        extract_digits(os.path.join(DATA, DIGITS_FILE))
    if not args.digits:
        train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
