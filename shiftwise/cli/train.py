"""``shiftwise train``: sparse training with tile masks (see :mod:`shiftwise.sparse.trainer`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading

from .. import outputs
from ..dispatch import BACKENDS
from ..sparse import GROWTHS, INITS, MASK_PATHS, SCHEDULES
from ..sparse.masking import POSITIONS
from ..sparse.trainer import CHECKPOINT, DEFAULT_MODEL, RECIPES, TrainConfig, train
from . import _options

_DEFAULTS = TrainConfig()


class CtrlC:
    """While active, the first Ctrl-C (SIGINT) only sets ``requested``, which the trainer reads at
    the end of each step; a second one interrupts at once.

    Installed for single-process runs only: under torchrun the ranks would stop at different steps.
    """

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nshiftwise train: Ctrl-C: saving at the end of this step (press again to stop at once)\n")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Recipe(argparse.Action):
    """``--recipe NAME``: set the recipe's settings where it stands on the command line. Options given
    after it override them, and so do options given before it with a value other than the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        for key, value in RECIPES[values].items():
            if getattr(namespace, key, None) == parser.get_default(key):
                setattr(namespace, key, value)
        setattr(namespace, self.dest, values)


def _config(args) -> TrainConfig:
    kwargs = None
    if args.model_kwargs:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_kwargs"}
    return TrainConfig(model_kwargs=kwargs, **{k: v for k, v in vars(args).items() if k in names})


def _run(args) -> int:
    config = _config(args)
    with CtrlC() as interrupt:
        summary = train(config, interrupt, show_progress=not args.quiet)
    if summary is None:  # ranks other than 0 report nothing
        return 0
    for what in ("checkpoint", "compact", "metrics"):
        if what in summary["outputs"]:
            _options.wrote(summary["outputs"][what], {"compact": "compacted model"}.get(what, what))
    if args.json:
        print(outputs.json_text(summary))
    elif "stopped_at" in summary:
        print(f"stopped at step {summary['stopped_at']}; continue with --resume")
    else:
        rows = [r for r in summary["layers"] if "histogram" in r]
        hist = "; ".join(f"{r['name']}: {r['histogram']}" for r in rows)
        unit = rows[0].get("unit", "tile") if rows else "tile"
        tiles = (f", {summary['tiles']['kept']} of {summary['tiles']['dense']} tiles after conversion"
                 if unit == "plane" else "")
        print(f"step {summary['step']}: test accuracy {summary['test_acc']:.2f}%, density "
              f"{summary['density']:.4f} (target {summary['target_density']}){tiles}, {summary['seconds']:.0f} s; "
              f"channels by kept {unit}s: {hist}")
        if summary.get("skipped_images"):
            print(f"skipped {summary['skipped_images']} unreadable training images (first: {summary['first_skipped']})")
        if summary.get("test_skipped"):
            print(f"skipped {summary['test_skipped']} unreadable held-out images in the last evaluation")
    return 0


def register(sub) -> None:
    d = _DEFAULTS
    p = _options.add_command(
        sub, "train", "sparse-train a shift-wise model with tile masks",
        "Sparse-train a shift-wise model, fine-tuned from a checkpoint (--pretrained: an official\n"
        "SLaK, RepLKNet, UniRepLKNet or SW file, a converted one, an earlier run's checkpoint.pt or\n"
        "compact.pt, or demo) or from scratch (--model). Large kernels become shift-wise layers\n"
        "exactly; AdamW (linear warmup, cosine decay) trains while one mask bit per tile is pruned\n"
        "toward the target density and regrown. SW networks (sw_tiny, ...) train unconverted with\n"
        "one mask bit per plane; --recipe sw-official is the released SW recipe. Runs under\n"
        "torchrun on several processes (gloo on CPU, NCCL on GPU). Writes checkpoint.pt,\n"
        "metrics.jsonl and compact.pt (the pruned tiles removed) to the output folder; every\n"
        "command reads the two checkpoints. Progress on stderr, the result on stdout.")
    g = p.add_argument_group("model and data")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--pretrained", metavar="CKPT",
                   help="checkpoint to fine-tune (its architecture, weights and preprocessing), or demo for the "
                        "embedded SLaK demo")
    m.add_argument("--model", help=f"registered architecture to train from scratch (when neither is given: "
                                   f"{DEFAULT_MODEL})")
    g.add_argument("--pretrained-ema", action="store_true", help="start from the EMA weights of the checkpoint")
    g.add_argument("--num-classes", type=int, metavar="N",
                   help="replace the classifier head by a new one of N classes (fine-tuning to another data set)")
    g.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='architecture settings to override, for example \'{"dims": [8, 16, 32, 64]}\'')
    _options.add_tile_size(g, help="tile side N of the shift-wise layers (when not given: the model's small kernel)")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="how the shift-wise layers compute (when not given: auto)")
    _options.add_data(g, "'digits' (the embedded handwritten digits) or an image folder with train/ and val/ "
                         "(or test/) subfolders, one folder per class in each", default=d.data)
    _options.add_image_size(g, help="input side in pixels (when not given: the pretrained checkpoint's, else 32 for "
                                    "the digits and 224 for an image folder)")
    g.add_argument("--shift", type=int, default=d.shift, metavar="PX",
                   help="random translation of the digits in pixels (0: none)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random resized crop and flip of image-folder training images (nor shift of the digits)")
    g.add_argument("--mixup", type=float, default=d.mixup, metavar="ALPHA", help="MixUp alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=d.cutmix, metavar="ALPHA",
                   help="CutMix alpha (0: off; with MixUp too, one of them per batch)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count unreadable images instead of stopping at the first")
    g.add_argument("--workers", type=int, default=d.workers, metavar="N",
                   help="processes that read an image folder (0: read in the main process)")
    g = p.add_argument_group("sparsity")
    g.add_argument("--density", type=float, default=d.density,
                   help="fraction of tiles (of planes, for SW networks) kept at the end, in (0, 1]; 1 trains dense")
    g.add_argument("--schedule", default=d.schedule, metavar="{" + ",".join(SCHEDULES) + "}",
                   help="constant: sparse from the first step; gradual: cubic from dense to the target density; "
                        "linear: the same, linearly")
    g.add_argument("--schedule-start", type=int, default=None, metavar="STEP",
                   help="step where gradual or linear pruning starts (when not given: 0)")
    g.add_argument("--schedule-end", type=int, default=None, metavar="STEP",
                   help="step where it reaches the target density (when not given: half of training)")
    g.add_argument("--init", choices=INITS, default=d.init,
                   help="share of tiles per layer: uniform, erk (by layer shape) or snip (by the loss "
                        "sensitivity of one batch)")
    g.add_argument("--positions", choices=POSITIONS, default=d.positions,
                   help="which tiles start active: by score, at random, or auto (score for snip, else random)")
    g.add_argument("--update-every", type=int, default=d.update_every, metavar="STEPS",
                   help="steps between prune-and-regrow updates")
    g.add_argument("--update-until", type=int, default=None, metavar="STEP",
                   help="no prune-and-regrow exchange after this step (when not given: until the end)")
    g.add_argument("--prune-rate", type=float, default=d.prune_rate,
                   help="fraction of active tiles exchanged at the first update")
    g.add_argument("--prune-rate-floor", type=float, default=d.prune_rate_floor,
                   help="fraction exchanged at the end (cosine decay from the prune rate)")
    g.add_argument("--growth", choices=GROWTHS, default=d.growth,
                   help="regrow the tiles of largest gradient, or at random")
    g.add_argument("--redistribute", action="store_true",
                   help="rank tiles across all layers at once, so each layer's density is learned")
    g.add_argument("--dense-layers", action="store_true",
                   help="mask single weights of linear and 1x1 convolution layers too")
    g.add_argument("--mask-paths", choices=MASK_PATHS, default=d.mask_paths,
                   help="SW networks: one mask bit per plane for all parallel paths (shared), or one per plane "
                        "and path (each)")
    g.add_argument("--align-every", type=int, default=d.align_every, metavar="UPDATES",
                   help="with --mask-paths each: every this many prune-and-regrow updates, the first path's mask "
                        "(chosen on the sum over paths) is copied to the others")
    g.add_argument("--recipe", choices=sorted(RECIPES), action=Recipe, default=None,
                   help="a named set of the options above: sw-official is the released SW recipe (--density 0.7 "
                        "--schedule constant --init snip --positions random --update-every 100 --prune-rate 0.3 "
                        "--prune-rate-floor 0.005 --growth random --mask-paths each --align-every 131); "
                        "options after it override it")
    g = p.add_argument_group("optimisation")
    n = g.add_mutually_exclusive_group()
    n.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    n.add_argument("--steps", type=int, default=None, help="optimizer steps, instead of epochs")
    _options.add_batch_size(g, default=d.batch_size, help="images per step, over all processes")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end")
    g.add_argument("--warmup", type=int, default=None, metavar="STEPS",
                   help="steps of linear warmup (when not given: a twentieth of training)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing of the loss")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip the gradient norm to NORM")
    g.add_argument("--ema-decay", type=float, default=None, metavar="D",
                   help="keep an exponential moving average of the weights with decay D, in (0, 1)")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: bfloat16 on CPU, float16 with loss scaling on CUDA")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of weights, batches, augmentation and masks")
    _options.add_device(g, help="cpu, cuda or cuda:N (when not given: cuda if available)")
    g = p.add_argument_group("output")
    _options.add_output(g, "the run folder", default=d.output, metavar="DIR")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help=f"continue the run in the output folder (or the one saved in CKPT) with its saved "
                        f"settings; CKPT defaults to DIR/{CHECKPOINT}")
    _options.add_force(g, "a run in the output folder")
    g.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="save a checkpoint and stop at STEP (continue later with --resume)")
    g.add_argument("--eval-every", type=int, default=None, metavar="STEPS",
                   help="steps between test evaluations (when not given: an epoch)")
    g.add_argument("--save-every", type=int, default=None, metavar="STEPS",
                   help="steps between checkpoints (when not given: at each evaluation)")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="STEPS",
                   help="steps between training lines in metrics.jsonl")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _options.add_json(g)
    p.set_defaults(func=_run)
