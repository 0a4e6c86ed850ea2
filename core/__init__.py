"""rlhfzoo: a plugin-based zoo of RLHF algorithms.

    from rlhfzoo import registry, hookimpl
    registry.names("objective")
"""

__version__ = "0.1.0"

from rlhfzoo.hookspecs import hookimpl  # noqa: E402
from rlhfzoo.registry import registry  # noqa: E402

__all__ = ["__version__", "hookimpl", "registry"]
