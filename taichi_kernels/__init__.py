"""Taichi kernels of shiftwise. Imports taichi, never torch; called only from ``shiftwise.ops``."""
from .fused import column_padding, fused_kernels
from .shift_add import (ALIGNED_GROUP, MAX_ALIGNED_TILES, shift_add_aligned_kernel, shift_add_kernels,
                        shift_add_rowvec_kernel)

__all__ = ["ALIGNED_GROUP", "MAX_ALIGNED_TILES", "column_padding", "fused_kernels", "shift_add_aligned_kernel", "shift_add_kernels",
           "shift_add_rowvec_kernel"]
