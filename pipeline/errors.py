"""Errors a user can act on.

`UserError` carries a message that names the input at fault and what to do about it; entry points print it
without a traceback and exit with `EXIT_USER_ERROR`. Anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or configuration, found before (or instead of) heavy work."""
