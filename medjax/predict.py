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
import json
import logging
import math
import os
import sys
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from medjax import data, metrics, outputs, pretrained, schema, sharding, trained
from medjax import thresholds as operating_points
from medjax.data import DataError, Record, checks
from medjax.data.records import IMAGE_EXTENSIONS, read_csv, walk_images
from medjax.errors import UserError, atomic_write, cli_main
from medjax.trained import FineTuned, PredictError

TTA_VIEWS = {"none": ((False, False),),
             "flips": ((False, False), (False, True), (True, False), (True, True))}  # (vertical, horizontal)


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
        model = trained.load_model(args.workdir)
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
