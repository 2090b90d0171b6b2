from ..train import register  # noqa: F401
