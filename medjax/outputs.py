"""Output paths checked before any work starts, and files written with the user's umask.

The command-line tools (predict, explain, export, report) call `check_file` / `check_folder` on their output paths
before they load a model or read an image, so that a folder given where a file is expected (or the reverse), a path
below a file, or an unwritable folder ends at once with one `error:` line (`OutputError`, a `UserError`).

Files that a library writes with a private mode (safetensors' `save_file` creates its file 0600, like
`tempfile.mkstemp`) get the mode an ordinary `open()` would give them, 0o666 & ~umask, with `apply_umask` before
they are renamed into place: a converted backbone or an export is readable by whoever may read the folder.
"""

from __future__ import annotations

import os

from medjax.errors import UserError


class OutputError(UserError):
    """An output path that cannot be written as asked; the message names the option and the path."""


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status; else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def apply_umask(path: str) -> None:
    """Gives a file written with a private mode (mkstemp, safetensors) the mode of an ordinary new file."""
    os.chmod(path, default_mode())


def _existing_parent(path: str) -> str:
    """The nearest folder above `path` that exists (the folder a makedirs would start from)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


def _check_parent(path: str, option: str) -> None:
    parent = _existing_parent(path)
    if not os.path.isdir(parent):
        raise OutputError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: cannot write in {parent} (permission denied)")


def check_file(path: str, option: str = "--output", example: str = "") -> None:
    """`path` can be written as a file: not a folder, below a folder one may write in."""
    if not path:
        raise OutputError(f"{option}: empty path; expected a file")
    if os.path.isdir(path):
        hint = f" (e.g. {os.path.join(path, example)})" if example else ""
        raise OutputError(f"{option} {path}: a folder; expected a file to write{hint}")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise OutputError(f"{option} {path}: exists and is not a regular file")
    _check_parent(path, option)


def check_folder(path: str, option: str = "--output") -> None:
    """`path` can be written as a folder: an existing folder one may write in, or a new one below such a folder."""
    if not path:
        raise OutputError(f"{option}: empty path; expected a folder")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{option} {path}: a file; expected a folder (it is created if missing)")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {path}: cannot write in this folder (permission denied)")
        return
    _check_parent(path, option)


def os_error_line(e: OSError) -> str:
    """One line for an OS error (no space, permission, is-a-directory...): the file and the system's reason."""
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where else reason
