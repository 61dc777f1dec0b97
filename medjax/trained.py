"""A fine-tuned classifier ready to apply (`FineTuned`) and its loaders: a run folder's best model
(`load_run`, verified against its digests, under the run folder's shared lock) or a folder written by
`python -m medjax.export --format safetensors` (`load_exported`); `load_model` tells them apart. The run folder's
layout comes from `medjax.rundir`. predict, export, explain and the benchmarks read models through here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors import SafetensorError
from safetensors.numpy import load_file

from medjax import (
    checkpoint,
    classifier,
    data,
    engine,
    models,
    peft,
    pretrained,
    rules,
    rundir,
    schema,
    sharding,
)
from medjax import thresholds as operating_points
from medjax.data.pipeline import BACKBONE_STATS
from medjax.errors import UserError
from medjax.finetuned import EXPORT_KEY, HEAD_FILE


class PredictError(UserError):
    """Bad input to predict / export / explain: the message names the file or field."""


@dataclasses.dataclass
class FineTuned:
    """A fine-tuned classifier ready to apply, from a run's best model or an exported folder."""

    source: str  # the run's work directory or the exported folder
    config: Any  # the run's config (configs.schema.make)
    engine: Any  # medjax.engine.Engine: the model, the mesh, the sharded eval step
    variables: dict  # every collection of the best model, placed as engine.variables_sharding
    class_names: list
    task: str
    channels: int
    mean: tuple
    std: tuple
    thresholds: dict | None  # operating points (medjax.thresholds), multi-label runs
    best_step: int | None
    target_metric: str | None

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def normalization(self):
        """What medjax.data's loader takes: the run's dataset statistics, or the backbone's named ones."""
        n = self.config.normalization
        return (self.mean, self.std) if n == "dataset" else n

    def normalization_stats(self) -> tuple[tuple, tuple]:
        n = self.config.normalization
        if n == "dataset":
            return tuple(self.mean), tuple(self.std)
        mean, std = BACKBONE_STATS[n]
        return tuple(mean[:self.channels]), tuple(std[:self.channels])

    def threshold_array(self) -> np.ndarray:
        return operating_points.as_array(self.thresholds, self.class_names)

    def loader(self, records, batch_size: int, name: str = "predict"):
        """(batches, failures): `records` with the run's eval transform (its resize and normalisation), in order, the
        last batch padded (mask False); `failures` fills with (path, origin, reason) of unreadable images as the
        batches are read."""
        dataset = data.Dataset(name, self.task, list(self.class_names), self.channels, "", tuple(self.mean),
                               tuple(self.std), {name: list(records)})
        batches = data.make_loader(dataset, name, batch_size=batch_size, image_size=self.image_size, train=False,
                                   normalization=self.normalization(), shard_index=0, shard_count=1,
                                   resize=self.config.resize)
        return batches, dataset.load_failures

    def plain(self):
        """(Classifier, host variables) without execution wrappers: LoRA adapters merged into their kernels, ViT blocks
        unrolled (`blocks_<i>`) and not rematerialised. The outputs are the same; export and explain use it."""
        model = self.engine.model
        variables = jax.tree_util.tree_map(np.asarray, jax.device_get(self.variables))
        variables = {c: dict(v) for c, v in variables.items()}
        if isinstance(model, peft.LoraModel):
            params = dict(variables["params"])
            lora = params.pop("lora")
            variables["params"] = jax.tree_util.tree_map(np.asarray, peft.merge_lora(params, lora, model.alpha,
                                                                                     model.rank))
            model = model.model
        family = models.family(model.backbone.family)
        if family.execution is not None:  # the plain layout (e.g. a scanned ViT's blocks unrolled)
            backbone, params = family.execution(model.backbone, {"params": variables["params"]["backbone"]}, False,
                                                False)
            variables["params"]["backbone"] = params["params"]
            model = dataclasses.replace(model, backbone=backbone)
        return model, variables


def is_run(source: str) -> bool:
    """A run's work directory (it has the run's recorded config), as opposed to an exported folder."""
    return os.path.isfile(rundir.path(source, rundir.RUN_CONFIG))


def run_config(source: str) -> dict:
    """The flattened config the model was trained with: the run's `run_config.json`, or the one an exported folder
    recorded in its medjax.json."""
    if is_run(source):
        return read_json(rundir.path(source, rundir.RUN_CONFIG), "the config of a run started by medjax.main")
    facts = pretrained.read_metadata(source).get(EXPORT_KEY)
    if not isinstance(facts, dict) or not isinstance(facts.get("run_config"), dict):
        raise PredictError(f"{os.path.join(source, pretrained.METADATA_FILE)}: no fine-tuned run's config under "
                           f"{EXPORT_KEY!r}; expected a folder of `python -m medjax.export`")
    return facts["run_config"]


def class_names(source: str) -> list:
    """The model's class names from the run's split file or the exported folder's metadata (no model loaded)."""
    if is_run(source):
        flat = run_config(source)
        split_file = rundir.split_file(source, flat.get("dataset", ""))
        names = read_json(split_file, "the run's split file").get("class_names")
    else:
        names = (pretrained.read_metadata(source).get(EXPORT_KEY) or {}).get("class_names")
    if not isinstance(names, list):
        raise PredictError(f"{source}: no class names recorded (expected a run folder or an exported folder)")
    return [str(n) for n in names]


def config_from_flat(flat: dict, where: str):
    """The config a run started with, from its flattened `run_config.json` (`schema.from_flat`); fields this medjax
    does not declare are reported and left out."""
    try:
        config, unknown = schema.from_flat(flat)
    except (schema.ConfigError, TypeError, ValueError) as e:
        raise PredictError(f"{where}: cannot rebuild the run's config: {e}") from None
    if unknown:
        print(f"warning: {where}: fields this medjax does not declare are ignored: {', '.join(unknown[:8])}",
              file=sys.stderr)
    return config


def read_json(path: str, what: str) -> dict:
    """A JSON object from `path` (PredictError naming the file and `what` was expected when missing or bad)."""
    if not os.path.isfile(path):
        raise PredictError(f"{path}: not found; expected {what}")
    try:
        with open(path) as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise PredictError(f"{path}: not valid JSON ({e}); expected {what}") from None
    if not isinstance(value, dict):
        raise PredictError(f"{path}: holds a JSON {type(value).__name__}, not an object; expected "
                           f"{what or 'a JSON object'}")
    return value


def _best_step(workdir: str) -> int:
    """The best step the latest committed checkpoint names (a finished run's metrics.json agrees; a run extended
    after it finished may have moved on), else metrics.json's."""
    root = os.path.abspath(rundir.path(workdir, rundir.CHECKPOINTS))
    if os.path.isdir(root):
        with ocp.CheckpointManager(root, item_handlers={"progress": ocp.JsonCheckpointHandler()}) as manager:
            latest = manager.latest_step()
            try:
                progress = manager.restore(latest, args=ocp.args.Composite(progress=ocp.args.JsonRestore())) \
                    if latest is not None else None
            except Exception:  # noqa: BLE001 - a damaged checkpoint: the finished run's metrics.json names the best
                progress = None
            step = progress["progress"]["best"]["step"] if progress else None
            if step is not None:
                return int(step)
    path = rundir.path(workdir, rundir.METRICS)
    if os.path.isfile(path):
        step = read_json(path, "the run's metrics").get("best_step")
        if step is not None:
            return int(step)
    raise PredictError(f"{workdir}: the run has no best model yet (no checkpoint names one, no metrics.json "
                       "best_step); train it until a validation has run")


def _build(config, num_classes: int, channels: int, task: str, mesh=None):
    mesh = mesh or sharding.make_mesh(-1, 1)
    try:
        return engine.build(config, num_classes=num_classes, channels=channels, task=task, total_steps=1, mesh=mesh)
    except (classifier.ModelConfigError, rules.RuleError, ValueError) as e:
        raise PredictError(f"cannot build the run's model: {e}") from None


def load_run(workdir: str, mesh=None) -> FineTuned:
    """A run's best model, verified against its digests, read under the work directory's shared lock: refused (one
    line) while a trainer writes the run (`medjax.rundir.reading`)."""
    try:
        with rundir.reading(workdir):
            return _load_run(workdir, mesh)
    except rundir.WorkdirBusy as e:
        raise PredictError(str(e)) from None


def _load_run(workdir: str, mesh=None) -> FineTuned:
    flat = run_config(workdir)
    config = config_from_flat(flat, rundir.path(workdir, rundir.RUN_CONFIG))
    moved = rundir.path(workdir, rundir.BACKBONE)
    if config.model.pretrained and not os.path.exists(config.model.pretrained) and os.path.isdir(moved):
        with config.unlocked():  # the run's folder was moved: its converted backbone moved with it
            config.model.pretrained = moved
    split_file = rundir.split_file(workdir, config.dataset)
    split = read_json(split_file, "the run's split file (written at its start)")
    try:
        class_names, task = list(split["class_names"]), split["task"]
        mean, std = tuple(split["statistics"]["mean"]), tuple(split["statistics"]["std"])
    except (KeyError, TypeError) as e:
        raise PredictError(f"{split_file}: no {e} field; expected a medjax split file") from None
    step = _best_step(workdir)
    best_dir = rundir.best_dir(workdir, step)
    if not os.path.isdir(best_dir):
        raise PredictError(f"{best_dir}: not found; the run names step {step} as its best model but its folder is "
                           "missing")
    e = _build(config, len(class_names), len(mean), task, mesh)
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      e.variables_of(e.state), e.variables_sharding)
    try:
        variables = checkpoint.restore_best(best_dir, abstract)
    except checkpoint.DamagedCheckpoint as err:
        raise PredictError(f"{err}; train the run again (or restore the folder from a copy)") from None
    metrics_path = rundir.path(workdir, rundir.METRICS)
    target = read_json(metrics_path, "")["target_metric"] if os.path.isfile(metrics_path) else None
    return FineTuned(workdir, config, e, variables, class_names, task, len(mean), mean, std,
                     operating_points.load(best_dir), step, target)


def load_exported(folder: str, mesh=None) -> FineTuned:
    """A folder of `medjax.export --format safetensors`: the backbone as a converted folder plus the head."""
    meta = pretrained.read_metadata(folder)
    facts = meta.get(EXPORT_KEY)
    if not isinstance(facts, dict):
        raise PredictError(f"{os.path.join(folder, pretrained.METADATA_FILE)}: a converted backbone without a "
                           "fine-tuned head; pass a run's work directory or a folder of `python -m medjax.export`")
    config = config_from_flat(facts["run_config"], os.path.join(folder, pretrained.METADATA_FILE))
    with config.unlocked():  # the weights are all in the folder: no conversion, adapters merged, nothing to train
        config.model.pretrained = folder
        config.model.convert_from.update({"checkpoint": "", "model": "", "config": ""})
        config.model.architecture = None
        config.model.attention_head.deit_params = ""
        config.model.peft = "none"
        config.model.freeze, config.model.trainable_rules = "frozen", ()
        config.optim.lr_scale_rules, config.optim.layer_decay = (), None
    e = _build(config, len(facts["class_names"]), int(facts["channels"]), facts["task"], mesh)
    head_path = os.path.join(folder, HEAD_FILE)
    try:
        head = load_file(head_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise PredictError(f"{head_path}: missing or damaged ({err}); export the run again") from None
    bad = sorted(k for k, v in head.items() if facts.get("head_digests", {}).get(k) != pretrained.tensor_digest(v))
    if bad:
        raise PredictError(f"{head_path}: {len(bad)} tensor(s) differ from the digests in medjax.json (first: "
                           f"{bad[0]}); the file is damaged; export the run again")
    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(e.variables_of(e.state)))
    variables = {c: dict(v) for c, v in variables.items()}
    init = pretrained.flatten_variables({c: v["head"] for c, v in variables.items() if "head" in v})
    problems = sorted(set(init) ^ set(head)) + [k for k in init if k in head and init[k].shape != head[k].shape]
    if problems:
        raise PredictError(f"{head_path} does not fit the model of the exported config: {problems[:8]}")
    for collection, tree in pretrained.unflatten_variables(head).items():
        if tree:
            variables[collection] = {**variables[collection], "head": tree}
    variables = jax.device_put(variables, e.variables_sharding)
    return FineTuned(folder, config, e, variables, list(facts["class_names"]), facts["task"], int(facts["channels"]),
                     tuple(facts["mean"]), tuple(facts["std"]), facts.get("thresholds"), facts.get("best_step"),
                     facts.get("target_metric"))


def load_model(source: str, mesh=None) -> FineTuned:
    """A run's work directory (run_config.json) or an exported folder (medjax.json with a head)."""
    if is_run(source):
        return load_run(source, mesh)
    if os.path.isfile(os.path.join(source, pretrained.METADATA_FILE)):
        return load_exported(source, mesh)
    raise PredictError(f"{source}: neither a run's work directory (no run_config.json) nor a folder written by "
                       "`python -m medjax.export` (no medjax.json)")
