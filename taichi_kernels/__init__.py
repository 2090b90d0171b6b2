"""Taichi kernels of shiftwise. Imports taichi, never torch; called only from ``shiftwise.ops``."""
from .fused import column_padding, fused_kernels
from .plane_shift_add import plane_shift_add_kernels
from .shift_add import shift_add_kernels

__all__ = ["column_padding", "fused_kernels", "plane_shift_add_kernels", "shift_add_kernels"]
