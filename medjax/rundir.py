"""The one owner of a run folder's layout (the trainer's work directory), and of its lock.

    WORKDIR/
      run_config.json          the flattened config the run started with (recorded once every start-up check passed)
      metrics.json             the finished run's metrics (its presence marks the run done)
      failed.json              a run that ended without a result (no validation defined the metric): its history
      checkpoints/<N>/         orbax checkpoints of the train state (the latest few), with their arrays' digests
      best/step_N/             the best model by the validation metric, with its arrays' digests
      splits/                  the frozen train/val/test record lists (the run's data, checked on every restart)
      test_predictions.npz     the best model's test-split probabilities
      backbone/                a converted backbone kept with the run (a moved run folder finds it here)
      tensorboard/             event files
      medjax.lock              the trainer's exclusive lock (fcntl.flock; the kernel releases it when the process
                               ends, however it ends); it holds the trainer's pid and command

Every module that reads or writes a run folder takes the names from here.

One writer per work directory: the trainer holds `medjax.lock` exclusively (`lock`) from start to end; a second
trainer is refused with one line. predict / export / explain hold it shared while they load a run's model
(`reading`), so they are refused with one line while a trainer writes the run, and a trainer cannot start (and prune
the best model) under them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys

from medjax.errors import UserError

RUN_CONFIG = "run_config.json"
METRICS = "metrics.json"
FAILED = "failed.json"
CHECKPOINTS = "checkpoints"
BEST = "best"
SPLITS = "splits"
TEST_PREDICTIONS = "test_predictions.npz"
TENSORBOARD = "tensorboard"
BACKBONE = "backbone"
LOCK = "medjax.lock"
DIGESTS_KEY = "medjax_digests"  # the key of the per-array SHA-256 digests in an orbax step's custom metadata


class WorkdirError(UserError):
    """The work directory cannot be used (a file, no permission)."""


class WorkdirBusy(WorkdirError):
    """The work directory is held by another process (a trainer writing it, or a reader loading its model)."""


def path(workdir: str, *names: str) -> str:
    return os.path.join(workdir, *names)


def split_file(workdir: str, dataset: str, suffix: str = "json") -> str:
    """`splits/<dataset>.<suffix>`: the frozen split (`json`) and its caches (`checked.json`, `statistics.json`...)."""
    return path(workdir, SPLITS, f"{dataset}.{suffix}")


def best_dir(workdir: str, step: int) -> str:
    return os.path.abspath(path(workdir, BEST, f"step_{step}"))


# ------------------------------------------------------------------------------------------------ the lock

_held: dict[str, list] = {}  # realpath of a work directory -> [fd, depth]: the locks this process holds


def _holder(fd: int) -> str:
    """Who holds the lock, from what the trainer wrote into it (empty when a reader holds it)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info.get("pid"):
        return "predict, export or explain loading its model, or a trainer starting"
    return f"a trainer, pid {info['pid']} on {info.get('host', '?')}: {info.get('command', '?')}"


def lock(workdir: str) -> None:
    """Takes the work directory's exclusive lock for this process (creating the folder), or raises WorkdirBusy
    naming the holder. Re-entrant within a process; `unlock` releases it."""
    key = os.path.realpath(workdir)
    if key in _held:
        _held[key][1] += 1
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path(workdir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"{workdir}: cannot be used as a work directory ({e.strerror or e}); pass a folder "
                           "this user can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirBusy(f"{workdir} is in use by another process ({holder}); one trainer writes a work directory "
                          "at a time: wait for it to end, or use another --workdir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = [fd, 1]


def unlock(workdir: str) -> None:
    key = os.path.realpath(workdir)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        try:
            os.ftruncate(entry[0], 0)  # no stale holder named after a clean end
        finally:
            os.close(entry[0])  # closing releases the flock


@contextlib.contextmanager
def locked(workdir: str):
    lock(workdir)
    try:
        yield
    finally:
        unlock(workdir)


@contextlib.contextmanager
def reading(workdir: str):
    """A shared hold on the work directory while a run's model is loaded: raises WorkdirBusy (one line) while a
    trainer writes it. A folder without a lock file (an exported model, a read-only copy) is read as it is."""
    if os.path.realpath(workdir) in _held:  # this process is the writer
        yield
        return
    try:
        fd = os.open(path(workdir, LOCK), os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise WorkdirBusy(f"{workdir}: the run is being written by {_holder(fd)}; its best model and checkpoints "
                              "change under a reader, so wait until the trainer ends (or stop it: it saves and "
                              "exits) and run this again") from None
        yield
    finally:
        os.close(fd)
