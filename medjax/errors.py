"""The one base class of every error a user can cause (bad input, a bad config value, a damaged file).

Every CLI catches `UserError` (and OS errors such as a full disk or a missing permission) and prints one `error:`
line, exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: printed as one `error:` line, exit status 2."""
