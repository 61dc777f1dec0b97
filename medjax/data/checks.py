"""The start-up image check: find every missing or unreadable image before training, at once, and remember what
was checked so that a resumed run does not pay for it again.

Levels: 'none'; 'exists' (every listed file exists); 'verify' (default: 'exists' plus an integrity check of every
file: PNG chunk checksums, which catch truncation and flipped bytes without inflating the pixels, and a full decode
of every other format, JPEG included, since a truncated JPEG only shows when decoded); 'decode' (every file decoded
with the loader's own decoder). Files are checked on a pool of threads (the decoders release the GIL).

Cache: with a work directory, `<workdir>/splits/<dataset>.checked.json` holds the level and, per good image, its
size and modification time; a file whose size and time are unchanged is not checked again at that level or below.
Bad files are never cached: they are checked again on every start.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from typing import Sequence

from PIL import Image

from medjax.data.records import Record
from medjax.data.transforms import decode, is_pillow_image
from medjax.errors import atomic_write

log = logging.getLogger(__name__)
LEVELS = ("none", "exists", "verify", "decode")
CACHE_VERSION = 1


def verify_image(path: str, channels: int) -> None:
    """Raises if `path` is not a readable image: PNG by its chunk checksums, everything else by decoding it."""
    if is_pillow_image(path):
        with Image.open(path) as img:
            if img.format == "PNG":
                img.verify()  # CRC of every chunk up to IEND; no inflate
                return
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))  # DCT scaling: less work
            img.load()
        return
    decode(path, channels)


def _reason(path: str, level: str, channels: int) -> str | None:
    if not os.path.isfile(path):
        return "file not found"
    if level in ("exists", "none"):
        return None
    try:
        if level == "verify":
            verify_image(path, channels)
        else:
            decode(path, channels)
    except Exception as e:  # noqa: BLE001 - every decoder failure is reported with the file and row
        return f"cannot decode ({type(e).__name__}: {e})"
    return None


def _stamp(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def _load_cache(cache_path: str | None, level: str) -> dict[str, str]:
    if not cache_path or not os.path.isfile(cache_path):
        return {}
    try:
        with open(cache_path) as f:
            cache = json.load(f)
        if cache.get("version") != CACHE_VERSION or LEVELS.index(cache["level"]) < LEVELS.index(level):
            return {}
        return dict(cache["good"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # an unreadable cache only costs a new check


def _save_cache(cache_path: str, level: str, good: dict[str, str]) -> None:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    with atomic_write(cache_path) as f:
        json.dump({"version": CACHE_VERSION, "level": level, "good": good}, f, separators=(",", ":"))


@dataclasses.dataclass
class CheckResult:
    bad: list[tuple[Record, str]]  # (record, reason) in record order
    good: dict[str, str]  # path relative to the root -> "size:mtime_ns", for the cache
    checked: int  # images checked now (the rest were unchanged since a cached check)


def find_bad_images(records: Sequence[Record], level: str, channels: int, *, root: str = "",
                    cache_path: str | None = None, threads: int | None = None) -> CheckResult:
    """Checks every record's image at `level`, skipping those the cache at `cache_path` (if any) vouches for.

    The caller writes the cache with `save_check_cache` once it has decided to go on, so that a failed start
    writes nothing.
    """
    if level == "none":
        return CheckResult([], {}, 0)
    cached = _load_cache(cache_path, level)
    rel = (lambda p: os.path.relpath(p, root)) if root else (lambda p: p)
    good: dict[str, str] = {}
    todo: list[tuple[int, Record, str | None]] = []
    for i, r in enumerate(records):
        stamp = _stamp(r.path)
        key = rel(r.path)
        if stamp is not None and cached.get(key) == stamp:
            good[key] = stamp
        else:
            todo.append((i, r, stamp))
    bad: list[tuple[int, Record, str]] = []
    if todo:
        start = time.perf_counter()
        if len(todo) > 1000:
            log.info("checking %d images (%s)%s", len(todo), level,
                     f"; {len(records) - len(todo)} unchanged since the last check" if cached else "")
        workers = threads or min(16, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            reasons = pool.map(lambda item: _reason(item[1].path, level, channels), todo, chunksize=64)
            for (i, r, stamp), reason in zip(todo, reasons):
                if reason is None and stamp is not None:
                    good[rel(r.path)] = stamp
                elif reason is not None:
                    bad.append((i, r, reason))
        if len(todo) > 1000:
            log.info("checked %d images in %.1f s: %d bad", len(todo), time.perf_counter() - start, len(bad))
    return CheckResult([(r, reason) for _, r, reason in sorted(bad, key=lambda b: b[0])], good, len(todo))


def save_check_cache(cache_path: str, level: str, good: dict[str, str]) -> None:
    """Remembers the good images of a check (see the module docstring)."""
    if level not in ("none", "exists"):
        _save_cache(cache_path, level, good)
