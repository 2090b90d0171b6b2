"""Sparse training of shift-wise convolutions: tile masks, allocation, schedules, compaction.

One mask bit per tile (the ``N x N`` small kernel) of every ``ShiftWiseConv2d``, or per plane of
every SW layer in training form: the coarse granularity that :func:`compact` can physically
remove at inference. The training loop of
``shiftwise train`` (data, checkpoints, resume, several processes) is
:mod:`shiftwise.sparse.trainer`.
"""
from .allocation import INITS, allocate_counts, erk_densities, snip_densities, uniform_densities
from .compact import compact, plane_tile_counts, plane_tiles
from .masking import GROWTHS, MASK_PATHS, SparseConfig, TileMasker, channel_histogram, find_layers, snip_scores
from .schedules import SCHEDULES, DensitySchedule, check_density, cosine_prune_rate

__all__ = [
    "GROWTHS", "INITS", "MASK_PATHS", "SCHEDULES", "DensitySchedule", "SparseConfig", "TileMasker", "allocate_counts",
    "channel_histogram", "check_density", "compact", "cosine_prune_rate", "erk_densities", "find_layers",
    "plane_tile_counts", "plane_tiles", "snip_densities", "snip_scores", "uniform_densities",
]
