"""Official weights by name: download, verify, convert, cache.

    folder = fetch("dinov2_vitb14")        # $MEDJAX_HOME/weights/dinov2_vitb14/, converted, with provenance.json

- Cache: `$MEDJAX_HOME` (default `~/.cache/medjax`); converted folders under `weights/NAME/`, downloads in progress
  under `downloads/NAME/FILE.part`. A folder is trusted only once `provenance.json` is in it: the conversion writes
  into `weights/.NAME.tmp-PID/` and the folder is renamed into place when whole, so a killed fetch leaves nothing a
  later run trusts (its `.part` file is only ever resumed, then checked, never used as it is).
- Download: urllib (HTTP Range resume of a cut transfer, retries with back-off, a progress line with bytes and rate,
  a free-space check before writing, the whole file renamed into place when its length is complete).
- Verify: the published digest where the source has one (full SHA-256, or the leading hex digits of torch.hub file
  names); a mismatch deletes the file and is one `WeightsError`.
- Mirrors: `MEDJAX_MIRROR=URL` fetches every `https://HOST/PATH` as `URL/HOST/PATH` (Hugging Face files too).
- Offline: `MEDJAX_OFFLINE=1` or `HF_HUB_OFFLINE=1` never touches the network; a name not in the cache is an error
  naming the official URL and the `--from-file` command.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import medjax
from medjax import pretrained
from medjax.convert import convert
from medjax.errors import UserError
from medjax.weights.registry import File, Source, get, is_name, name_for

PROVENANCE_FILE = "provenance.json"
CHUNK = 1 << 20
RETRIES = 5  # attempts after the first, for connection errors, cut transfers and HTTP 5xx / 429
BACKOFF_S = 1.0  # first retry delay, doubled each time (tests set it to 0)
TIMEOUT_S = 60.0
SPACE_MARGIN = 64 * (1 << 20)  # bytes kept free beyond the file


class WeightsError(UserError):
    """A download, a digest, the cache or an offline lookup failed; the message names the file and the URL."""


# ------------------------------------------------------------------------------------------------ places


def home() -> str:
    return os.path.expanduser(os.environ.get("MEDJAX_HOME") or os.path.join("~", ".cache", "medjax"))


def cache_dir(name: str) -> str:
    return os.path.join(home(), "weights", name)


def download_dir(name: str) -> str:
    return os.path.join(home(), "downloads", name)


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no")
               for v in ("MEDJAX_OFFLINE", "HF_HUB_OFFLINE"))


def mirrored(url: str) -> str:
    """`https://HOST/PATH` as fetched: unchanged, or `$MEDJAX_MIRROR/HOST/PATH`."""
    mirror = os.environ.get("MEDJAX_MIRROR", "").strip()
    if not mirror:
        return url
    scheme, _, rest = url.partition("://")
    return f"{mirror.rstrip('/')}/{rest}" if scheme in ("http", "https") else url


def cached(name: str) -> str | None:
    """The converted folder of `name` when it is complete, else None."""
    folder = cache_dir(name)
    ok = all(os.path.isfile(os.path.join(folder, f)) for f in (PROVENANCE_FILE, pretrained.METADATA_FILE,
                                                               pretrained.PARAMS_FILE))
    return folder if ok else None


# ------------------------------------------------------------------------------------------------ download


def _progress(label: str, done: int, total: int | None, started: float, stream) -> None:
    rate = done / max(time.monotonic() - started, 1e-6)
    total_text = f"/{total / 1e6:,.1f}" if total else ""
    stream.write(f"\r{label}: {done / 1e6:,.1f}{total_text} MB  {rate / 1e6:,.1f} MB/s ")
    stream.flush()


def _check_space(folder: str, needed: int, url: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed + SPACE_MARGIN > free:
        raise WeightsError(f"{folder}: {needed / 1e9:.2f} GB needed for {url}, only {free / 1e9:.2f} GB free; free "
                           "some space or set MEDJAX_HOME to a larger disk")


def download(url: str, target: str, *, quiet: bool = False) -> str:
    """Download `url` (mirrored when MEDJAX_MIRROR is set) to `target`, resuming `target.part` with an HTTP Range
    request after a cut or a killed run; the file appears at `target` only when its length is complete."""
    fetched = mirrored(url)
    part = target + ".part"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    stream = sys.stderr
    show = not quiet and stream.isatty()
    label = os.path.basename(target)
    attempt = 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(fetched, headers={"User-Agent": f"medjax/{medjax.__version__}",
                                                           **({"Range": f"bytes={have}-"} if have else {})})
        try:
            redirects = _Redirects()
            with urllib.request.build_opener(redirects).open(request, timeout=TIMEOUT_S) as response:
                _record_linked_etag(target, redirects.linked_etag or response.headers.get("X-Linked-Etag"))
                total = _expected_total(response, have, part)
                if response.status == 200 and have:  # the server ignored the range: start again
                    have = 0
                if total is not None:
                    _check_space(os.path.dirname(target), total - have, url)
                started = time.monotonic()
                with open(part, "ab" if have else "wb") as f:
                    done = have
                    last = 0.0
                    while True:
                        chunk = response.read(CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        done += len(chunk)
                        if show and time.monotonic() - last > 0.2:
                            _progress(label, done, total, started, stream)
                            last = time.monotonic()
                if total is not None and done < total:
                    raise http.client.IncompleteRead(b"", total - done)
                if show:
                    _progress(label, done, total, started, stream)
                    stream.write("\n")
            os.replace(part, target)
            return target
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: the part may already be whole, or stale
                os.remove(part)
            elif e.code not in (408, 429, 500, 502, 503, 504):
                where = f" (fetched as {fetched})" if fetched != url else ""
                raise WeightsError(f"HTTP {e.code} {e.reason} for {url}{where}") from None
            error = e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            if isinstance(getattr(e, "reason", None), socket.gaierror):  # no such host: retrying cannot help
                host = urllib.parse.urlsplit(fetched).hostname
                raise WeightsError(f"{url}: cannot resolve {host} ({e.reason.strerror}); without a network set "
                                   "MEDJAX_MIRROR to an internal mirror, or download the file elsewhere and use "
                                   "--from-file") from None
            error = e
        except OSError as e:  # a local disk error (full, read-only): retrying cannot help
            raise WeightsError(f"{part}: {e.strerror or e}") from None
        attempt += 1
        if attempt > RETRIES:
            where = f" (fetched as {fetched})" if fetched != url else ""
            raise WeightsError(f"{url}{where}: download failed after {RETRIES + 1} attempts: "
                               f"{_reason(error)}; run the same command again to resume") from None
        if not quiet:
            print(f"{label}: {_reason(error)}; retrying in {BACKOFF_S * 2 ** (attempt - 1):g} s", file=stream)
        time.sleep(BACKOFF_S * 2 ** (attempt - 1))


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Keeps the `X-Linked-Etag` of a redirect: Hugging Face answers a `resolve` URL of an LFS file with a redirect to
    its storage, and that header carries the file's SHA-256."""

    linked_etag = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.linked_etag = headers.get("X-Linked-Etag") or self.linked_etag
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _record_linked_etag(target: str, etag: str | None) -> None:
    """Remember a SHA-256 the server published for the file (Hugging Face's LFS `X-Linked-Etag`) beside it."""
    digest = (etag or "").strip().removeprefix("W/").strip('"').lower()
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        with open(target + ".sha256", "w") as f:
            f.write(digest)


def linked_digest(target: str) -> str | None:
    try:
        with open(target + ".sha256") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _expected_total(response, have: int, part: str) -> int | None:
    """The whole file's length, from Content-Range (a 206) or Content-Length (a 200)."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        start, _, total = content_range.replace("bytes ", "").partition("/")
        if not start.startswith(f"{have}-"):
            os.remove(part)  # a resume from elsewhere cannot be appended: start again
            raise http.client.HTTPException(f"the server resumed at {content_range!r}, not at byte {have}")
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _reason(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    if isinstance(e, http.client.IncompleteRead):
        return "the connection was cut before the end of the file"
    return f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------ verify


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str, file: File, name: str) -> tuple[str, str | None]:
    """(the file's SHA-256, the published digest it was checked against): the registry's, else the one the server
    sent (Hugging Face's `X-Linked-Etag`), else None. A mismatch deletes the file."""
    digest = sha256_of(path)
    published = file.sha256 or linked_digest(path)
    if published and not digest.startswith(published.lower()):
        os.remove(path)
        if os.path.exists(path + ".sha256"):
            os.remove(path + ".sha256")
        raise WeightsError(f"{name}: {os.path.basename(path)} has SHA-256 {digest}, the publisher's digest is "
                           f"{published} ({file.url}); the file was deleted: a damaged download, a mirror serving "
                           "another file, or a changed upstream file")
    return digest, published


# ------------------------------------------------------------------------------------------------ fetch


def _offline_error(source: Source) -> WeightsError:
    urls = ", ".join(f.url for f in source.files)
    files = " ".join(f"--from-file {f.filename}" for f in source.files)
    return WeightsError(f"{source.name} is not in the cache ({cache_dir(source.name)}) and the network is off "
                        f"(MEDJAX_OFFLINE / HF_HUB_OFFLINE); download {urls} elsewhere and run `python -m converters "
                        f"fetch {source.name} {files}`")


def _match_files(source: Source, given: list[str]) -> dict[File, str]:
    """--from-file paths matched to the source's files: by file name, or the only file of a one-file source."""
    out = {}
    for path in given:
        if not os.path.isfile(path):
            raise WeightsError(f"--from-file {path}: no such file")
        match = [f for f in source.files if f.filename == os.path.basename(path)]
        if not match and len(source.files) == 1:
            match = list(source.files)
        if not match:
            raise WeightsError(f"--from-file {path}: {source.name} has no file of that name; its files: "
                               f"{', '.join(f.filename for f in source.files)}")
        out[match[0]] = path
    return out


def fetch(name: str, *, from_files: list[str] | None = None, keep_download: bool = False, quiet: bool = False,
          url: str | None = None) -> str:
    """The converted folder of the registry name `name`: from the cache, else downloaded (or taken from
    `from_files`), verified, converted and cached. Returns the folder's path. `url`: download the checkpoint from this
    address instead of the registry's (the download link a publisher sends after its licence is accepted, e.g.
    DINOv3's); the file is checked and converted like the official one."""
    source = get(name)
    if url is not None and not url.startswith(("https://", "http://")):
        raise WeightsError(f"{name}: --url {url!r} is not an http(s) address")
    folder = cached(name)
    if folder and not from_files:
        return folder
    given = _match_files(source, list(from_files or []))
    missing = [f for f in source.files if f not in given]
    if missing and offline():
        raise _offline_error(source)
    local: dict[File, str] = {}
    records = []
    for file in source.files:
        if file in given:
            path = given[file]
        else:
            path = os.path.join(download_dir(name), file.filename)
            address = url if url is not None and file is source.checkpoint else file.url
            if not os.path.exists(path):
                if not quiet:
                    print(f"{name}: downloading {address} (about {file.size / 1e6:,.0f} MB)", file=sys.stderr)
                download(address, path, quiet=quiet)
        digest, published = verify(path, file, name) if file not in given else _verify_given(path, file, name)
        local[file] = path
        records.append({"url": file.url, "fetched_from": "--from-file " + os.path.abspath(path) if file in given
                        else mirrored(address), "revision": source.revision, "bytes": os.path.getsize(path),
                        "sha256": digest, "published_digest": published, "role": file.role})
    folder = _convert_into_cache(source, local, records)
    if not keep_download:
        shutil.rmtree(download_dir(name), ignore_errors=True)
    return folder


def _verify_given(path: str, file: File, name: str) -> tuple[str, str | None]:
    """A file the user downloaded by hand: checked like a download, but never deleted."""
    digest = sha256_of(path)
    if file.sha256 and not digest.startswith(file.sha256.lower()):
        raise WeightsError(f"{name}: --from-file {path} has SHA-256 {digest}, the publisher's digest is {file.sha256} "
                           f"({file.url}); it is not the official file (or it is damaged)")
    return digest, file.sha256


def _convert_into_cache(source: Source, local: dict[File, str], records: list) -> str:
    target = cache_dir(source.name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = os.path.join(os.path.dirname(target), f".{source.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint = local[source.checkpoint]
    heads = [p for f, p in local.items() if f.role == "linear_head"]
    try:
        config_path = None
        if source.config is not None:
            os.makedirs(tmp, exist_ok=True)
            config_path = os.path.join(tmp, "source_config.json")
            with open(config_path, "w") as f:
                json.dump(source.config, f)
        convert(checkpoint, tmp, source.model, config_path, linear_head=heads[0] if heads else None)
        if config_path:
            os.remove(config_path)
        provenance = {"name": source.name, "model": source.model, "licence": source.licence, "note": source.note,
                      "files": records, "medjax_version": medjax.__version__,
                      "fetched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        with open(os.path.join(tmp, PROVENANCE_FILE), "w") as f:
            json.dump(provenance, f, indent=2)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def provenance(name: str) -> dict | None:
    folder = cached(name)
    if folder is None:
        return None
    with open(os.path.join(folder, PROVENANCE_FILE)) as f:
        return json.load(f)


def resolve(value: str, grid_folder: bool = False) -> str:
    """A `model.pretrained` value: a registry name becomes its cached folder (fetched on first use); with
    `grid_folder` (a grid cell's `{weights_dir}/{folder}`), so does a path that does not exist and ends in a registry
    folder name, so that `weights_dir` is optional; anything else is returned as it is (a path)."""
    if is_name(value) and not os.path.exists(value):
        return fetch(value)
    if grid_folder and value and not os.path.exists(value):
        name = name_for(os.path.basename(os.path.normpath(value)))
        if name is not None:
            print(f"{value} does not exist: using the official weights {name} (fetched once into the cache)",
                  file=sys.stderr, flush=True)
            return fetch(name)
    return value
