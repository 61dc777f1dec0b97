"""python -m medjax.report RUN_DIRS... --output DIR: the studies' results tables with our numbers and their 95%
bootstrap intervals; python -m medjax.report compare RUN_A RUN_B: a paired bootstrap comparison of two runs.

Each RUN_DIR is a run's work directory or a folder above several (searched for metrics.json). A run's cell (model,
dataset, head, freeze, study) comes from the `grid_cell.json` that `python -m medjax.grid` writes beside
metrics.json (or a `config.json` holding `grid_cell`); a run without one is named by its folder. Writes to DIR:

- `results.md`: rows = backbones (parameters in millions, ours and the study's), columns = the target metric of each
  dataset on the test split, ours (with its 95% bootstrap interval where metrics.json has one) beside the study's.
  The first table takes, per backbone and dataset, the head and freeze setting with the best VALIDATION metric (the
  study does not say which setting its numbers come from; picking by test would flatter us); one table per setting
  follows. Then one section per companion study with runs (the glioma study's test accuracy, frozen and full; the
  radiology study's linear probes), foundation models first, baselines (†) beside them; then every scalar test
  metric of every run with its interval, and whether patients or images were resampled.
- `results.csv`: the reference study's tables, one row per (setting, backbone), interval bounds included.
- `runs.csv`: every run found, one per line; `intervals.csv`: every (run, test metric) with its interval.
- `<dataset>.png`: test target metric vs backbone parameters (log scale), ours per setting and the study's.

`compare RUN_A RUN_B` reads the two runs' `test_predictions.npz` (written at test time; a run folder or the file
itself), checks that they hold the same test images and labels, and prints for every scalar metric the value of each
run, the difference A - B with its percentile interval and a two-sided bootstrap p-value (medjax/bootstrap.py):
resamples of patients where the test records have ids, else of images, the same resamples for both runs.
`--resamples`, `--seed`, `--confidence` (defaults 1000, 0, 0.95), `--output FILE.json` keeps the result.

Bad input (a missing folder, a file that is not a medjax metrics.json or predictions file, runs on different test
sets) ends with one `error:` line naming the file and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from medjax import bootstrap as bootstrap_lib
from medjax import metrics as metrics_lib
from medjax import outputs, rundir
from medjax.errors import UserError, atomic_write, cli_main
from medjax.pretrained import METADATA_FILE

METRICS_FILE, CELL_FILE, CONFIG_FILE = rundir.METRICS, "grid_cell.json", "config.json"

# The study's datasets in its table's column order: (dataset, column title, target metric)
COLUMNS = [
    ("ddsm", "DDSM ROC-AUC", "roc_auc"),
    ("chexpert", "CheXpert mean AUC", "mean_auc"),
    ("isic2019", "ISIC macro recall", "balanced_accuracy"),
    ("aptos2019", "APTOS quadratic kappa", "quadratic_kappa"),
]

# SPEC section 2: Mansoori et al. (arXiv 2505.19779), target metric on the test split, read off the study's figure
# (about +-0.002), kept as a table in medjax/assets/studies/mansoori_2025.csv (one row per backbone in the study's
# order: name, params M as the study states them, one column per dataset of COLUMNS).
STUDY_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "studies", "mansoori_2025.csv")


def _read_study(path: str) -> dict[str, tuple[int, dict[str, float]]]:
    """name: (params M, {dataset: value})"""
    with open(path, newline="") as f:
        return {row["model"]: (int(row["params_m"]), {d: float(row[d]) for d, _, _ in COLUMNS})
                for row in csv.DictReader(f)}


STUDY = _read_study(STUDY_TABLE)
BEST = "best by validation"
REFERENCE_STUDIES = ("", "mansoori")  # runs of the reference study's grid, and runs without a grid cell
# configs/grid.py's next-generation table (DINOv3, SigLIP 2, MedSigLIP): in the reference study's tables, its rows
# beside DINOv2's (after the study's last DINOv2 row), marked ‡.
NEXT_GENERATION = "nextgen"

# The companion studies' sections (grid_cell.study): title, datasets in the study's order, the metric shown (None:
# each dataset's target metric), the freeze settings shown side by side.
SECTIONS = {
    "glioma": ("Fu et al.: the glioma study's protocol (Adam, no augmentation, best validation accuracy)",
               ("chest_xray_pneumonia", "ichallenge_amd", "ham10000", "isic2018"), "accuracy", ("frozen", "full")),
    "radiology": ("Baharoon et al.: the radiology study's linear probes (frozen features, head grid chosen on val)",
                  ("nih_chestxray14", "chexpert", "brain_tumor_figshare"), None, ("frozen",)),
}
# The order of the metrics in the intervals tables (the target metric first); others follow as found.
METRIC_ORDER = ("accuracy", "precision_weighted", "recall_weighted", "f1_weighted", "balanced_accuracy", "roc_auc",
                "precision_macro", "recall_macro", "f1_macro", "cohen_kappa", "quadratic_kappa", "mean_auc", "map",
                "subset_accuracy")


class ReportError(UserError):
    """A run folder or file the report cannot read; the message names it."""


@dataclass
class Run:
    path: str
    model: str  # the backbone's display name (the study's where it has one)
    dataset: str
    target_metric: str
    head: str = "?"
    freeze: str = "?"
    params_m: float | None = None
    val: float | None = None
    test: float | None = None
    notes: list = field(default_factory=list)
    study: str = ""  # the grid's study (mansoori, glioma, radiology); "" without a grid cell
    kind: str = "foundation"  # or "baseline"
    task: str = ""
    test_metrics: dict | None = None
    bootstrap: dict | None = None  # metrics.json `test_bootstrap`

    @property
    def setting(self) -> str:
        return "no grid cell" if (self.head, self.freeze) == ("?", "?") else f"{self.head} / {self.freeze}"

    def interval(self, key: str) -> dict | None:
        """The bootstrap entry {'value', 'low', 'high', ...} of test metric `key`, or None."""
        return ((self.bootstrap or {}).get("metrics") or {}).get(key)

    @property
    def target_key(self) -> str:
        try:
            return metrics_lib.target_key(self.target_metric, self.task)
        except ValueError:
            return self.target_metric

    @property
    def test_interval(self) -> dict | None:
        return self.interval(self.target_key)

    def value(self, metric: str | None) -> tuple[float | None, dict | None]:
        """(test value, interval entry) of `metric` (a target-metric name; None: the dataset's target metric)."""
        if metric is None:
            return self.test, self.test_interval
        try:
            key = metrics_lib.target_key(metric, self.task)
        except ValueError:
            return None, None
        return _target(metric, self.test_metrics), self.interval(key)


# ------------------------------------------------------------------------------------------------- reading


def find_metrics(paths) -> list[str]:
    """metrics.json files in the given run folders (or below them), sorted; a missing path is an error."""
    found = []
    for p in paths:
        if os.path.isfile(p) and os.path.basename(p) == METRICS_FILE:
            found.append(p)
        elif os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d not in (rundir.CHECKPOINTS, rundir.BEST, rundir.TENSORBOARD))
                if METRICS_FILE in files:
                    found.append(os.path.join(root, METRICS_FILE))
        else:
            raise ReportError(f"{p}: no such run folder or metrics.json")
    return sorted(set(found))


def _cell(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, CELL_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["cell"]
    path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f).get("grid_cell")
    return None


def _target(name: str, split_metrics) -> float | None:
    if not split_metrics:
        return None
    try:
        return metrics_lib.target_metric(name, split_metrics)
    except (ValueError, KeyError):
        return None


def read_run(metrics_path: str) -> Run:
    run_dir = os.path.dirname(os.path.abspath(metrics_path))
    try:
        with open(metrics_path) as f:
            m = json.load(f)
        dataset, target = m["dataset"], m["target_metric"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{metrics_path}: not a medjax metrics.json ({type(e).__name__}: {e})") from None
    try:
        cell = _cell(run_dir) or {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReportError(f"{run_dir}/{CELL_FILE}: not a grid cell file ({type(e).__name__}: {e})") from None
    run = Run(path=run_dir, model=cell.get("backbone") or os.path.basename(run_dir), dataset=dataset,
              target_metric=target, head=cell.get("head", "?"), freeze=cell.get("freeze", "?"),
              params_m=cell.get("params_m"), val=_target(target, m.get("val")), test=_target(target, m.get("test")),
              study=cell.get("study", "mansoori" if cell else ""), kind=cell.get("kind", "foundation"),
              task=m.get("task") or (m.get("test") or {}).get("task", ""), test_metrics=m.get("test"),
              bootstrap=m.get("test_bootstrap") if isinstance(m.get("test_bootstrap"), dict) else None)
    if not cell:
        run.notes.append(f"no {CELL_FILE}: named by its folder")
    if run.params_m is None:
        run.params_m = run_params_m(run_dir)
    if cell.get("dataset") not in (None, dataset):
        run.notes.append(f"{CELL_FILE} says dataset {cell['dataset']}, metrics.json says {dataset}")
    if m.get("test") is None:
        run.notes.append("no test split result")
    return run


def run_params_m(run_dir: str) -> float | None:
    """The backbone's parameters in millions as the grid counts them (the converted backbone, no head), for a run
    without a grid cell: `num_params` of the converted folder its `run_config.json` names (`model.pretrained`, or the
    run's own `backbone/` copy); None when neither is there (e.g. a randomly initialised architecture)."""
    candidates = []
    try:
        with open(rundir.path(run_dir, rundir.RUN_CONFIG)) as f:
            flat = json.load(f)
        if isinstance(flat, dict) and isinstance(flat.get("model.pretrained"), str) and flat["model.pretrained"]:
            candidates.append(flat["model.pretrained"])
    except (OSError, ValueError):
        pass
    candidates.append(rundir.path(run_dir, rundir.BACKBONE))
    for folder in candidates:
        try:
            with open(os.path.join(folder, METADATA_FILE)) as f:
                n = json.load(f).get("num_params")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(n, (int, float)) and n > 0:
            return round(n / 1e6, 6)
    return None


def dedupe(runs: list[Run]) -> list[Run]:
    """One run per (model, dataset, setting): the best validation value wins, the others are reported."""
    kept: dict[tuple, Run] = {}
    for r in runs:
        key = (r.model, r.dataset, r.setting)
        old = kept.get(key)
        if old is None or _key(r.val) > _key(old.val):
            if old is not None:
                print(f"note: {old.path} and {r.path} are the same cell; keeping {r.path} (better val)",
                      file=sys.stderr)
            kept[key] = r
        else:
            print(f"note: {old.path} and {r.path} are the same cell; keeping {old.path} (better val)", file=sys.stderr)
    return list(kept.values())


def _key(v):
    return -math.inf if v is None else v


# ------------------------------------------------------------------------------------------------- tables


def columns_for(runs: list[Run]) -> list[tuple[str, str, str]]:
    """The study's four columns, then any other dataset found (e.g. cbis_ddsm or a user's csv set)."""
    cols = list(COLUMNS)
    for r in runs:
        if r.dataset not in [c[0] for c in cols]:
            cols.append((r.dataset, f"{r.dataset} {r.target_metric}", r.target_metric))
    return cols


def next_generation(runs: list[Run]) -> set[str]:
    """The models of the next-generation table's runs (not rows of the study)."""
    return {r.model for r in runs if r.study == NEXT_GENERATION and r.model not in STUDY}


def model_order(runs: list[Run]) -> list[str]:
    """The study's rows in its order with the next-generation models beside DINOv2 (by parameter count), then our
    other backbones by parameter count."""
    ours = {r.model: r.params_m for r in runs}
    nextgen = next_generation(runs)

    def by_params(m):
        return _key(ours[m]) if ours[m] else math.inf, m

    extra = sorted((m for m in ours if m not in STUDY and m not in nextgen), key=by_params)
    rows = list(STUDY)
    at = max(i for i, m in enumerate(rows) if m.startswith("DINOv2")) + 1
    return rows[:at] + sorted(nextgen, key=by_params) + rows[at:] + extra


def tables(runs: list[Run]) -> dict[str, dict[str, dict[str, Run]]]:
    """{setting: {model: {dataset: run}}}, with BEST first: per model and dataset the run with the best val."""
    out: dict[str, dict[str, dict[str, Run]]] = {BEST: {}}
    for r in runs:
        out.setdefault(r.setting, {}).setdefault(r.model, {})[r.dataset] = r
        best = out[BEST].setdefault(r.model, {})
        if r.dataset not in best or _key(r.val) > _key(best[r.dataset].val):
            best[r.dataset] = r
    return {BEST: out.pop(BEST), **dict(sorted(out.items()))}


def _params(model: str, runs_of_model: dict[str, Run]) -> float | None:
    return next((r.params_m for r in runs_of_model.values() if r.params_m is not None), None)


def _fmt(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _fmt_ci(v, entry, digits=3) -> str:
    """'0.912 (95% CI 0.894–0.930)', or the value alone without an interval."""
    text = _fmt(v, digits)
    if v is not None and entry and entry.get("low") is not None:
        text += f" ({_pct(entry)} CI {entry['low']:.{digits}f}–{entry['high']:.{digits}f})"
    return text


def _pct(entry_or_record) -> str:
    return f"{100 * float(entry_or_record.get('confidence', 0.95)):g}%"


def markdown(all_runs: list[Run]) -> str:
    runs = reference_runs(all_runs)
    cols = columns_for(runs)
    order, marked = model_order(runs), next_generation(runs)
    lines = ["# Results vs the study", ""]
    if not runs:  # only companion-study runs: their sections follow
        lines = lines[:1] + [""] + [x for study in SECTIONS for x in companion_section(all_runs, study)]
        return "\n".join(lines + intervals_section(all_runs) + _notes(all_runs))
    lines += ["Target metric on the test split: ours (with its 95% percentile bootstrap interval where the run has "
             "one), then the study's in parentheses (Mansoori et al., arXiv 2505.19779, read off its figure, about "
             "±0.002). Parameters in millions: ours (the converted backbone without head) / the study's. — : not "
             "run (or undefined)." + (" ‡ : a next-generation backbone beyond the study (configs/grid.py "
                                      "`NEXT_GENERATION`), beside DINOv2." if marked else ""), ""]
    for setting, table in tables(runs).items():
        title = ("Best setting per cell, chosen by the validation metric (setting in brackets)" if setting == BEST
                 else f"Setting: {setting}" + (" (head / backbone)" if "/" in setting else ""))
        lines += [f"## {title}", "", "| model (params M) | " + " | ".join(c[1] for c in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for model in order:
            mine = table.get(model, {})
            if setting != BEST and not mine:
                continue
            study_p, study_v = STUDY.get(model, (None, {}))
            ours_p = _params(model, mine)
            label = f"{model}{' ‡' if model in marked else ''} ({_fmt(ours_p, 1)} / {study_p if study_p else '—'})"
            cells = []
            for dataset, _, _ in cols:
                r, s = mine.get(dataset), study_v.get(dataset)
                text = _fmt_ci(r.test, r.test_interval) if r else _fmt(None)
                if r and setting == BEST:
                    text += f" [{r.setting}]"
                if s is not None:
                    text += f" ({s:.3f})"
                cells.append(text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    for study in SECTIONS:
        lines += companion_section(all_runs, study)
    lines += intervals_section(all_runs)
    return "\n".join(lines + _notes(all_runs))


def _notes(runs: list[Run]) -> list[str]:
    notes = [f"- {r.path}: {n}" for r in runs for n in r.notes]
    return ["## Notes", "", *notes, ""] if notes else []


def reference_runs(runs: list[Run]) -> list[Run]:
    """The runs of the reference study's tables: its grid's, and runs without a grid cell."""
    return [r for r in runs if r.study in REFERENCE_STUDIES or r.study not in SECTIONS]


def _row_order(runs: list[Run]) -> list[tuple[str, str, float | None]]:
    """(model, kind, params): foundation models first, then baselines, each by parameter count."""
    seen: dict[str, tuple[str, float | None]] = {}
    for r in runs:
        seen.setdefault(r.model, (r.kind, r.params_m))
    return sorted(((m, k, p) for m, (k, p) in seen.items()),
                  key=lambda x: (x[1] == "baseline", x[2] if x[2] is not None else math.inf, x[0]))


def companion_section(all_runs: list[Run], study: str) -> list[str]:
    """A companion study's table: its models (foundation first, baselines marked †) x its datasets (x freeze)."""
    runs = [r for r in all_runs if r.study == study]
    if not runs:
        return []
    title, datasets, metric, freezes = SECTIONS[study]
    datasets = list(datasets) + sorted({r.dataset for r in runs} - set(datasets))
    columns = [(d, f) for d in datasets for f in freezes]
    what = metric or "each dataset's target metric"
    lines = [f"## {title}", "",
             f"Test {what}, ours with its 95% percentile bootstrap interval (resampled by patient where the test "
             "records have patient ids). † : a baseline the study compares the foundation models with. — : not run "
             "(or undefined).", "",
             "| model (params M) | " + " | ".join(
                 f"{d} {metric or _target_of(runs, d)}".strip() + (f" ({f})" if len(freezes) > 1 else "")
                 for d, f in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    by_cell: dict[tuple, Run] = {}
    for r in runs:
        key = (r.model, r.dataset, r.freeze)
        if key not in by_cell or _key(r.val) > _key(by_cell[key].val):
            by_cell[key] = r
    for model, kind, params in _row_order(runs):
        label = f"{model}{' †' if kind == 'baseline' else ''} ({_fmt(params, 1)})"
        cells = []
        for d, f in columns:
            r = by_cell.get((model, d, f))
            cells.append(_fmt_ci(*r.value(metric)) if r else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _target_of(runs: list[Run], dataset: str) -> str:
    return next((r.target_metric for r in runs if r.dataset == dataset), "")


def interval_metrics(runs: list[Run]) -> list[str]:
    """The scalar test metrics with intervals in these runs: the target metric first, then METRIC_ORDER."""
    found = {k for r in runs for k in ((r.bootstrap or {}).get("metrics") or {})}
    first = [r.target_key for r in runs if r.target_key in found][:1]
    return first + [k for k in METRIC_ORDER if k in found and k not in first] + sorted(
        found - set(METRIC_ORDER) - set(first))


def intervals_section(runs: list[Run]) -> list[str]:
    """Per dataset, every run with bootstrap intervals: every scalar test metric with its interval."""
    with_ci = [r for r in runs if r.bootstrap and r.bootstrap.get("metrics")]
    if not with_ci:
        return []
    lines = ["## Every test metric with its 95% percentile bootstrap interval", "",
             "The value is the metric of the whole test split; the interval comes from resampling patients (where "
             "the test records have patient ids; lesions for HAM10000 / ISIC 2018) or images, seeded "
             "(metrics.json `test_bootstrap`).", ""]
    for dataset in sorted({r.dataset for r in with_ci}):
        mine = sorted((r for r in with_ci if r.dataset == dataset),
                      key=lambda r: (r.study, r.kind == "baseline", r.model, r.setting))
        names = interval_metrics(mine)
        lines += [f"### {dataset}", "", "| model | setting | resampled | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 3) + "|"]
        for r in mine:
            b = r.bootstrap
            unit = f"{b.get('num_units')} {b.get('unit', '?')}s x {b.get('resamples')}"
            cells = [bootstrap_lib.fmt_interval(r.interval(n)) for n in names]
            lines.append(f"| {r.model}{' †' if r.kind == 'baseline' else ''} | {r.setting} | {unit} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_intervals_csv(runs: list[Run], path: str):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "dataset", "study", "kind", "head", "freeze", "metric", "value", "low", "high", "mean",
                    "std", "undefined_resamples", "confidence", "resamples", "seed", "unit", "num_units", "path"])
        for r in sorted(runs, key=lambda r: (r.dataset, r.model, r.setting)):
            b = r.bootstrap or {}
            for name, e in (b.get("metrics") or {}).items():
                w.writerow([r.model, r.dataset, r.study, r.kind, r.head, r.freeze, name, e.get("value"),
                            e.get("low"), e.get("high"), e.get("mean"), e.get("std"), e.get("undefined_resamples"),
                            b.get("confidence"), b.get("resamples"), b.get("seed"), b.get("unit"),
                            b.get("num_units"), r.path])


def write_results_csv(runs: list[Run], path: str):
    runs = reference_runs(runs)
    cols = columns_for(runs)
    header = ["setting", "model", "params_m", "study_params_m"]
    for _, title, _ in cols:
        header += [title, f"{title} (study)", f"{title} setting", f"{title} low", f"{title} high"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for setting, table in tables(runs).items():
            for model in model_order(runs):
                mine = table.get(model, {})
                if setting != BEST and not mine:
                    continue
                study_p, study_v = STUDY.get(model, (None, {}))
                p = _params(model, mine)
                row = [setting, model, "" if p is None else p, "" if study_p is None else study_p]
                for dataset, _, _ in cols:
                    r = mine.get(dataset)
                    ci = (r.test_interval if r else None) or {}
                    row += ["" if r is None or r.test is None else round(r.test, 6),
                            study_v.get(dataset, ""), r.setting if r else "",
                            "" if ci.get("low") is None else round(ci["low"], 6),
                            "" if ci.get("high") is None else round(ci["high"], 6)]
                w.writerow(row)


def write_runs_csv(runs: list[Run], path: str):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "params_m", "dataset", "head", "freeze", "target_metric", "val", "test", "study", "path",
                    "test_low", "test_high", "resampled", "grid_study", "kind"])
        for r in sorted(runs, key=lambda r: (r.model, r.dataset, r.setting)):
            ci, b = r.test_interval or {}, r.bootstrap or {}
            w.writerow([r.model, r.params_m, r.dataset, r.head, r.freeze, r.target_metric, r.val, r.test,
                        STUDY.get(r.model, (None, {}))[1].get(r.dataset, "") if r.study in REFERENCE_STUDIES else "",
                        r.path, ci.get("low", ""), ci.get("high", ""), b.get("unit", ""), r.study, r.kind])


# ------------------------------------------------------------------------------------------------- figures


def plot_dataset(runs: list[Run], dataset: str, title: str, path: str) -> dict:
    """Test target metric vs parameters (log x): the study's points in grey, ours one marker per setting (runs
    without a grid cell too, with the parameter count of their converted backbone). The point labels are moved
    apart where they would overlap, the legend sits outside the axes. Returns {'labels': [(text, (x0, y0, x1, y1))]
    in figure pixels, 'left_out': runs without a parameter count}."""
    matplotlib.use("Agg")
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=120)
    labels = []
    sx, sy, names = [], [], []
    for name, (p, values) in STUDY.items():
        if dataset in values:
            sx.append(p)
            sy.append(values[dataset])
            names.append(name)
    if sx:
        ax.scatter(sx, sy, c="0.6", marker="o", s=30, label="study", zorder=2)
        for x, y, n in zip(sx, sy, names):
            labels.append(ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 2), fontsize=6,
                                      color="0.45"))
    markers = iter("s^Dvp*hX")
    tested = [r for r in runs if r.dataset == dataset and r.test is not None]
    mine = [r for r in tested if r.params_m]
    for setting in sorted({r.setting for r in mine}):
        pts = sorted((r.params_m, r.test, r.model) for r in mine if r.setting == setting)
        legend = "ours: runs without a grid cell" if setting == "no grid cell" else f"ours: {setting}"
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=next(markers, "o"), s=36, zorder=3, label=legend)
        for x, y, n in pts:
            labels.append(ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, -8), fontsize=6))
    ax.set_xscale("log")
    xs = sx + [r.params_m for r in mine]
    if xs:
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 1.6, hi * 1.6)
        ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
                 if lo / 1.6 <= t <= hi * 1.6]
        ax.set_xticks(ticks or [lo])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("backbone parameters (M, log scale)")
    ax.set_ylabel(title)
    ax.set_title(f"{dataset}: {title} (test) vs parameters")
    ax.grid(True, which="both", alpha=0.3)
    left_out = [r for r in tested if not r.params_m]
    if left_out:
        ax.text(0.01, 0.01, f"not shown ({len(left_out)}, no parameter count): "
                + ", ".join(sorted({r.model for r in left_out}))[:90], transform=ax.transAxes, fontsize=6,
                color="0.3", va="bottom")
    if not (sx or mine):
        ax.text(0.5, 0.5, "no run with a known parameter count", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    boxes = _spread_labels(fig, ax, labels)
    fig.savefig(path)
    plt.close(fig)
    return {"labels": boxes, "left_out": [r.path for r in left_out]}


def _spread_labels(fig, ax, labels, step: float = 3.0, tries: int = 40) -> list:
    """Places each point label (top points first) at the nearest free spot: right of its point, else left of it,
    moved up or down in steps of `step` points, so that its box overlaps no label placed before it, no point marker,
    and stays inside the axes. A label moved away from its point gets a thin leader line. Returns
    [(text, (x0, y0, x1, y1))] of the final boxes in figure pixels."""
    def text_box(ann):  # the text alone (an Annotation's own extent includes its leader line)
        ann.update_positions(renderer)
        return Text.get_window_extent(ann, renderer)

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    radius = 3.5 * fig.dpi / 72  # a marker of size 30-36 is about 6 points across
    markers = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)
               for x, y in (ax.transData.transform(a.xy) for a in labels)]
    placed, out = [], []
    order = sorted(labels, key=lambda a: (-ax.transData.transform(a.xy)[1], a.get_text()))
    for ann in order:
        x0, y0 = ann.xyann
        width = text_box(ann).width * 72 / fig.dpi
        best = None
        for k in range(tries):
            dy = ((k + 1) // 2) * step * (1 if k % 2 else -1)
            for dx in (x0, -x0 - width):
                ann.xyann = (dx, y0 + dy)
                box = text_box(ann)
                fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
                if fits and not any(box.overlaps(b) for b in placed + markers):
                    best = (dx, y0 + dy)
                    break
            if best:
                break
        ann.xyann = best or (x0, y0)
        box = text_box(ann)
        if best and abs(best[1] - y0) > step:  # the same label again, with a leader line to its point
            ann.remove()
            ann = ax.annotate(ann.get_text(), ann.xy, textcoords="offset points", xytext=best,
                              fontsize=ann.get_fontsize(), color=ann.get_color(),
                              arrowprops={"arrowstyle": "-", "lw": 0.4, "color": ann.get_color(), "shrinkA": 0,
                                          "shrinkB": 2})
            box = text_box(ann)
        placed.append(box)
        out.append((ann.get_text(), (float(box.x0), float(box.y0), float(box.x1), float(box.y1))))
    return out


# ------------------------------------------------------------------------------------------------- entry


def report(paths, output: str) -> dict:
    """Reads the runs under `paths`, writes the tables and figures to `output`; returns {kind: path(s)}."""
    runs = dedupe([read_run(p) for p in find_metrics(paths)])
    if not runs:
        raise ReportError(f"no {METRICS_FILE} under {', '.join(paths)}")
    os.makedirs(output, exist_ok=True)
    written = {"markdown": os.path.join(output, "results.md"), "csv": os.path.join(output, "results.csv"),
               "runs": os.path.join(output, "runs.csv"), "intervals": os.path.join(output, "intervals.csv"),
               "figures": [], "runs_found": runs}
    with open(written["markdown"], "w") as f:
        f.write(markdown(runs))
    write_results_csv(runs, written["csv"])
    write_runs_csv(runs, written["runs"])
    write_intervals_csv(runs, written["intervals"])
    written["num_runs"] = len(runs)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("warning: matplotlib is not installed, so no figures (pip install matplotlib)", file=sys.stderr)
        return written
    for dataset, title, _ in columns_for(runs):
        if any(r.dataset == dataset for r in runs):
            path = os.path.join(output, f"{dataset}.png")
            placed = plot_dataset(runs, dataset, title, path)
            written["figures"].append(path)
            if placed["left_out"]:
                print(f"note: {path}: {len(placed['left_out'])} run(s) left out, no parameter count (no converted "
                      "backbone folder): " + ", ".join(placed["left_out"][:5]), file=sys.stderr)
    return written


# ------------------------------------------------------------------------------------------------- compare


def predictions_path(path: str) -> str:
    """A run folder's test_predictions.npz, or the file itself."""
    if os.path.isdir(path):
        return os.path.join(path, bootstrap_lib.PREDICTIONS_FILE)
    if os.path.isfile(path):
        return path
    raise ReportError(f"{path}: no such run folder or {bootstrap_lib.PREDICTIONS_FILE}")


def _run_name(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        cell = _cell(folder)
    except (OSError, ValueError, KeyError, TypeError):
        cell = None
    return f"{cell['backbone']} {cell['head']} / {cell['freeze']} ({folder})" if cell else folder


def compare_runs(run_a: str, run_b: str, resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """The paired bootstrap of two runs' test predictions (medjax.bootstrap.compare), with the runs named."""
    paths = [predictions_path(p) for p in (run_a, run_b)]
    a, b = (bootstrap_lib.read_predictions(p) for p in paths)
    for path, run in zip(paths, (a, b)):
        probs = np.asarray(run["probs"])
        if not np.issubdtype(probs.dtype, np.number) or not np.isfinite(probs).all():
            bad = "not numbers" if not np.issubdtype(probs.dtype, np.number) else \
                f"{int((~np.isfinite(probs)).sum())} NaN or infinite value(s)"
            raise ReportError(f"{path}: field 'probs' holds {bad}; expected probabilities from a finished run")
    out = bootstrap_lib.compare(a, b, resamples=resamples, seed=seed, confidence=confidence)
    return {"a": _run_name(paths[0]), "b": _run_name(paths[1]), "a_file": paths[0], "b_file": paths[1],
            "dataset": a["dataset"], **out}


def compare_text(result: dict) -> str:
    pct = f"{100 * result['confidence']:g}%"
    lines = [f"A: {result['a']}", f"B: {result['b']}",
             f"{result['dataset']} test split: {result['num_images']} images in {result['num_units']} "
             f"{result['unit']}s; {result['resamples']} paired resamples, seed {result['seed']}; {result['note']}",
             "",
             f"{'metric':<20} {'A':>8} {'B':>8} {'A - B':>9}  {pct + ' CI':<21} {'p':>7}"]

    def num(v, sign=False):
        return "—" if v is None else (f"{v:+.4f}" if sign else f"{v:.4f}")

    for name, row in result["metrics"].items():
        ci = "—" if row["low"] is None else f"[{row['low']:+.4f}, {row['high']:+.4f}]"
        p = "—" if row["p_value"] is None else f"{row['p_value']:.4f}"
        lines.append(f"{name:<20} {num(row['a']):>8} {num(row['b']):>8} {num(row['difference'], True):>9}  "
                     f"{ci:<21} {p:>7}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- entry


def _compare_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.report compare",
                                     description="Paired bootstrap of two runs on the same test split: A - B per "
                                                 "metric with its percentile interval and p-value.")
    parser.add_argument("run_a", metavar="RUN_A", help="a run folder (holding test_predictions.npz) or the file")
    parser.add_argument("run_b", metavar="RUN_B")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the resamples' seed (default 0)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    parser.add_argument("--output", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if args.output:
        outputs.check_file(args.output, "--output", "compare.json")
    result = compare_runs(args.run_a, args.run_b, args.resamples, args.seed, args.confidence)
    print(compare_text(result))
    if args.output:
        _write_text(args.output, json.dumps(result, indent=2))
    return 0


def _write_text(path: str, text: str) -> None:
    """`text` written beside `path` and renamed into place: an interrupted write never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(text)


@cli_main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:
            return _compare_main(argv[1:])
        parser = argparse.ArgumentParser(prog="python -m medjax.report", description=__doc__.split("\n\n")[0],
                                         epilog="python -m medjax.report compare RUN_A RUN_B: the paired "
                                                "comparison (see --help there).")
        parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run work directories, or folders above them")
        parser.add_argument("--output", required=True, help="where results.md, the CSVs and the PNGs go")
        args = parser.parse_args(argv)
        outputs.check_folder(args.output)
        written = report(args.runs, args.output)
    except (UserError, OSError) as e:
        text = outputs.os_error_line(e) if isinstance(e, OSError) else str(e)
        print(f"error: {' '.join(text.split())}", file=sys.stderr)
        return 2
    print(f"{written['num_runs']} runs -> {written['markdown']}, {written['csv']}, {written['runs']}, "
          f"{written['intervals']}, {len(written['figures'])} figure(s): {' '.join(written['figures'])}")
    for r in sorted(written["runs_found"], key=lambda r: (r.dataset, r.study, r.model, r.setting)):
        if r.test_interval:
            b = r.bootstrap
            print(f"  {r.dataset} {r.model} [{r.setting}]: test {r.target_metric} "
                  f"{bootstrap_lib.fmt_interval(r.test_interval, 4)} ({_pct(b)} CI, {b['num_units']} {b['unit']}s "
                  f"x {b['resamples']} resamples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
