"""The official checkpoints medjax knows by name, declared beside each family (`medjax/models/<family>/sources.py`,
a module-level `SOURCES` list) and collected here through `medjax.models.PACKAGES`.

A `Source` says where the upstream project publishes the file(s) (a URL, or a Hugging Face repo + file + revision,
which resolves to `https://huggingface.co/{repo}/resolve/{revision}/{file}`), which converter variant reads them, the
licence, an approximate size, and the digest where the publisher gives one: torchvision's and torch.hub's file-name
hash (`resnet50-0676ba61.pth`: the first 8 hex digits of the file's SHA-256, as `torch.hub.check_hash` checks it) or a
full SHA-256. Where nothing is published, `sha256` stays None: the download is then recorded with its SHA-256 but not
checked against one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util

from medjax import models
from medjax.errors import UserError

HF_URL = "https://huggingface.co/{repo}/resolve/{revision}/{file}"
MB = 1024 * 1024


class UnknownWeightsError(UserError):
    """A name that no family declares."""


@dataclasses.dataclass(frozen=True)
class File:
    """One file of a source, at its official URL."""

    url: str
    size: int  # approximate download size in bytes (the server's Content-Length is what the download checks)
    sha256: str | None = None  # published digest: the full SHA-256, or its leading hex digits (torch.hub file names)
    role: str = "checkpoint"  # "checkpoint" (what the converter reads) | "linear_head" (DINOv2's hub classifier)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Source:
    """One official checkpoint, by its upstream name."""

    name: str  # upstream's own name: torch.hub entry point, torchvision builder, open_clip / hub id
    model: str  # the converter variant (`python -m converters ... --model MODEL`)
    files: tuple[File, ...]
    licence: str
    revision: str | None = None  # a Hugging Face revision (None for plain URLs)
    note: str = ""  # what the name means upstream, where it is not obvious
    config: dict | None = None  # constructor kwargs when `model` is a family name rather than a variant

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def checkpoint(self) -> File:
        return next(f for f in self.files if f.role == "checkpoint")

    @property
    def host(self) -> str:
        url = self.checkpoint.url
        return "huggingface.co" if url.startswith("https://huggingface.co/") else url.split("/")[2]


def url(address: str, mb: float, sha256: str | None = None, role: str = "checkpoint") -> File:
    """A file at a plain URL; `mb`: its approximate size in MiB."""
    return File(address, int(mb * MB), sha256, role)


def hf(repo: str, file: str, mb: float, revision: str = "main", sha256: str | None = None) -> File:
    """A file of a Hugging Face repo at `revision`."""
    return File(HF_URL.format(repo=repo, revision=revision, file=file), int(mb * MB), sha256)


def url_source(name: str, model: str, address: str, mb: float, licence: str, note: str = "",
               sha256: str | None = None) -> Source:
    """A one-file source at a plain URL."""
    return Source(name, model, (url(address, mb, sha256),), licence, note=note)


def hf_source(name: str, model: str, repo: str, file: str, mb: float, licence: str, note: str = "") -> Source:
    """A one-file source in a Hugging Face repo (its `main` revision)."""
    return Source(name, model, (hf(repo, file, mb),), licence, note=note)


def torch_hub_digest(filename: str) -> str | None:
    """The hash prefix torch.hub reads off a `name-<hex>.pth` file name (its `check_hash`), or None."""
    stem = filename.rsplit(".", 1)[0]
    tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    return tail if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail) else None


TORCHVISION_URL = "https://download.pytorch.org/models"


def torchvision(name: str, filename: str, mb: float) -> Source:
    """A torchvision ImageNet model (`*_Weights.IMAGENET1K_V1`): its file on download.pytorch.org, the start of whose
    SHA-256 its name carries (torch.hub `check_hash`), converted with the variant of the same name."""
    address = f"{TORCHVISION_URL}/{filename}"
    return url_source(name, name, address, mb, "BSD-3-Clause", f"torchvision {name}, IMAGENET1K_V1",
                      torch_hub_digest(address))


def _collect() -> dict[str, Source]:
    out: dict[str, Source] = {}
    for pkg in models.PACKAGES:
        name = f"medjax.models.{pkg}.sources"
        if importlib.util.find_spec(name) is None:
            continue
        for source in importlib.import_module(name).SOURCES:
            if source.name in out:
                raise ValueError(f"weights name {source.name!r} is declared twice ({pkg} and another family)")
            out[source.name] = source
    return out


_SOURCES: dict[str, Source] | None = None
_EXTRA: dict[str, Source] = {}  # registered at run time (tests, a user's own mirror of private weights)


def sources() -> dict[str, Source]:
    """Every known name -> its Source, in the families' order."""
    global _SOURCES
    if _SOURCES is None:
        _SOURCES = _collect()
    return {**_SOURCES, **_EXTRA}


def register(source: Source) -> None:
    """Add a source at run time (e.g. a test fixture served by a local server)."""
    _EXTRA[source.name] = source


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)


def get(name: str) -> Source:
    known = sources()
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownWeightsError(f"unknown weights name {name!r}{hint} (`python -m converters list` shows every "
                                  "name)")
    return known[name]


def is_name(value: str) -> bool:
    """Whether a `model.pretrained` value is a registry name (not a path)."""
    return bool(value) and "/" not in value and value in sources()


def name_for(folder: str) -> str | None:
    """The registry name behind a converted-folder / converter-variant name (`mae_vit_base_patch16` ->
    `mae_pretrain_vit_base`): the name itself when registered, else the one-file source converting with that
    variant."""
    known = sources()
    if folder in known:
        return folder
    match = [s.name for s in known.values() if s.model == folder and len(s.files) == 1]
    return match[0] if len(match) == 1 else None
