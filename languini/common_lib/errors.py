"""User-facing errors: one clear line on stderr and exit code 2, never a traceback."""

import argparse
import functools
import os
import sys


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, ...). Printed as one line, exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviated flags, whose mistakes are one `error: ...` line and exit code 2
    (a UserError, printed by `exit_on_user_error`) instead of a usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def exit_on_user_error(fn):
    """Decorate a command-line entry point so that a `UserError` prints `error: ...` and exits 2, Ctrl-C
    exits 130, and output piped into a reader that stopped early (`| head`) ends quietly like a shell tool."""

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
        except BrokenPipeError:
            # the reader is gone: point stdout at /dev/null so the interpreter's final flush does not fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)  # 128 + SIGPIPE, what a shell tool killed by the signal reports

    return wrapper
