"""An exclusive, OS-level lock on a folder, so two commands never write into it at the same time.

    from languini.common_lib.file_lock import exclusive_lock

    with exclusive_lock("data/demo", "corpus folder"):
        ...  # only this process writes into data/demo here

The lock is `flock(LOCK_EX | LOCK_NB)` on `<folder>/.languini.lock`. The operating system releases it when
its process ends, however it ends (SIGKILL included), so a crashed holder never leaves a stale lock, and
the lock file itself is left in place (deleting it would let two processes lock two different files).
While held, the file records the holder's pid, host and command line, so a second process is refused with
one line naming them: `UserError("corpus folder data/demo is in use by pid 123 (command ...)")`.
Local file systems only: flock over NFS may not exclude a process on another machine.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import stat
import sys

from languini.common_lib.errors import UserError

LOCK_FILE = ".languini.lock"
_COMMAND_CHARS = 200  # how much of the holder's command line an error message shows


def _holder_record() -> bytes:
    """What the lock file says while this process holds it: pid, host, command line and start time."""
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return (json.dumps(record) + "\n").encode()


def _describe_holder(fd: int) -> str:
    """`pid N (command ...)` from a lock file's record, or a vaguer phrase while the record is unwritten."""
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0).decode())
        pid, host, command = int(record["pid"]), str(record["host"]), str(record["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
    command = " ".join(command.split())  # one line, even for a `python -c` script
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 3] + "..."
    where = "" if host == socket.gethostname() else f" on host {host}"
    return f"pid {pid}{where} (command {command})"


def _open_lock_file(folder: str) -> int:
    """Open (creating it if needed) the folder's lock file; never follow a symlink planted in its place,
    nor write into a hard link or a special file (the holder's record truncates the file)."""
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link, not a lock file; remove it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a hard link's other name would be truncated
        os.close(fd)
        raise UserError(f"{path} is not a lock file (a special file or one with other names); remove it")
    return fd


@contextlib.contextmanager
def exclusive_lock(folder: str, what: str = "folder"):
    """Hold an exclusive lock on `folder` (created if missing) for the `with` block.

    `what` names the folder in the error a second process gets, e.g. "corpus folder" or "run folder".
    Raises UserError at once (never waits) when another process holds the lock; OSError when the folder
    cannot be created or written (callers turn that into their own one-line error).
    """
    os.makedirs(folder, exist_ok=True)
    fd = _open_lock_file(folder)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{what} {folder} is in use by {_describe_holder(fd)}; wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the record describes a holder only while there is one
    finally:
        os.close(fd)  # closing releases the lock
