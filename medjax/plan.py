"""python -m medjax.plan --config=RECIPE --topology=v5e:2x4 [--backbone=VARIANT] [--mfu=0.4] [--config.x=y ...]

Compiles, ahead of time and from shapes only, the exact train step (and eval step) that `python -m medjax.main`
would run for the config (the same `medjax.engine.build`: model, rules, optimizer, sharding, remat / scan, dtype)
for a TPU slice named as libtpu names its topologies (`v4:2x2x1`, `v5e:2x4`, `v5p:2x2x1`, `v6e:2x4`, ...), and
prints what one chip holds, whether it fits the chip's HBM, the FLOPs of one step and the step time at a stated MFU.
No weights are read (a converted folder's medjax.json gives the architecture; `--backbone` takes a converter variant
name instead) and nothing is allocated. When the step does not fit, the plan compiles again to find the largest
global batch that fits and which of `mesh.fsdp`, `model.remat` (+ `model.scan`) and `compute_dtype=bfloat16` make
the asked batch fit (and, when none does, the largest batch that fits with all of them). The last line of the output
is one JSON object.

TPU topologies need libtpu (`pip install -e ".[tpu]"`); its start-up lines are kept out of the output. GPU targets
(`--topology=h100:8`, `a100:8`, `gpu:8` = H100) have no ahead-of-time compiler without the GPU: their table comes
from the CPU compiler over as many emulated CPU devices, labelled as such (an estimate of the sharded footprint;
GPU kernels and fusion differ).

Bad input ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.experimental import topologies
from ml_collections import config_flags

from medjax import classifier, cli, engine, models, pretrained, rules, schema, sharding
from medjax.errors import UserError, atomic_write

GiB = 2 ** 30


class PlanError(UserError):
    """A topology, backbone or dataset the plan cannot build or compile."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per chip


# SPEC section 11 (Google Cloud's published figures); GPUs: NVIDIA's dense bf16 (H100 SXM 989, A100 312 TFLOP/s).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12),
    "h100": Chip("NVIDIA H100 80GB", 80 * 10 ** 9, 989e12),
    "a100": Chip("NVIDIA A100 80GB", 80 * 10 ** 9, 312e12),
}
GPU_ALIASES = {"gpu": "h100", "h100": "h100", "a100": "a100"}
# TPU generations whose two TensorCores per chip run as one device ("megacore", as jax on a v4 / v5p VM shows one
# device per chip). libtpu's default description of a v4 topology has a device per TensorCore, each with half the HBM.
MEGACORE = ("v4", "v5p")

# (task, classes, channels) of the readers in medjax.data (their Dataset(...) calls); `csv` / `folder` datasets need
# --classes / --channels / --task.
DATASETS = {
    "aptos2019": ("multiclass", 5, 3), "chexpert": ("multilabel", 14, 1), "ddsm": ("multiclass", 2, 1),
    "cbis_ddsm": ("multiclass", 2, 1), "isic2019": ("multiclass", 8, 3), "isic2018": ("multiclass", 7, 3),
    "ham10000": ("multiclass", 7, 3), "ichallenge_amd": ("multiclass", 2, 3),
    "chest_xray_pneumonia": ("multiclass", 2, 1), "nih_chestxray14": ("multilabel", 15, 1),
    "brain_tumor_figshare": ("multiclass", 3, 1),
}


@dataclasses.dataclass
class Target:
    topology: str  # as given
    kind: str  # "tpu" | "gpu (emulated on CPU)"
    chip: Chip
    devices: list


def parse_gpu(topology: str):
    """'h100:8' -> ('h100', 8); None when it is not a GPU name."""
    m = re.fullmatch(r"(gpu|h100|a100):(\d+)", topology.strip().lower())
    return (GPU_ALIASES[m.group(1)], int(m.group(2))) if m else None


def tpu_generation(topology: str) -> str:
    generation = topology.split(":", 1)[0].lower().replace("v5litepod", "v5e").replace("v5lite", "v5e")
    if generation not in CHIPS or generation in ("h100", "a100"):
        raise PlanError(f"--topology={topology!r}: expected a TPU topology GEN:SHAPE with GEN one of v4, v5e, v5p, "
                        "v6e (e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1) or a GPU target h100:N / a100:N / gpu:N")
    return generation


@contextlib.contextmanager
def quiet_stderr():
    """libtpu writes its start-up lines to file descriptor 2 from C++: send fd 2 to a file while the TPU client and
    compiler run; what was written there is kept (`.text`) to show only if the plan fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    log = tempfile.TemporaryFile(mode="w+b")
    os.dup2(log.fileno(), 2)
    holder = type("Captured", (), {"text": ""})()
    try:
        yield holder
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        log.seek(0)
        holder.text = log.read().decode(errors="replace")
        log.close()


def target(topology: str) -> Target:
    """The devices to compile for: a TPU topology's (libtpu, no TPU attached) or emulated CPU devices for a GPU."""
    gpu = parse_gpu(topology)
    if gpu:
        name, n = gpu
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise PlanError(f"--topology={topology}: the GPU plan compiles for {n} emulated CPU devices, this process "
                            f"has {len(devices)}; run `python -m medjax.plan` afresh (it sets XLA_FLAGS="
                            f"--xla_force_host_platform_device_count={n}) or set that flag yourself")
        return Target(topology, "gpu (emulated on CPU)", CHIPS[name], devices[:n])
    generation = tpu_generation(topology)
    # libtpu takes /tmp/libtpu_lockfile for the chips of this host; there are none to share here, so several plans
    # (or a plan beside a test) may run at once. Read when jax first starts its backends.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(topology, "tpu", **(
            {"chip_config_name": "megacore"} if generation in MEGACORE else {}))
    except Exception as e:  # noqa: BLE001 - libtpu missing, or a shape libtpu refuses: one line either way
        text = " ".join(str(e).split())
        if "lockfile" in text:
            raise PlanError(f"--topology={topology}: another process holds libtpu's lockfile ({text[:200]}); start the "
                            "plan in a fresh process, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 before jax starts") from None
        if "not installed" in text or "libtpu" in text.lower():
            raise PlanError(f"--topology={topology}: TPU topologies need libtpu: pip install -e \".[tpu]\" (or pip "
                            "install --target DIR \"libtpu==0.0.42.*\" and put DIR on PYTHONPATH)") from None
        raise PlanError(f"--topology={topology}: libtpu does not accept it ({text[:300]})") from None
    return Target(topology, "tpu", CHIPS[generation], list(desc.devices))


def resolve_backbone(config, variant: str):
    """`--backbone=VARIANT`: the converter variant's architecture in place of the recipe's model.pretrained, as if
    the official checkpoint had been converted (adjustments that depend on the file itself, such as DINOv2's resize
    style or a transformers pooler, take the variant's defaults)."""
    if variant not in models.VARIANTS:
        raise PlanError(f"--backbone={variant!r} is not a converter variant; known: "
                        f"{', '.join(sorted(models.VARIANTS))}")
    family, kwargs = models.VARIANTS[variant]
    arch = models.FAMILIES[family].converter.parse_config(dict(kwargs))
    with config.unlocked():
        config.model.family = family
        config.model.pretrained = ""
        config.model.architecture = arch.to_dict()
        config.model.convert_from.checkpoint = ""
    return config


def dataset_shape(config, classes=None, channels=None, task=None):
    known = DATASETS.get(config.dataset)
    if known is None and not (classes and channels and task):
        raise PlanError(f"dataset {config.dataset!r}: the plan knows the classes and channels of "
                        f"{', '.join(sorted(DATASETS))}; for another give --classes, --channels and --task")
    t, k, c = known or (task, classes, channels)
    return task or t, classes or k, channels or c


@dataclasses.dataclass
class Compiled:
    """Bytes per chip from XLA's memory analysis, FLOPs of the whole step (every chip), compile seconds."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    code: int
    flops: float
    seconds: float
    out_of_memory: str = ""  # the compiler's RESOURCE_EXHAUSTED message when it refused: the step does not fit
    needed: int = 0  # the bytes that message names (0: none named)

    @property
    def peak(self) -> int:
        """What one chip holds while the step runs: arguments + outputs + temporaries + code, less the outputs that
        reuse donated argument buffers (aliased). A step the compiler refused: the bytes it said it needed (at least
        one byte more than the chip has)."""
        if self.out_of_memory:
            return self.needed
        return self.arguments + self.outputs + self.temporaries + self.code - self.aliased


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _needed_bytes(message: str, limit: int) -> int:
    """The largest byte figure an XLA out-of-memory message names ('... (849.07G) exceeds available HBM (15.75G)'),
    at least limit + 1."""
    sizes = [float(n) * _UNITS[u] for n, u in re.findall(r"([0-9]+(?:\.[0-9]+)?)\s?([KMGT]?)i?B?\b", message)
             if u]
    return int(max(sizes + [limit + 1]))


def abstract_batch(mesh, batch_size: int, image_size: int, channels: int, task: str, num_classes: int,
                   train: bool = True) -> dict:
    """The trainer's global batch as shapes with its sharding (medjax.data.pipeline's batch, sharding.global_batch):
    float32 NHWC images, int32 labels (multi-class) or float32 multi-hot (multi-label), bool mask."""
    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

    images = spec((batch_size, image_size, image_size, channels), jnp.float32)
    if not train:
        return {"image": images}
    label = spec((batch_size,), jnp.int32) if task == "multiclass" else spec((batch_size, num_classes), jnp.float32)
    return {"image": images, "label": label, "mask": spec((batch_size,), jnp.bool_)}


def lower_steps(e, config, batch_size: int, channels: int, task: str, num_classes: int, eval_step: bool = True):
    """(train step, eval step or None) of an engine, lowered for the trainer's batch of `batch_size`."""
    train = e.train_step.lower(e.state, abstract_batch(e.mesh, batch_size, config.image_size, channels, task,
                                                       num_classes))
    if not eval_step:
        return train, None
    images = abstract_batch(e.mesh, batch_size, config.image_size, channels, task, num_classes, train=False)
    return train, e.eval_step.lower(e.variables_of(e.state), images["image"])


def build_engine(config, devices, *, num_classes: int, channels: int, task: str, total_steps: int = 1000):
    """The trainer's engine (medjax.engine.build) over a mesh of `devices`, abstract: shapes only."""

    try:
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    except ValueError as e:
        raise PlanError(f"mesh: {e}") from None
    return engine.build(config, num_classes=num_classes, channels=channels, task=task, total_steps=total_steps,
                        warmup_steps=0, mesh=mesh, abstract=True)


def _compile(lowered, chips: int, limit: int, argument_bytes: int = 0) -> Compiled:
    """Compiles; a RESOURCE_EXHAUSTED refusal becomes a Compiled with `out_of_memory`, `arguments` as the shards of
    the arguments take (`argument_bytes`) and `needed` = the figure the message names, plus the arguments when that
    figure is the temporaries' alone."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = " ".join(str(e).split())
        needed = _needed_bytes(message, limit)
        if "temporaries" in message and needed > limit:
            needed += argument_bytes
        return Compiled(argument_bytes, 0, 0, 0, 0, 0.0, time.perf_counter() - start, out_of_memory=message[:500],
                        needed=needed)
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.temp_size_in_bytes),
                    int(mem.alias_size_in_bytes), int(mem.generated_code_size_in_bytes),
                    float(cost.get("flops", 0.0)) * chips, seconds)


def compile_config(config, tgt: Target, shape, eval_step: bool = True):
    """(train Compiled, eval Compiled or None) of the config on the target's devices."""
    task, num_classes, channels = shape
    if config.batch_size % len(tgt.devices):
        raise PlanError(f"batch_size {config.batch_size} is not divisible by the {len(tgt.devices)} chips of "
                        f"{tgt.topology}")
    e = build_engine(config, tgt.devices, num_classes=num_classes, channels=channels, task=task)
    train, ev = lower_steps(e, config, config.batch_size, channels, task, num_classes, eval_step)
    n, limit = len(tgt.devices), tgt.chip.hbm_bytes
    state = shard_bytes(e.state) + sum(_batch_bytes(config, shape, n).values())
    variables = shard_bytes(e.variables_of(e.state)) + _batch_bytes(config, shape, n)["image"]
    return _compile(train, n, limit, state), (_compile(ev, n, limit, variables) if ev is not None else None)


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded jax.ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        size = 1
        for d in shape:
            size *= int(d)
        total += size * jnp.dtype(leaf.dtype).itemsize
    return total


def _variant(config, **overrides):
    c = config.copy_and_resolve_references()
    with c.unlocked():
        for dotted, value in overrides.items():
            node = c
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return c


def largest_batch(config, tgt: Target, shape, limit: int) -> tuple[int, int]:
    """(largest global batch <= config.batch_size that fits, compiles spent): bisection over multiples of the chip
    count, each tried by compiling the train step."""
    chips = len(tgt.devices)
    lo, hi, tries = 0, config.batch_size // chips, 0  # in images per chip; hi does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tries += 1
        if compile_config(_variant(config, batch_size=mid * chips), tgt, shape, eval_step=False)[0].peak <= limit:
            lo = mid
        else:
            hi = mid
    return lo * chips, tries


def _execution_change(config) -> dict | None:
    """The remat change a family offers (with scan where it offers that too), or None (no such option, or asked)."""
    try:
        family = models.family(_backbone_family(config))
    except Exception:  # noqa: BLE001 - an unknown family is reported by the build itself
        return None
    if family.execution is None:
        return None
    change = {"model.remat": True} | ({"model.scan": True} if family.scan else {})
    return None if all(config.model[k.split(".")[1]] for k in change) else change


def fixes(config, tgt: Target, shape, limit: int) -> list[dict]:
    """Each change that may make the asked batch fit, tried by compiling: FSDP over every chip, remat (+ scan where
    the family offers it), bfloat16 compute; then all of them together if none alone fits (the last entry)."""

    chips = len(tgt.devices)
    candidates = []
    if config.mesh.fsdp != chips and chips > 1:
        candidates.append({"mesh.data": 1, "mesh.fsdp": chips})
    if (change := _execution_change(config)) is not None:
        candidates.append(change)
    if config.compute_dtype != "bfloat16":
        candidates.append({"compute_dtype": "bfloat16"})
    out = []
    for change in candidates:
        c = compile_config(_variant(config, **change), tgt, shape, eval_step=False)[0]
        out.append({"change": change, "per_chip_bytes": c.peak, "fits": c.peak <= limit})
    if len(candidates) > 1 and not any(o["fits"] for o in out):
        together = {k: v for change in candidates for k, v in change.items()}
        c = compile_config(_variant(config, **together), tgt, shape, eval_step=False)[0]
        out.append({"change": together, "per_chip_bytes": c.peak, "fits": c.peak <= limit})
    return out


def suggestions(config, tgt: Target, shape, limit: int) -> dict:
    """What makes a config that does not fit fit, each tried by compiling: `fixes` (above); `largest_batch`, the
    largest global batch that fits as asked (0: not one image per chip); and, when no fix fits the asked batch,
    `largest_batch_with`: {"change": every fix together, "batch_size": the largest batch that fits with it}."""
    out = {"fixes": fixes(config, tgt, shape, limit), "largest_batch": largest_batch(config, tgt, shape, limit)[0]}
    if out["fixes"] and not any(f["fits"] for f in out["fixes"]):
        change = out["fixes"][-1]["change"]
        out["largest_batch_with"] = {"change": change,
                                     "batch_size": largest_batch(_variant(config, **change), tgt, shape, limit)[0]}
    return out


def _backbone_family(config) -> str:
    """The backbone family the model section will build (the converted folder's, read from its metadata)."""

    if config.model.pretrained:
        return pretrained.read_metadata(config.model.pretrained)["family"]
    return config.model.family


def model_flops(config, shape) -> float:
    """FLOPs of one train step of the whole global batch, as XLA's cost analysis counts the lowered step on one CPU
    device with the blocks unrolled and no remat: the model's FLOPs (a compiled step's analysis counts a scanned loop
    body once and remat's recomputation on top). No libtpu, no compile: a few seconds."""
    return lowered_flops(config, shape, eval_step=False)[0]


def lowered_flops(config, shape, batch_size: int | None = None, eval_step: bool = True):
    """(train step FLOPs, eval step FLOPs or None) for a global batch of `batch_size` (default the config's)."""

    task, num_classes, channels = shape
    c = _variant(config, **{"model.scan": False, "model.remat": False, "mesh.data": 1, "mesh.fsdp": 1})
    batch_size = batch_size or int(c.batch_size)
    e = build_engine(c, jax.devices("cpu")[:1], num_classes=num_classes, channels=channels, task=task)
    lowered = lower_steps(e, c, batch_size, channels, task, num_classes, eval_step=eval_step)
    out = []
    for low in lowered:
        cost = low.cost_analysis() if low is not None else None
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out.append(float(cost["flops"]) if cost is not None else None)
    return tuple(out)


def step_time(flops: float, chips: int, chip: Chip, mfu: float) -> float:
    return flops / (chips * chip.peak_flops * mfu)


def chip_hours(flops: float, chip: Chip, mfu: float) -> float:
    """Chip-hours that `flops` take at the chip's peak bf16 rate times `mfu`."""
    return step_time(flops, 1, chip, mfu) / 3600


def plan(config, topology: str, *, mfu: float = 0.4, suggest: bool = True, shape=None, tgt: Target | None = None,
         eval_step: bool = True) -> dict:
    """The plan as a dict (the JSON line): see the module docstring."""
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu={mfu}: expected a fraction in (0, 1]")
    tgt = tgt or target(topology)
    shape = shape or dataset_shape(config)
    chips = len(tgt.devices)
    train, ev = compile_config(config, tgt, shape, eval_step=eval_step)
    limit = tgt.chip.hbm_bytes
    batch_bytes = sum(_batch_bytes(config, shape, chips).values())
    state_bytes = train.arguments - batch_bytes
    # while evaluating, the train state (parameters and optimizer moments) stays in HBM beside the eval step's
    # images, outputs and temporaries; its parameters are the eval step's other arguments
    eval_peak = None
    if ev and not (ev.out_of_memory or train.out_of_memory):
        eval_peak = state_bytes + ev.peak - ev.arguments + _eval_images_bytes(config, shape, chips)
    elif ev:
        eval_peak = max(ev.peak, train.peak if train.out_of_memory else 0)
    fits = not train.out_of_memory and train.peak <= limit and (ev is None or not ev.out_of_memory) and \
        (eval_peak is None or eval_peak <= limit)
    flops = model_flops(config, shape)
    seconds = step_time(flops, chips, tgt.chip, mfu)
    out = {
        "topology": topology, "target": tgt.kind, "chip": tgt.chip.name, "chips": chips,
        "mesh": _mesh_shape(config, chips), "backbone": _backbone_family(config),
        "batch_size": int(config.batch_size), "image_size": int(config.image_size),
        "compute_dtype": config.compute_dtype, "remat": bool(config.model.remat), "scan": bool(config.model.scan),
        "per_chip_bytes": train.peak, "hbm_bytes": limit, "fits": bool(fits),
        "train": dataclasses.asdict(train) | {"peak": train.peak},
        "eval": (dataclasses.asdict(ev) | {"peak": ev.peak, "resident_with_state": eval_peak}) if ev else None,
        "flops_per_step": flops, "compiled_flops_per_step": train.flops,
        "compile_seconds": train.seconds + (ev.seconds if ev else 0.0),
        "mfu": mfu, "step_seconds": seconds, "images_per_second": config.batch_size / seconds,
        "peak_flops_per_chip": tgt.chip.peak_flops,
    }
    if not fits and suggest:
        out.update(suggestions(config, tgt, shape, limit))
    return out


def _mesh_shape(config, chips: int) -> dict:
    data, fsdp = int(config.mesh.data), int(config.mesh.fsdp)
    return {"data": chips // fsdp if data == -1 else data, "fsdp": chips // data if fsdp == -1 else fsdp}


def _eval_images_bytes(config, shape, chips: int) -> int:
    return _batch_bytes(config, shape, chips)["image"]


def _batch_bytes(config, shape, chips: int) -> dict:
    task, num_classes, channels = shape
    per_chip = config.batch_size // chips
    label = 4 * per_chip * (1 if task == "multiclass" else num_classes)
    return {"image": 4 * per_chip * config.image_size ** 2 * channels, "label": label, "mask": per_chip}


def gib(n) -> str:
    return f"{n / GiB:.2f} GiB"


def render(p: dict) -> str:
    """The human table (every line but the JSON one)."""
    t, e = p["train"], p["eval"]
    where = ("TPU topology " + p["topology"] if p["target"] == "tpu"
             else f"{p['topology']}: emulated on {p['chips']} CPU devices (CPU compiler; an estimate for the GPU)")
    rows = [
        ("target", f"{where}, {p['chips']} x {p['chip']} (mesh data={p['mesh']['data']} fsdp={p['mesh']['fsdp']})"),
        ("model", f"{p['backbone']}, batch {p['batch_size']} at {p['image_size']} px, {p['compute_dtype']}, "
                  f"remat={p['remat']} scan={p['scan']}"),
    ]
    if t["out_of_memory"]:
        rows.append(("train step per chip", f"the compiler refused it: at least {gib(t['needed'])} of "
                                            f"{gib(p['hbm_bytes'])} HBM ({t['out_of_memory'][:160]})"))
    else:
        rows += [("train step per chip", f"arguments {gib(t['arguments'])}, outputs {gib(t['outputs'])}, "
                                         f"temporaries {gib(t['temporaries'])}, aliased {gib(t['aliased'])}, code "
                                         f"{gib(t['code'])}"),
                 ("  held while it runs", f"{gib(t['peak'])} of {gib(p['hbm_bytes'])} HBM")]
    if e and e["out_of_memory"]:
        rows.append(("eval step per chip", f"the compiler refused it, needs {gib(e['needed'])}"))
    elif e:
        rows.append(("eval step per chip", f"arguments {gib(e['arguments'])}, outputs {gib(e['outputs'])}, "
                                           f"temporaries {gib(e['temporaries'])}; with the train state resident "
                                           f"{gib(e['resident_with_state'])}"))
    rows += [
        ("fits", "yes" if p["fits"] else "NO"),
        ("FLOPs per train step", f"{p['flops_per_step']:.4g} (all chips; {p['flops_per_step'] / p['batch_size']:.4g} "
                                 "per image; the compiled step's analysis: "
                                 f"{p['compiled_flops_per_step']:.4g})" if p["compiled_flops_per_step"] else
                                 f"{p['flops_per_step']:.4g} (all chips; {p['flops_per_step'] / p['batch_size']:.4g} "
                                 "per image)"),
        ("compile time", f"{p['compile_seconds']:.1f} s"),
        (f"at MFU {p['mfu']:g}", f"{p['step_seconds'] * 1e3:.1f} ms per step, {p['images_per_second']:,.0f} images/s "
                                 f"(peak {p['peak_flops_per_chip'] / 1e12:g} bf16 TFLOP/s per chip)"),
    ]
    if "largest_batch" in p:
        rows.append(("largest batch that fits", str(p["largest_batch"]) if p["largest_batch"] else
                     f"none (not even {p['chips']}: one image per chip)"))
        for f in p["fixes"]:
            change = " ".join(f"--config.{k}={v}" for k, v in f["change"].items())
            rows.append(("  with " + change, f"{gib(f['per_chip_bytes'])}: {'fits' if f['fits'] else 'does not fit'}"))
        if "largest_batch_with" in p:
            w = p["largest_batch_with"]
            rows.append(("largest batch with all of them", str(w["batch_size"]) if w["batch_size"] else
                         f"none (not even {p['chips']}: one image per chip)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------------------------ command line

def _define_flags():
    """The command line's flags, defined when it runs (not on import: `medjax.main` defines `--config` too)."""
    config_flags.DEFINE_config_file("config", None, cli.RECIPE_HELP, lock_config=True)
    flags.DEFINE_string("topology", None,
                        "TPU topology (v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, ...) or h100:N / a100:N")
    flags.DEFINE_string("backbone", None, "a converter variant name (dinov2_vitg14, ...) instead of model.pretrained")
    flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation for the step time (fraction of the chip's peak bf16 rate)")
    flags.DEFINE_bool("suggest", True, "when it does not fit: find the largest batch and the changes that fit")
    flags.DEFINE_bool("eval", True, "also compile the eval step")
    flags.DEFINE_integer("classes", None, "classes of a dataset the plan does not know (csv / folder)")
    flags.DEFINE_integer("channels", None, "image channels of a dataset the plan does not know")
    flags.DEFINE_enum("task", None, ["multiclass", "multilabel"], "task of a dataset the plan does not know")


FLAGS = flags.FLAGS


def _parse_flags(argv):
    rest = cli.parse_recipe_flags(argv, __doc__, ["config", "topology", "backbone", "mfu", "suggest", "eval", "classes",
                                                  "channels", "task"], ["config", "topology"],
                                  "python -m medjax.plan --config=demo --topology=v5e:2x4")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # see target(); before jax starts its backends
    gpu = parse_gpu(FLAGS.topology)
    if gpu and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # read when jax starts its CPU client (the first jax.devices()), which has not happened yet
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={gpu[1]}").strip()
    return rest


def main(argv):
    del argv

    config = FLAGS.config
    captured = None
    try:
        schema.validate(config)
        if FLAGS.backbone:
            config = resolve_backbone(config, FLAGS.backbone)
        shape = dataset_shape(config, FLAGS.classes, FLAGS.channels, FLAGS.task)
        with quiet_stderr() as captured:
            result = plan(config, FLAGS.topology, mfu=FLAGS.mfu, suggest=FLAGS.suggest, shape=shape,
                          eval_step=FLAGS.eval)
    except (schema.ConfigError, UserError, classifier.ModelConfigError, pretrained.PretrainedError,
            rules.RuleError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception:
        if captured is not None and captured.text:
            sys.stderr.write(captured.text)
        raise
    print(render(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=_parse_flags)


# ------------------------------------------------------------------------------------------------ the grid's cost

# (train, val, test) images of each dataset as the grid reads it: the public sets' sizes under the readers' split
# rules (medjax.data; SPEC sections 5 and 10). Approximate where the split is drawn (fractions of the whole set);
# `python -m medjax.grid plan --images name=TRAIN,VAL,TEST` replaces a row with the counts of a real split file.
GRID_IMAGES = {
    "chexpert": (178731, 22341, 22342),  # v1.0-small train.csv, 223,414 images; by patient ~80/10/10
    "chexpert_frontal": (152821, 19103, 19103),  # its 191,027 frontal images (the radiology study)
    "ddsm": (8384, 1048, 1048),  # ~10,480 images (2,620 cases x 4 views); the shipped lists, ~80/10/10 assumed
    "isic2019": (20265, 2533, 2533),  # 25,331 images, seeded 80/10/10
    "aptos2019": (2563, 549, 550),  # 3,662 images, seeded 70/15/15
    "chest_xray_pneumonia": (4186, 1046, 624),  # train + val folders 5,232 by patient 80/20; the test folder
    "ichallenge_amd": (280, 60, 60),  # 400 images, seeded 70/15/15
    "ham10000": (8012, 1001, 1002),  # 10,015 images, by lesion 80/10/10
    "isic2018": (10015, 193, 1512),  # the official training, validation and test sets
    "nih_chestxray14": (76522, 10002, 25596),  # train_val_list less its last 10,002 (val); test_list
    "brain_tumor_figshare": (2144, 460, 460),  # 3,064 slices, by patient 70/15/15
}


def grid_flops(config, shape, cache: dict) -> tuple[float, float]:
    """(train-step FLOPs per image, eval FLOPs per image) of a cell's config, from the lowered steps (model_flops).
    Cells that differ only in their dataset's classes or input channels share one count, lowered for 3 channels and
    5 classes: the head's classes change a step's FLOPs by < 0.01%, one channel instead of three saves 2/3 of the
    stem's first convolution (about 1% of a ResNet-152 step, less for the ViTs)."""
    m = config.model
    key = json.dumps([m.architecture.to_dict() if hasattr(m.architecture, "to_dict") else dict(m.architecture),
                      m.head, m.freeze, m.peft, config.image_size, shape[0], config.compute_dtype], sort_keys=True)
    if key not in cache:
        batch = 8
        train, ev = lowered_flops(config, (shape[0], 5 if shape[0] == "multiclass" else 14, 3), batch)
        cache[key] = (train / batch, ev / batch)
    return tuple(cache[key])


def cell_cost(config, cell: dict, images: tuple, flops: tuple, chip: Chip, chips: int, mfu: float) -> dict:
    """Chip-hours of one cell: a trained cell runs epochs x (train // batch) train steps and evaluates val every epoch
    and test once; a linear-probe cell (head `probe`) runs the frozen backbone once over every image (the features
    are cached; the heads on them cost next to nothing)."""
    train_images, val_images, test_images = images
    train_flops, eval_flops = flops
    if cell["head"] == "probe":
        total = eval_flops * (train_images + val_images + test_images)
        steps = 0
    else:
        steps = int(config.total_steps) or int(config.epochs) * (train_images // int(config.batch_size))
        total = (train_flops * steps * int(config.batch_size)
                 + eval_flops * (val_images * int(config.epochs) + test_images))
    return {**{k: cell[k] for k in ("study", "model", "dataset", "head", "freeze")}, "steps": steps,
            "flops": total, "chip_hours": step_time(total, chips, chip, mfu) / 3600 * chips}


def grid_plan(grid, cells: list[dict], topology: str, mfu: float, images: dict | None = None, log=None,
              cache: dict | None = None) -> dict:
    """Every selected cell's chip-hours on `topology` at `mfu`, and the total (per study too)."""
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu={mfu}: expected a fraction in (0, 1]")
    gpu = parse_gpu(topology)
    if gpu:
        chip, chips = CHIPS[gpu[0]], gpu[1]
    else:
        generation = tpu_generation(topology)
        chip, chips = CHIPS[generation], _topology_chips(topology)
    sizes = {**GRID_IMAGES, **(images or {})}
    cache = {} if cache is None else cache
    rows = []
    for cell in cells:
        config = grid.get_config(grid.cell_arg(cell))
        config = resolve_backbone(config, grid.model_info(cell["model"]).variant)
        with config.unlocked():
            config.model.attention_head.deit_params = ""  # DeiT-B's shape: the random-init body's defaults
        shape = dataset_shape(config)
        name = "chexpert_frontal" if cell["dataset"] == "chexpert" and config.data_options.get("frontal_only") \
            else cell["dataset"]
        if name not in sizes:
            raise PlanError(f"no image counts for dataset {name!r}; give --images {name}=TRAIN,VAL,TEST")
        flops = grid_flops(config, shape, cache)
        rows.append(cell_cost(config, cell, sizes[name], flops, chip, chips, mfu))
        if log:
            log(rows[-1])
    studies = {}
    for r in rows:
        studies[r["study"]] = studies.get(r["study"], 0.0) + r["chip_hours"]
    return {"topology": topology, "chip": chip.name, "chips": chips, "mfu": mfu, "cells": rows,
            "chip_hours_by_study": studies, "chip_hours": sum(r["chip_hours"] for r in rows)}


def _topology_chips(topology: str) -> int:
    """Chips of a TPU topology name from its shape (`v5e:2x4` -> 8), without libtpu."""
    shape = topology.split(":", 1)[1] if ":" in topology else ""
    if not re.fullmatch(r"\d+(x\d+)*", shape):
        raise PlanError(f"--topology={topology!r}: expected GEN:AxB[xC], e.g. v5e:2x4")
    n = 1
    for d in shape.split("x"):
        n *= int(d)
    return n


def parse_images(items) -> dict:
    """['chexpert=178731,22341,22342', ...] -> {'chexpert': (178731, 22341, 22342)}."""
    out = {}
    for item in items or ():
        name, sep, counts = item.partition("=")
        parts = counts.split(",")
        if not sep or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise PlanError(f"--images {item!r}: expected DATASET=TRAIN,VAL,TEST (three image counts)")
        out[name.strip()] = tuple(int(p) for p in parts)
    return out


def grid_main(grid, cells: list[dict], topology: str, mfu: float, images=(), as_json: bool = False,
              cache_file: str | None = None) -> int:
    """`python -m medjax.grid plan`: one line per cell (as it is counted), then the totals; the last line is JSON."""
    def log(row):
        if not as_json:
            print(f"{row['study']:<9} {row['model']:<13} {row['dataset']:<20} {row['head']:<9} {row['freeze']:<6} "
                  f"{row['steps']:>8} steps {row['flops']:.3e} FLOPs {row['chip_hours']:10.2f} chip-hours", flush=True)

    cache = {}
    if cache_file and os.path.exists(cache_file):
        with open(cache_file) as f:
            cache = json.load(f)

    def log_and_save(row):
        log(row)
        if cache_file:
            with atomic_write(cache_file) as f:
                json.dump(cache, f)

    try:
        result = grid_plan(grid, cells, topology, mfu, parse_images(images), log=log_and_save, cache=cache)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if not as_json:
        for study, hours in result["chip_hours_by_study"].items():
            print(f"{study}: {hours:,.1f} chip-hours")
        print(f"total: {result['chip_hours']:,.1f} chip-hours on {result['chip']} at MFU {mfu:g} "
              f"({result['chip_hours'] / result['chips']:,.2f} hours on {topology})")
    print(json.dumps(result))
    return 0
