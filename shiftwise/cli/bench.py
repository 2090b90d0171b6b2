from ..bench import register  # noqa: F401
