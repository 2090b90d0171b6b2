"""Reading, converting and writing checkpoints (imports torch, never taichi).

``safe``: reading a file without running code from it; ``keys``: from a loaded object to a state
dict with the official key names and its architecture; ``io``: checkpoints in, models and
converted files out; ``swap``: the in-memory conversion of a model.
"""
from .io import (Checkpoint, ConvertReport, build_model, convert_checkpoint, infer_config, load_model,
                 normalize_keys, read_checkpoint, safe_load, save_converted)
from .swap import convert_model, default_tile_size, tile_counts

__all__ = [
    "Checkpoint", "ConvertReport", "build_model", "convert_checkpoint", "convert_model", "default_tile_size",
    "infer_config", "load_model", "normalize_keys", "read_checkpoint", "safe_load", "save_converted", "tile_counts",
]
