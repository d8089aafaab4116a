"""What every entry point in jobs/ shares: the vendor flags, and one place that turns errors into exit codes.

A job is compose (Hydra), run, report; a `UserError` anywhere is printed without a traceback and exits 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

from .config import register, translate_flags
from .errors import EXIT_USER_ERROR, UserError


def task(fn: Callable) -> Callable:
    """Wrap a job's main: a UserError becomes its message on the log and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            logging.getLogger(fn.__module__).error("%s", exc)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def launch(main: Callable[[], None]) -> None:
    """Run a Hydra main with the vendor example's flags (`--model_path ...`) rewritten into overrides."""
    register()
    sys.argv = [sys.argv[0], *translate_flags(sys.argv[1:])]
    main()
