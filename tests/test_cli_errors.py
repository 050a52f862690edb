"""Command-line entry points end with one line, never a traceback: user errors, and output cut off by `| head`."""

import subprocess
import sys

import pytest

from languini.common_lib.errors import UserError, exit_on_user_error

MANY_LINES = """
from languini.common_lib.errors import exit_on_user_error

@exit_on_user_error
def main():
    for i in range(200_000):
        print(f"line {i}")

main()
"""


def test_output_cut_off_by_the_reader_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-c", MANY_LINES], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()  # what `| head -1` does after its line
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_user_error_is_one_line_and_exit_2(capsys):
    @exit_on_user_error
    def main():
        raise UserError("no such split 'tset'")

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2 and capsys.readouterr().err == "error: no such split 'tset'\n"
