"""The project's error type and the one place that turns it into a clean exit."""

from __future__ import annotations

import sys
from collections.abc import Callable


class GraftError(Exception):
    """An expected failure with a message meant for the user: no traceback needed."""


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a GraftError prints its message and exits with status 1."""
    try:
        main()
    except GraftError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
