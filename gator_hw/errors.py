"""The one exception type for mistakes a user can make."""

from __future__ import annotations

__all__ = ["GatorError"]


class GatorError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line.

    Bugs in gator-hw stay ordinary exceptions; only conditions the user controls
    (bad names, bad files, bad arguments) raise this.
    """
