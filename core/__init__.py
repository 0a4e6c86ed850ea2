"""rlhfzoo: a plugin-based zoo of RLHF algorithms.

    from rlhfzoo import registry, hookimpl
    registry.names("objective")

    import rlhfzoo
    result = rlhfzoo.train({"algorithm": {"name": "dpo"}}, model=model, tokenizer=tokenizer,
                           train_dataset=pairs, output_dir="runs/dpo")   # see rlhfzoo.api
"""

__version__ = "0.1.0"

from rlhfzoo.hookspecs import hookimpl  # noqa: E402
from rlhfzoo.registry import registry  # noqa: E402
from rlhfzoo.api import TrainResult, train  # noqa: E402  (after the registry: it imports the config)

__all__ = ["__version__", "TrainResult", "hookimpl", "registry", "train"]
