"""python -m medjax.predict --workdir RUN (--dataset NAME --root DIR [--split test] | --images PATH... | --csv FILE)
--output preds.csv

Applies a fine-tuned model to images: the best model of a run's work directory (its config, class names, statistics
and operating points come from the run; no config flags), or a folder written by `python -m medjax.export --format
safetensors`. The images get the run's eval transform (resize, center crop, the run's normalisation), in batches
sharded over the available devices, and `preds.csv` gets one row per image:

    path, prob/<class> for every class, then
    multi-class:  pred (the top class), label (where the input has labels)
    multi-label:  pred/<class> (0/1 at the run's per-class operating points; 0.5 without them), label/<class>

Probabilities are written as the float64 value of the model's float32 output (17 significant digits), so a reader
gets exactly the numbers the trainer scored. With labels, the metrics of `medjax.metrics` (and, multi-label, those at
the operating points) are printed and written with `--metrics FILE`.

Inputs: a dataset in its public layout (any `medjax.data` reader; the run's own split rule and options when it is the
run's dataset), image files or folders (searched recursively for PNG, JPEG, BMP, TIFF, DICOM), or a CSV with a `path`
column (relative to the CSV's folder) and optionally `label` (a class name; multi-label: `|`-joined names) or one
0/1 column per class (`<class>` or `label/<class>`, so a preds.csv can be read back). An image that cannot be read is
reported and left out of preds.csv; `--strict` stops instead (exit 2). `--tta flips` averages the probabilities of the
image and its horizontal, vertical and double flips (the flips the training augmentation draws).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors import SafetensorError
from safetensors.numpy import load_file
from tqdm import tqdm

from medjax import (
    checkpoint,
    classifier,
    data,
    engine,
    metrics,
    models,
    outputs,
    peft,
    pretrained,
    rules,
    rundir,
    schema,
    sharding,
)
from medjax import thresholds as operating_points
from medjax.data import DataError, Record, checks
from medjax.data.pipeline import BACKBONE_STATS
from medjax.data.records import IMAGE_EXTENSIONS, read_csv, walk_images
from medjax.errors import UserError, atomic_write, cli_main

EXPORT_KEY = "export"  # medjax.json of an exported folder: the run's facts under this key
HEAD_FILE = "head.safetensors"
TTA_VIEWS = {"none": ((False, False),),
             "flips": ((False, False), (False, True), (True, False), (True, True))}  # (vertical, horizontal)


class PredictError(UserError):
    """Bad input to predict / export / explain: the message names the file or field."""


# ------------------------------------------------------------------------------------------------ the model


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


def _read_json(path: str, what: str) -> dict:
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
    root = os.path.abspath(os.path.join(workdir, "checkpoints"))
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
    path = os.path.join(workdir, "metrics.json")
    if os.path.isfile(path):
        step = _read_json(path, "the run's metrics").get("best_step")
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
    flat = _read_json(os.path.join(workdir, "run_config.json"), "the config of a run started by medjax.main")
    config = config_from_flat(flat, os.path.join(workdir, "run_config.json"))
    moved = os.path.join(workdir, "backbone")
    if config.model.pretrained and not os.path.exists(config.model.pretrained) and os.path.isdir(moved):
        with config.unlocked():  # the run's folder was moved: its converted backbone moved with it
            config.model.pretrained = moved
    split_file = os.path.join(workdir, "splits", f"{config.dataset}.json")
    split = _read_json(split_file, "the run's split file (written at its start)")
    try:
        class_names, task = list(split["class_names"]), split["task"]
        mean, std = tuple(split["statistics"]["mean"]), tuple(split["statistics"]["std"])
    except (KeyError, TypeError) as e:
        raise PredictError(f"{split_file}: no {e} field; expected a medjax split file") from None
    step = _best_step(workdir)
    best_dir = os.path.abspath(os.path.join(workdir, "best", f"step_{step}"))
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
    metrics_path = os.path.join(workdir, "metrics.json")
    target = _read_json(metrics_path, "")["target_metric"] if os.path.isfile(metrics_path) else None
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
    if os.path.isfile(os.path.join(source, "run_config.json")):
        return load_run(source, mesh)
    if os.path.isfile(os.path.join(source, pretrained.METADATA_FILE)):
        return load_exported(source, mesh)
    raise PredictError(f"{source}: neither a run's work directory (no run_config.json) nor a folder written by "
                       "`python -m medjax.export` (no medjax.json)")


# ------------------------------------------------------------------------------------------------ inputs


def image_records(paths: list[str], model: FineTuned) -> list:
    """Records (without labels) for image files and folders (searched recursively, sorted) given on the command
    line."""
    none = tuple([0] * len(model.class_names)) if model.task == "multilabel" else 0
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = walk_images(p)  # each real file once: symlink loops and links to a file already listed are cut
            if not found:
                raise PredictError(f"{p}: a folder without images ({', '.join(IMAGE_EXTENSIONS)})")
            out += [Record(f, none, origin=f) for f in found]
        else:
            out.append(Record(p, none, origin=p))  # a missing file is reported like an unreadable one
    return out


def csv_records(path: str, class_names: list, task: str) -> tuple[list, bool, list]:
    """(records, has labels, the paths as the CSV writes them) from a CSV with `path` and optional labels (see the
    module docstring)."""
    multilabel = task == "multilabel"
    records, has_labels, shown = [], None, []
    base = os.path.dirname(os.path.abspath(path))
    try:
        for origin, row in read_csv(path, what="a CSV with a `path` column"):
            column = "path" if "path" in row else "image" if "image" in row else None
            if column is None:
                raise PredictError(f"{path}: no `path` (or `image`) column; found {', '.join(row)}")
            per_class = [c for c in (f"label/{n}" for n in class_names) if c in row] or \
                [n for n in class_names if n in row]
            label, labelled = _csv_label(row, per_class, class_names, multilabel, origin)
            if has_labels is None:
                has_labels = labelled
            elif labelled != has_labels:
                raise PredictError(f"{origin}: {'a label' if labelled else 'no label'}, unlike the rows above")
            value = row[column]
            if not value:
                raise PredictError(f"{origin}: {column} is empty")
            records.append(Record(value if os.path.isabs(value) else os.path.join(base, value), label,
                                  origin=origin))
            shown.append(value)
        labelled_at: dict = {}
        for r in records if has_labels else ():  # the same image with two labels would score both
            other = labelled_at.setdefault(os.path.normpath(r.path), r)
            if other.label != r.label:
                raise PredictError(f"{r.origin}: image {r.path} is listed again with another label than at "
                                   f"{other.origin}; expected one label per image")
    except DataError as e:
        raise PredictError(str(e)) from None
    return records, bool(has_labels), shown


def _csv_label(row, per_class, class_names, multilabel, origin):
    k = len(class_names)
    if per_class:
        if not multilabel:
            raise PredictError(f"{origin}: per-class label columns, but the model is multi-class; give `label`")
        if len(per_class) != k:
            raise PredictError(f"{origin}: label columns for {len(per_class)} of the {k} classes")
        values = [row[c] for c in per_class]
        if any(v not in ("0", "1", "0.0", "1.0") for v in values):
            raise PredictError(f"{origin}: label columns must hold 0 or 1, got {values}")
        return tuple(int(float(v)) for v in values), True
    if "label" not in row or row["label"] == "" and not multilabel:
        return (tuple([0] * k) if multilabel else 0), False
    names = [n.strip() for n in row["label"].split("|") if n.strip()] if multilabel else [row["label"]]
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise PredictError(f"{origin}: label {unknown[0]!r} is not a class of the model ({', '.join(class_names)})")
    if multilabel:
        return tuple(int(n in names) for n in class_names), True
    return class_names.index(names[0]), True


def dataset_records(model: FineTuned, name: str, root: str, split: str) -> tuple[list, Any]:
    """The records of a dataset split, read with the run's split rule and options when it is the run's dataset."""
    options = {k: v for k, v in schema.data_options(model.config).items()
               if k not in ("check_images", "skip_bad_images")} if name == model.config.dataset else {}
    try:
        dataset = data.get_dataset(name, root, seed=model.config.seed, check_images="none", **options)
    except data.DataError as e:
        raise PredictError(str(e)) from None
    if list(dataset.class_names) != list(model.class_names) or dataset.task != model.task:
        raise PredictError(f"dataset {name} at {root} has the {dataset.task} classes {dataset.class_names}; the model "
                           f"predicts the {model.task} classes {model.class_names}")
    if split not in dataset.splits:
        raise PredictError(f"dataset {name} has no split {split!r}; it has {', '.join(dataset.splits)}")
    return dataset.splits[split], dataset


# ------------------------------------------------------------------------------------------------ running


def predict(model: FineTuned, records: list, *, batch_size: int | None = None, tta: str = "none",
            progress: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
    """(probabilities (N, K) float32 with N = len(records), readable (N,) bool, failures [(path, origin, reason)]).
    Rows of unreadable images are NaN. The batches go through the run's jitted eval step, sharded over the mesh."""
    if jax.process_count() > 1:
        raise PredictError("predict runs on one host (all of its devices); start it without jax.distributed")
    if tta not in TTA_VIEWS:
        raise PredictError(f"--tta {tta!r}: expected one of {', '.join(TTA_VIEWS)}")
    e = model.engine
    devices = e.mesh.size
    batch_size = batch_size or model.config.batch_size
    if batch_size % devices:
        raise PredictError(f"--batch-size {batch_size} is not a multiple of the {devices} devices")
    loader, failures = model.loader(records, batch_size)
    probs, masks = [], []
    for batch in tqdm(loader, total=-(-len(records) // batch_size), desc="predict", unit="batch",
                      disable=not progress, file=sys.stderr):
        views = []
        for vertical, horizontal in TTA_VIEWS[tta]:
            images = batch["image"][:, ::-1] if vertical else batch["image"]
            images = np.ascontiguousarray(images[:, :, ::-1] if horizontal else images)
            views.append(e.eval_step(model.variables, sharding.global_batch({"image": images}, e.mesh)["image"]))
        out = views[0] if len(views) == 1 else sum(views[1:], views[0]) / len(views)
        probs.append(np.asarray(out, np.float32))
        masks.append(np.asarray(batch["mask"]))
    probs, masks = np.concatenate(probs)[:len(records)], np.concatenate(masks)[:len(records)]
    probs[~masks] = np.nan
    return probs, masks, list(failures)


def predictions_table(model: FineTuned, paths: list, probs: np.ndarray, labels=None) -> tuple[list, list]:
    """(header, rows) of preds.csv; `labels` (N,) class indices or (N, K) 0/1, or None."""
    names = model.class_names
    header = ["path"] + [f"prob/{n}" for n in names]
    if model.task == "multiclass":
        header += ["pred"] + (["label"] if labels is not None else [])
    else:
        header += [f"pred/{n}" for n in names] + ([f"label/{n}" for n in names] if labels is not None else [])
    cut = model.threshold_array()
    rows = []
    for i, path in enumerate(paths):
        p = probs[i]
        row = [path] + [repr(float(v)) for v in p]
        if model.task == "multiclass":
            row.append(names[int(np.argmax(p))])
            if labels is not None:
                row.append(names[int(labels[i])])
        else:
            row += [str(int(v)) for v in (p.astype(np.float64) >= cut)]
            if labels is not None:
                row += [str(int(v)) for v in labels[i]]
        rows.append(row)
    return header, rows


def evaluate(model: FineTuned, probs: np.ndarray, labels) -> dict:
    """medjax.metrics on the predictions, plus, multi-label, the metrics at the model's operating points."""
    result = metrics.compute_metrics(model.task, np.asarray(probs, np.float64), labels, model.class_names)
    result["num_examples"] = int(len(labels))
    if model.task == "multilabel":
        result["at_thresholds"] = operating_points.thresholded_metrics(probs, labels, model.class_names,
                                                                       model.threshold_array())
    return result


def write_csv(path: str, header: list, rows: list) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w", newline="") as f:  # a full disk leaves neither a half file nor a temporary one
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_json(path: str, value) -> None:
    """`value` as JSON, written beside `path` and renamed into place (NaN written as null: strict JSON)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(_strict(value), f, indent=1, allow_nan=False)


def _strict(value):
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------------ command line


class CliParser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit status 2, like the other medjax commands
        print(f"error: {message} (python -m {self.prog.split()[-1]} --help)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m medjax.predict", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--workdir", required=True, help="a run's work directory, or a folder of medjax.export")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a medjax.data dataset name (with --root)")
    src.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders")
    src.add_argument("--csv", help="a CSV with a `path` column and optional labels")
    p.add_argument("--root", help="the dataset folder in its public layout (with --dataset)")
    p.add_argument("--split", default="test", help="the split of --dataset (default: test)")
    p.add_argument("--output", required=True, help="the CSV to write")
    p.add_argument("--tta", default="none", choices=tuple(TTA_VIEWS), help="test-time augmentation")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    p.add_argument("--metrics", help="also write the metrics (inputs with labels) to this JSON file")
    p.add_argument("--strict", action="store_true", help="stop (exit 2) on an unreadable image instead of skipping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_strict(records, channels: int) -> None:
    bad = checks.find_bad_images(records, "decode", channels).bad
    if bad:
        listed = "; ".join(f"{r.path}: {why}" for r, why in bad[:5])
        raise PredictError(f"{len(bad)} of {len(records)} image(s) cannot be read (--strict): {listed}"
                           + ("; ..." if len(bad) > 5 else ""))


def report_failures(failures: list, output: str) -> None:
    """One warning per unreadable image (the loader's own log line about it is held back: `quiet_load_warnings`)."""
    seen = set()
    for path, _origin, reason in failures:
        if path not in seen:
            seen.add(path)
            print(f"warning: {path}: {reason}; left out of {output}", file=sys.stderr)


class _NoSkipLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("skipped unreadable image")


@contextlib.contextmanager
def quiet_load_warnings():
    """Holds back the loader's "skipped unreadable image" log lines: predict and explain report each unreadable
    image once themselves (`report_failures`), naming the output it is left out of."""
    logger, quiet = logging.getLogger("medjax.data.transforms"), _NoSkipLines()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def say(message: str) -> None:
    """A phase of a command-line tool, one short line on stdout with the results (stderr carries only warnings and
    the one `error:` line of bad input)."""
    print(message, flush=True)


def error_line(e: BaseException) -> str:
    """The `error:` line of a user error or an OS error (no space, permission, is-a-directory...)."""
    text = outputs.os_error_line(e) if isinstance(e, OSError) else str(e)
    return "error: " + " ".join(text.split())


@cli_main
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.dataset and not args.root:
        parser().error("--dataset needs --root (the dataset folder)")
    failures, rows, labels = [], [], None
    try:
        outputs.check_file(args.output, "--output", "preds.csv")
        if args.metrics:
            outputs.check_file(args.metrics, "--metrics", "metrics.json")
            if os.path.abspath(args.metrics) == os.path.abspath(args.output):
                raise PredictError(f"--metrics {args.metrics} is the --output file; give another file")
        if args.csv and not os.path.isfile(args.csv):
            raise PredictError(f"--csv {args.csv}: " + ("a folder; expected a CSV file" if os.path.isdir(args.csv)
                                                        else "file not found"))
        if args.batch_size is not None and args.batch_size < 1:
            raise PredictError(f"--batch-size {args.batch_size}: expected a positive number")
        if args.dataset and not os.path.isdir(args.root):
            raise PredictError(f"--root {args.root}: no such folder")
        say(f"loading the model from {args.workdir} ...")
        model = load_model(args.workdir)
        if args.dataset:
            records, dataset = dataset_records(model, args.dataset, args.root, args.split)
            shown = [dataset.relative(r.path) for r in records]
            has_labels = True
        elif args.csv:
            records, has_labels, shown = csv_records(args.csv, model.class_names, model.task)
        else:
            records, has_labels = image_records(args.images, model), False
            shown = [r.path for r in records]
        if not records:
            raise PredictError("no images to predict")
        if args.strict:
            say(f"checking that {len(records)} image(s) can be read (--strict) ...")
            check_strict(records, model.channels)
        say(f"reading {len(records)} image(s) and predicting ...")
        with quiet_load_warnings():
            probs, ok, failures = predict(model, records, batch_size=args.batch_size, tta=args.tta,
                                          progress=not args.no_progress)
        if args.strict and failures:
            raise PredictError(f"{failures[0][0]}: {failures[0][2]} (--strict)")
        keep = np.flatnonzero(ok)
        if has_labels:
            labels = np.asarray([records[i].label for i in keep])
        header, rows = predictions_table(model, [shown[i] for i in keep], probs[keep], labels)
        write_csv(args.output, header, rows)
        report_failures(failures, args.output)
        print(f"{len(rows)} prediction(s) written to {args.output}" + (f"; {len(failures)} unreadable image(s) left "
                                                                      "out" if failures else ""))
        if labels is not None and len(labels):
            result = evaluate(model, probs[keep], labels)
            if model.target_metric:
                print(f"{model.target_metric}: {metrics.target_metric(model.target_metric, result)}")
            if args.metrics:
                write_json(args.metrics, result)
        elif args.metrics:
            print(f"warning: the inputs have no labels, so no metrics; {args.metrics} not written", file=sys.stderr)
    except (UserError, DataError, pretrained.PretrainedError, OSError) as e:
        print(error_line(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
