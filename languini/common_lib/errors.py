"""User-facing errors: one clear line on stderr and exit code 2, never a traceback."""

import functools
import sys


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, ...). Printed as one line, exit code 2."""


def exit_on_user_error(fn):
    """Decorate a command-line entry point so that a `UserError` prints `error: ...` and exits 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
