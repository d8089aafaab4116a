"""What every entry point in jobs/ shares: the vendor flags, and one place that turns errors into exit codes.

A job is compose (Hydra), run, report; a `UserError` anywhere is printed without a traceback and exits 2, and
so does a config Hydra refuses (a misspelt key, a value outside an enum's choices, which Hydra's message names).
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

from .config import register, translate_flags
from .errors import EXIT_USER_ERROR, UserError


_started = False  # set once a job's own code runs: Hydra composed the config


def task(fn: Callable) -> Callable:
    """Wrap a job's main: a UserError becomes its message on the log and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _started
        _started = True
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            logging.getLogger(fn.__module__).error("%s", exc)
            if _in_ray_task():
                raise  # an exit would kill the worker, which Ray takes for a lost node and runs the task again
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def _in_ray_task() -> bool:
    """Whether this job runs as a Ray task (hydra/launcher=ray); Ray is never imported to find out."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None


def launch(main: Callable[[], None]) -> None:
    """Run a Hydra main with the vendor example's flags (`--model_path ...`) rewritten into overrides."""
    register()
    sys.argv = [sys.argv[0], *translate_flags(sys.argv[1:])]
    try:
        main()
    except SystemExit as exc:
        # Hydra prints why it could not compose the config and exits 1, before the job starts: that is bad user
        # input, and exit 1 means "not classified" to the single-image mode.
        if exc.code == 1 and not _started:
            sys.exit(EXIT_USER_ERROR)
        raise
