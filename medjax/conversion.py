"""The conversion engine: safe checkpoint reading and declarative key tables.

A key table is a list of `Rule`s. Each maps a source key template (`blocks.{i}.attn.qkv.weight`) to a Flax parameter
path template (`blocks_{i}/attn/qkv/kernel`) with a transform. Templates work both ways, so a missing parameter is
reported under the checkpoint key that should have supplied it. Every problem (missing, unexpected, mis-shaped) is
collected and raised together in one `ConversionError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from typing import Callable

import numpy as np

from medjax.errors import UserError
from medjax.tree import file_sha256 as sha256  # noqa: F401 (the converters' name for it)


class CheckpointError(UserError):
    """A checkpoint file cannot be read, or is not what the user said it is."""


class ConversionError(CheckpointError):
    """The checkpoint's keys or shapes do not fit the model; lists every offending key."""

    def __init__(self, source: str, model: str, missing=(), unexpected=(), mismatched=(), notes=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"checkpoint {source} does not fit model {model}:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}):")
            lines += [f"    {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}):")
            lines += [f"    {k}" for k in self.unexpected]
        if self.mismatched:
            lines.append(f"  shape mismatches ({len(self.mismatched)}):")
            lines += [f"    {k}" for k in self.mismatched]
        lines += [f"  {n}" for n in notes]
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------- reading files

def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


def _first_reason(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reasons = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "Can only" in line]
    return (reasons or lines or ["(no message)"])[0]


class PlainData(dict):
    """An object of a class medjax does not import (the study's EasyDict, argparse.Namespace, a yacs CfgNode, ...),
    read as plain data: its dict items and its attributes. Nothing of the original class runs; a pickle that would
    call it with arguments (a function call, not data) is refused."""

    qualname = "?"
    accepts_args = False

    def __new__(cls, *args, **kwargs):
        if (args or kwargs) and not cls.accepts_args:
            raise pickle.UnpicklingError(f"{cls.qualname} is called with arguments (code, not data)")
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


def plain(obj):
    """`obj` with every PlainData turned into a dict (its items and attributes), recursively."""
    if isinstance(obj, PlainData):
        return {**{k: plain(v) for k, v in vars(obj).items()}, **{k: plain(v) for k, v in obj.items()}}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


# Modules whose objects are code, never data: a pickle naming them is refused.
_CODE_MODULES = {"builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "importlib", "runpy", "pickle",
                 "_pickle", "copyreg", "types", "functools", "operator", "socket", "shutil", "io", "codecs", "ctypes",
                 "pty", "code", "inspect", "marshal", "webbrowser", "multiprocessing", "threading", "asyncio", "torch",
                 "numpy", "collections", "typing", "abc", "weakref", "gc", "signal", "tempfile", "pathlib", "glob"}


def _data_like(full: str) -> bool:
    """A class name read as plain data: `package.module.CapWords`, outside the modules that hold code."""
    module, _, name = full.rpartition(".")
    return (bool(module) and name[:1].isupper() and module.split(".")[0] not in _CODE_MODULES
            and all(p.isidentifier() for p in full.split(".")))


def _restricted_pickle(permissive: bool = False):
    """A pickle module for `torch.load(..., weights_only=False, pickle_module=...)` whose Unpickler resolves only
    what torch's weights-only loader allows, plus PlainData stand-ins for data-only classes (`_data_like`); any other
    name is refused. Unlike torch's loader it can fill a dict subclass (the study's EasyDict). `permissive`: every
    unknown name becomes a stand-in (used only to find where the weights are for an error message)."""
    import types

    import torch

    try:
        allowed = dict(torch._weights_only_unpickler._get_allowed_globals())
    except AttributeError:
        allowed = {}
    stand_ins: dict[str, type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            full = f"{module}.{name}"
            if full in allowed:
                return allowed[full]
            if _data_like(full) or permissive:
                if full not in stand_ins:
                    stand_ins[full] = type(name, (PlainData,), {"qualname": full, "__module__": __name__,
                                                                "accepts_args": permissive})
                return stand_ins[full]
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {full} (code, which medjax never runs)")

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="medjax_restricted_pickle", Unpickler=Unpickler, load=load,
                                 UnpicklingError=pickle.UnpicklingError)


def _tensor_dict_keys(obj) -> list[tuple[str, int]]:
    """(key, number of tensors) of the entries of a checkpoint's top-level mapping that are mappings of tensors."""
    import torch

    if not isinstance(obj, dict):
        return []
    out = []
    for k, v in obj.items():
        if isinstance(v, dict):
            n = sum(isinstance(x, torch.Tensor) for x in v.values())
            if n:
                out.append((str(k), n))
    return sorted(out, key=lambda kv: -kv[1])


_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"{": "a JSON file", b"DICM": "a DICOM file",
          b"%PDF": "a PDF", b"\x1f\x8b": "a gzip archive"}


def _check_torch_file(path: str) -> None:
    """What the file format itself can verify before unpickling: a torch zip's members against their CRC-32, or a
    legacy pickle's protocol byte; anything else is named for what it looks like."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(132)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupt?): {e}") from e
        if bad is not None:
            raise CheckpointError(f"{path}: damaged PyTorch checkpoint: member {bad} fails its CRC-32 check; "
                                  "download it again")
        return
    if head[:1] == b"\x80":  # a legacy (pre-1.6) pickle checkpoint: protocol 2+
        return
    kind = next((what for magic, what in _MAGIC.items() if head.startswith(magic)), None)
    if kind is None and head[128:132] == b"DICM":
        kind = "a DICOM file"
    if kind is None and head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        kind = "a text file (CSV?)"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint" + (f"; it looks like {kind}" if kind else
                          " (neither a torch zip file nor a pickle)") + "; give the .pth/.pt/.bin or .safetensors "
                          "weights file")


def _read_torch(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading PyTorch checkpoints needs torch; install medjax[torch]") from e
    _check_torch_file(path)

    try:
        # Training checkpoints carry their run's settings beside the weights (MAE's and DeiT's argparse.Namespace,
        # the study's EasyDict): such classes are read as plain data (PlainData stand-ins, never imported). A pickle
        # that calls code is still refused.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle())
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file is not a plain tensor checkpoint (it needs code execution to "
            f"unpickle, which medjax never allows). {_resave_hint(path)} torch said: {_first_reason(e)}") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (truncated or corrupt?): {e}") from e
    return obj


def _resave_hint(path: str) -> str:
    """Where the weights are in a refused file (found by a load in which every unknown name is an inert stand-in),
    and how to re-save them."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle(True))
        keys = _tensor_dict_keys(obj)
    except Exception:  # noqa: BLE001 (only a hint: any failure means no hint)
        keys = []
    if not keys:
        return ("If it is a checkpoint from a source you trust, re-save its state dict alone (torch.save(state_dict, "
                "'weights.pth')) and convert that.")
    key = keys[0][0]
    return (f"Its weights are under {key!r} ({keys[0][1]} tensors): if the file comes from a source you trust, "
            f"re-save that entry alone (torch.save(torch.load(f, weights_only=False)[{key!r}], 'weights.pth')) and "
            "convert that.")


def _read_safetensors(path: str) -> dict:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(path, framework="np") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (TypeError, ValueError):  # bfloat16 has no numpy dtype: go through torch
        with safe_open(path, framework="pt") as f:
            out = {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return out


def _flatten_tensors(obj, path: str) -> dict[str, np.ndarray]:
    import torch

    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                              f"{type(obj).__name__}")
    out, bad = {}, []
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = _to_numpy(v)
        elif isinstance(v, np.ndarray):
            out[k] = v
        else:
            bad.append(f"{k} ({type(v).__name__})")
    if bad:
        keys = _tensor_dict_keys(obj)
        hint = (f"; its weights look to be under {keys[0][0]!r} ({keys[0][1]} tensors): save that entry alone "
                f"(torch.save(torch.load(f, weights_only=True)[{keys[0][0]!r}], 'weights.pth')) and convert that"
                if keys else "")
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {', '.join(bad[:10])}{hint}")
    return out


def resolve_checkpoint(path: str) -> list[str]:
    """The weight files behind `path`: the file itself, or a Hugging Face folder's (possibly sharded) safetensors."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    for name in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                 "open_clip_pytorch_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise CheckpointError(f"{path}: a folder without model.safetensors, its index, or pytorch_model.bin")


def _holds_tensor(obj, depth: int = 0) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if depth > 4:
        return False
    if isinstance(obj, dict):
        return any(_holds_tensor(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v, depth + 1) for v in obj)
    return False


def read_state_dict(path: str, ema: bool = False, extras: dict | None = None) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as numpy arrays. `.safetensors` is read directly; anything else goes through
    `torch.load(weights_only=True)` (or the restricted loader, `_restricted_pickle`). A top-level `{'model': ...}` or
    `{'state_dict': ...}` wrapper is unwrapped; with `ema`, the `{'model_ema': ...}` entry is taken instead (and its
    absence is an error). `extras`, when given, receives the wrapper's entries that hold no tensor (a training
    checkpoint's settings, as plain data)."""
    wrapper_keys = ("model_ema",) if ema else ("model", "state_dict")
    state = {}
    for f in resolve_checkpoint(path):
        if f.endswith(".safetensors"):
            if ema:
                raise CheckpointError(f"{f}: --ema needs a checkpoint with a 'model_ema' entry; safetensors files "
                                      "hold a single set of weights")
            state.update(_read_safetensors(f))
            continue
        obj = _read_torch(f)
        if isinstance(obj, dict):
            for w in wrapper_keys:
                if w in obj and isinstance(obj[w], dict):
                    if extras is not None:
                        extras.update({str(k): plain(v) for k, v in obj.items() if k != w and not _holds_tensor(v)})
                    obj = obj[w]
                    break
            else:
                if ema:
                    raise CheckpointError(f"{f}: --ema asked for the EMA weights, but the checkpoint has no "
                                          f"'model_ema' entry (top-level keys: {sorted(obj)[:10]})")
        state.update(_flatten_tensors(obj, f))
    if not state:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return state


# ----------------------------------------------------------------------------------------------- configs

DESCRIPTIVE_KEYS = {"family", "format", "upstream", "fixture"}  # present in config files, never architecture
# Constructor arguments that do not change the inference network (training-only settings, Python objects).
INERT_KEYS = {"drop_path_rate", "drop_path_uniform", "drop_rate", "pos_drop_rate", "patch_drop_rate",
              "proj_drop_rate", "attn_drop_rate", "block_fn", "embed_layer", "act_layer", "weight_init", "num_classes",
              "global_pool", "norm_layer", "block_chunks", "fix_init", "mlp_layer", "output_tokens",
              "use_checkpoint"}


def transformers_vision_config(cfg: dict, family: str, vision_type: str, composite_types=()) -> dict:
    """The vision part of a transformers config.json: the config itself when its model_type is `vision_type`, or the
    `vision_config` of a composite model (`composite_types`, e.g. CLIPConfig's `clip`); any other model_type is a
    CheckpointError naming the ones a `family` checkpoint needs."""
    model_type = cfg.get("model_type")
    if model_type in composite_types:
        if not isinstance(cfg.get("vision_config"), dict):
            raise CheckpointError(f"transformers {model_type} config has no `vision_config`")
        return cfg["vision_config"]
    if model_type != vision_type:
        needed = ", ".join(repr(t) for t in (vision_type, *composite_types))
        raise CheckpointError(f"transformers config has model_type {model_type!r}; a {family} checkpoint needs one "
                              f"of {needed}")
    return cfg


def check_keys(kwargs: dict, known: set, what: str):
    """Refuse constructor arguments medjax does not know, naming them (a typo must not be silently dropped)."""
    unknown = sorted(set(kwargs) - set(known) - INERT_KEYS - DESCRIPTIVE_KEYS)
    if unknown:
        raise CheckpointError(f"{what}: unsupported constructor arguments {unknown}; supported: {sorted(known)}")


def pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------------------------- key tables

def linear(a):  # torch Linear weight (out, in) -> Flax Dense kernel (in, out)
    return a.T


def conv(a):  # torch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)
    return a.transpose(2, 3, 1, 0)


def copy(a):
    return a


def reshape(a):  # marker: reshape to the model's shape (same number of elements), e.g. CLIP's (D,) class embedding
    return a


def norm_rules(src: str, dst: str, bias: bool = True) -> list["Rule"]:
    """A LayerNorm / RMSNorm / BatchNorm affine: weight -> scale, bias -> bias."""
    return [Rule(f"{src}.weight", f"{dst}/scale")] + ([Rule(f"{src}.bias", f"{dst}/bias")] if bias else [])


def dense_rules(src: str, dst: str, part=None, transform=None, bias: bool = True) -> list["Rule"]:
    """nn.Linear -> Dense (kernel transposed); `part` concatenates pieces (q, k, v -> qkv)."""
    return [Rule(f"{src}.weight", f"{dst}/kernel", transform or linear, part)] + \
        ([Rule(f"{src}.bias", f"{dst}/bias", part=part)] if bias else [])


def conv_rules(src: str, dst: str, bias: bool = True) -> list["Rule"]:
    """nn.Conv2d -> Conv (OIHW -> HWIO)."""
    return [Rule(f"{src}.weight", f"{dst}/kernel", conv)] + ([Rule(f"{src}.bias", f"{dst}/bias")] if bias else [])


def renamed(rules: list["Rule"], prefixes: dict[str, str]) -> list["Rule"]:
    """The same key table for another naming of the same checkpoint: each rule's source key has its first matching
    prefix (in the order of `prefixes`) replaced; targets, transforms, parts and the rules' order stay."""
    out = []
    for rule in rules:
        old = next((p for p in prefixes if rule.source.startswith(p)), None)
        out.append(rule if old is None else dataclasses.replace(rule, source=prefixes[old] + rule.source[len(old):]))
    return out


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # checkpoint key template, `{i}` for an integer index
    target: str  # Flax path template, `/`-separated
    transform: Callable = copy
    part: tuple[int, int] | None = None  # (index, count): pieces concatenated on the last axis (q, k, v -> qkv)
    split: tuple[int, int] | None = None  # (index, count): this chunk of the source's first axis (qkv -> q, k, v)

    def source_regex(self) -> re.Pattern:
        pattern = re.escape(self.source).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
        return re.compile(pattern)

    def target_regex(self) -> re.Pattern:
        pattern = re.escape(self.target).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
        return re.compile(pattern)


def apply_rules(state: dict[str, np.ndarray], rules: list[Rule], ignore: list[str], expected: dict[str, tuple],
                source: str, model: str, hooks: dict[str, Callable] | None = None, notes=()) -> dict:
    """Map a flat checkpoint `state` onto the flat `expected` {flax path: shape} with `rules`.

    Keys fully matching an `ignore` regex are dropped (the documented ignorable keys). `hooks` maps a Flax path to a
    function (array, expected shape) -> array run before the shape check (e.g. a load-time pos-embed resize).
    Flax paths of collections other than `params` are written `collection:path` (`batch_stats:bn1/mean`).
    Returns the variables ({'params': ..., other collections}); raises ConversionError listing every problem.
    """
    compiled = [(r, r.source_regex()) for r in rules]
    ignore_re = [re.compile(p) for p in ignore]
    flat, parts, unexpected, mismatched = {}, {}, [], []
    for key in sorted(state):
        if any(p.fullmatch(key) for p in ignore_re):
            continue
        matches = [(rule, m) for rule, rx in compiled if (m := rx.fullmatch(key))]
        if not matches:
            unexpected.append(f"{key} {tuple(state[key].shape)}")
            continue
        # a split source feeds every split rule it matches; otherwise the first matching rule wins
        for rule, m in (matches if matches[0][0].split else matches[:1]):
            target = rule.target.format(**m.groupdict())
            value = state[key]
            if rule.split:
                index, count = rule.split
                if value.shape[0] % count:
                    mismatched.append(f"{key}: {tuple(value.shape)} does not split into {count} equal parts")
                    break
                value = np.split(value, count)[index]
            value = rule.transform(value)
            if rule.transform is reshape and target in expected and value.size == np.prod(expected[target]):
                value = value.reshape(expected[target])
            if rule.part is None:
                flat[target] = (key, value)
            else:
                parts.setdefault(target, {})[rule.part[0]] = (key, value, rule.part[1])
    for target, pieces in parts.items():
        count = next(iter(pieces.values()))[2]
        if len(pieces) == count:
            ordered = [pieces[i] for i in range(count)]
            flat[target] = ("+".join(k for k, _, _ in ordered), np.concatenate([v for _, v, _ in ordered], axis=-1))
    for target, fn in (hooks or {}).items():
        if target in flat and target in expected:
            key, value = flat[target]
            flat[target] = (key, fn(value, expected[target]))
    # an empty tensor for a parameter the model lacks holds nothing (transformers' register_tokens of a model
    # without registers: shape (1, 0, D))
    flat = {t: kv for t, kv in flat.items() if t in expected or np.size(kv[1])}
    for target, (key, value) in flat.items():
        if target in expected and tuple(value.shape) != tuple(expected[target]):
            mismatched.append(f"{key}: checkpoint gives {tuple(value.shape)} for {target}, the model expects "
                              f"{tuple(expected[target])}")
        elif target not in expected:
            unexpected.append(f"{key} (maps to {target}, which this model configuration does not have)")
    missing = [_source_name(t, rules, parts) for t in sorted(expected) if t not in flat]
    if missing or unexpected or mismatched:
        raise ConversionError(source, model, missing, unexpected, mismatched, notes)
    from medjax.pretrained import unflatten_variables

    return unflatten_variables({t: np.asarray(v, dtype=np.float32) for t, (_, v) in flat.items()})


def _source_name(target: str, rules: list[Rule], parts: dict) -> str:
    """The checkpoint key(s) that should have produced the Flax parameter `target`."""
    for rule in rules:
        m = rule.target_regex().fullmatch(target)
        if m:
            names = [r.source.format(**m.groupdict()) for r in rules
                     if r.target == rule.target and (r.part is None or r.part[0] not in parts.get(target, {}))]
            return f"{' + '.join(names)} (for {target})"
    return f"(no checkpoint key maps to {target})"


# ----------------------------------------------------------------------------------------------- formats, families

class Format:
    """One on-disk layout: how to recognise it, how to rename keys, what may be ignored."""

    def __init__(self, name, family, rules, signature, ignore=(), strip_prefixes=(), select_prefix=None,
                 key_fixes=(), hf=False, hooks=None):
        """signature: regex a key of this format matches (after normalising); ignore: regexes of documented
        ignorable keys; select_prefix: only keys under it are used (the rest of a bigger model is skipped);
        key_fixes: (regex, replacement) applied to keys first; hf: a transformers file (config.json beside it);
        hooks: {flax path: fn(array, expected shape) -> array} run before the shape check."""
        self.name, self.family, self.rules, self.signature = name, family, rules, signature
        self.ignore, self.strip_prefixes, self.select_prefix = list(ignore), strip_prefixes, select_prefix
        self.key_fixes, self.hf, self.hooks = key_fixes, hf, dict(hooks or {})

    def matches(self, keys) -> bool:
        return any(re.fullmatch(self.signature, self.normalise(k) or "") for k in keys)

    def normalise(self, key: str) -> str | None:
        """The key as the table names it; None for keys outside the selected prefix (e.g. CLIP's text tower)."""
        if key.startswith("module."):  # saved from DistributedDataParallel
            key = key[len("module."):]
        if self.select_prefix is not None:
            if not key.startswith(self.select_prefix):
                return None
            key = key[len(self.select_prefix):]
        for p in self.strip_prefixes:
            if key.startswith(p):
                key = key[len(p):]
                break
        for pattern, repl in self.key_fixes:
            key = re.sub(pattern, repl, key)
        return key


@dataclasses.dataclass(frozen=True)
class Converter:
    """A backbone family as the converter sees it: its on-disk formats and how to read its configs."""

    name: str
    formats: list  # [Format], tried in order
    parse_config: Callable  # upstream kwargs / open_clip config / transformers config.json -> medjax config
    ignored: str  # the documented ignorable keys, quoted in errors
    adjust: Callable | None = None  # (config, fmt, kwargs, options) -> config, e.g. DINOv2's resize choice
    # (config, head_file) -> (config, head_state, head_rules, provenance): a classifier head file the family knows
    # (DINOv2's hub `*_linear[4]_head.pth`), attached with `--linear-head`
    attach_linear_head: Callable | None = None
    # (config, weight, bias) -> (config, head_state, head_rules): a fine-tuned classifier stored in the file itself
    # (transformers' `*ForImageClassification` `classifier.*`), kept as the family's head
    attach_classifier_head: Callable | None = None
