"""The one base class of errors meant for users.

Anything raised as a `UserError` (or a subclass) is a problem the user can fix: the command line
prints its message, which names the place and the fix, and exits with status 2 (`--debug` adds
the traceback). Plugins raise it, or a subclass of their own, for bad input of theirs.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; the message says where and how to fix it."""
