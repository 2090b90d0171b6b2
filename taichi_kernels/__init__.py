"""Taichi kernels of shiftwise. Imports taichi, never torch; called only from ``shiftwise.ops``."""
from .shift_add import shift_add_kernels

__all__ = ["shift_add_kernels"]
