"""The errors a training run raises for the user, in a module of their own so that the trainer
and its helpers (the run directory, the checkpoint format) share them without importing each
other. `rlhfzoo.trainer` re-exports both."""

from __future__ import annotations

from rlhfzoo.errors import UserError


class TrainingError(UserError, RuntimeError):
    """A run stopped for a reason the user can act on (message says what and where)."""


class NonFiniteError(TrainingError):
    """A loss, reward, gradient or weight became NaN or infinite; nothing from that step is saved."""
