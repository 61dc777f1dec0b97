"""The one base class of every error a user can cause (bad input, a bad config value, a damaged file), and the
wrapper every CLI's `main` runs under.

Every CLI catches `UserError` (and OS errors such as a full disk or a missing permission) and prints one `error:`
line, exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import sys


class UserError(ValueError):
    """Bad input from the user: printed as one `error:` line, exit status 2."""


def os_error_line(e: OSError) -> str:
    """An OSError as one line naming the file: 'PATH: No space left on device; free some space and run the same
    command again'."""
    where = e.filename if e.filename is not None else ""
    if getattr(e, "filename2", None):
        where = f"{where} -> {e.filename2}"
    what = e.strerror or " ".join(str(e).split()) or type(e).__name__
    hint = {errno.ENOSPC: "free some space and run the same command again",
            errno.EDQUOT: "free some space and run the same command again",
            errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
            errno.EROFS: "choose a writable location",
            errno.EISDIR: "expected a file, not a folder", errno.ENOTDIR: "expected a folder, not a file",
            }.get(e.errno)
    return f"{where + ': ' if where else ''}{what}{'; ' + hint if hint else ''}"


def error_line(e: BaseException) -> str:
    """The `error:` line of a user error or an OS error (message on one line)."""
    text = os_error_line(e) if isinstance(e, OSError) else " ".join(str(e).split())
    return f"error: {text}"


_NATIVE_OS_ERROR = re.compile(r"os_error_code='(\d+)'")  # how tensorstore (orbax checkpoints) reports an errno
_NATIVE_PATH = re.compile(r'(?:Failed writing|local file): "([^"]+)"')


def os_error_in(e: BaseException) -> OSError | None:
    """The OS error behind an exception: itself, one in its cause / context chain, or one a native library (orbax's
    tensorstore: `ValueError: RESOURCE_EXHAUSTED: ... [os_error_code='28']`) reported in its message."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        code = _NATIVE_OS_ERROR.search(str(e))
        if code:
            path = _NATIVE_PATH.search(str(e))
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))), path.group(1) if path else None)
        e = e.__cause__ or e.__context__
    return None


def cli_main(fn):
    """Decorator of a CLI's `main(argv) -> int`: a `UserError` or an `OSError` (no space, permission, is-a-directory,
    ...) escaping it becomes one `error:` line on stderr and exit status 2; anything else is a bug and keeps its
    traceback."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError) as e:
            print(error_line(e), file=sys.stderr, flush=True)
            return 2
        except Exception as e:
            os_error = os_error_in(e)  # a full disk met inside a library (a checkpoint write) is no bug either
            if os_error is None:
                raise
            print(error_line(os_error), file=sys.stderr, flush=True)
            return 2

    return wrapped


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary name beside `path` (`path.tmpPID`) for a writer that takes a file name (safetensors), renamed onto
    `path` when the block ends without an error; on any error (a full disk, a kill signal turned into an exception)
    the temporary file is removed and `path` keeps its old content."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs):
    """open() for writing `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
