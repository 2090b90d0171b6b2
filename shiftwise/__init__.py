"""shiftwise: large depthwise kernels as sums of shifted small kernels (Taichi + PyTorch)."""
from ._version import __version__
from .errors import CheckpointError, OutputExistsError, ShiftwiseError
from .functional import plane_shift_add, shift_add, shiftwise_conv2d
from .models import create_model
from .modules import ShiftWiseConv2d
from .convert import load_model
from .tiling import ShiftAddPlan, TilePlan, fold_bn, merge_tiles, split_branches, split_kernel

__all__ = [
    "__version__", "CheckpointError", "OutputExistsError", "ShiftwiseError", "ShiftAddPlan", "ShiftWiseConv2d",
    "TilePlan", "create_model", "fold_bn", "load_model", "merge_tiles", "plane_shift_add", "shift_add",
    "shiftwise_conv2d", "split_branches", "split_kernel",
]
