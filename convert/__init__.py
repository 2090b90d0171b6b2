"""Reading, converting and writing checkpoints (imports torch, never taichi)."""
