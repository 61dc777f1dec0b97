"""python -m medjax.report RUN_DIRS... --output DIR: the study's results table (SPEC section 2) with our numbers.

Each RUN_DIR is a run's work directory or a folder above several (searched for metrics.json). A run's cell (model,
dataset, head, freeze) comes from the `grid_cell.json` that `python -m medjax.grid` writes beside metrics.json (or a
`config.json` holding `grid_cell`); a run without one is named by its folder. Writes to DIR:

- `results.md`: rows = backbones (parameters in millions, ours and the study's), columns = the target metric of each
  dataset on the test split, ours beside the study's. The first table takes, per backbone and dataset, the head and
  freeze setting with the best VALIDATION metric (the study does not say which setting its numbers come from; picking
  by test would flatter us); one table per setting follows.
- `results.csv`: the same tables, one row per (setting, backbone).
- `runs.csv`: every run found, one per line.
- `<dataset>.png`: test target metric vs backbone parameters (log scale), ours per setting and the study's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field

from medjax import metrics as metrics_lib

METRICS_FILE, CELL_FILE, CONFIG_FILE = "metrics.json", "grid_cell.json", "config.json"

# The study's datasets in its table's column order: (dataset, column title, target metric)
COLUMNS = [
    ("ddsm", "DDSM ROC-AUC", "roc_auc"),
    ("chexpert", "CheXpert mean AUC", "mean_auc"),
    ("isic2019", "ISIC macro recall", "balanced_accuracy"),
    ("aptos2019", "APTOS quadratic kappa", "quadratic_kappa"),
]

# SPEC section 2: Mansoori et al. (arXiv 2505.19779), target metric on the test split, read off the study's figure
# (about +-0.002). name: (params M as the study states them, {dataset: value})
STUDY = {
    "VMamba-S": (50, {"ddsm": 0.938, "chexpert": 0.777, "isic2019": 0.756, "aptos2019": 0.872}),
    "VMamba-B": (89, {"ddsm": 0.941, "chexpert": 0.779, "isic2019": 0.763, "aptos2019": 0.879}),
    "SAM2-B+": (81, {"ddsm": 0.952, "chexpert": 0.798, "isic2019": 0.845, "aptos2019": 0.905}),
    "SAM2-L": (225, {"ddsm": 0.954, "chexpert": 0.801, "isic2019": 0.848, "aptos2019": 0.908}),
    "MAE-B": (86, {"ddsm": 0.943, "chexpert": 0.802, "isic2019": 0.844, "aptos2019": 0.903}),
    "MAE-L": (304, {"ddsm": 0.945, "chexpert": 0.805, "isic2019": 0.846, "aptos2019": 0.904}),
    "MAE-H": (632, {"ddsm": 0.941, "chexpert": 0.807, "isic2019": 0.847, "aptos2019": 0.901}),
    "CoCa-B": (89, {"ddsm": 0.939, "chexpert": 0.801, "isic2019": 0.837, "aptos2019": 0.901}),
    "CoCa-L": (307, {"ddsm": 0.942, "chexpert": 0.805, "isic2019": 0.839, "aptos2019": 0.902}),
    "DINOv2-B": (86, {"ddsm": 0.966, "chexpert": 0.812, "isic2019": 0.859, "aptos2019": 0.909}),
    "DINOv2-L": (300, {"ddsm": 0.965, "chexpert": 0.814, "isic2019": 0.861, "aptos2019": 0.913}),
    "AIMv2-L": (333, {"ddsm": 0.968, "chexpert": 0.813, "isic2019": 0.860, "aptos2019": 0.915}),
    "AIMv2-H": (666, {"ddsm": 0.966, "chexpert": 0.819, "isic2019": 0.863, "aptos2019": 0.909}),
}
BEST = "best by validation"


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

    @property
    def setting(self) -> str:
        return "no grid cell" if (self.head, self.freeze) == ("?", "?") else f"{self.head} / {self.freeze}"


# ------------------------------------------------------------------------------------------------- reading


def find_metrics(paths) -> list[str]:
    """metrics.json files in the given run folders (or below them), sorted; a missing path is an error."""
    found = []
    for p in paths:
        if os.path.isfile(p) and os.path.basename(p) == METRICS_FILE:
            found.append(p)
        elif os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "best", "tensorboard"))
                if METRICS_FILE in files:
                    found.append(os.path.join(root, METRICS_FILE))
        else:
            raise SystemExit(f"error: {p}: no such run folder or metrics.json")
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
        raise SystemExit(f"error: {metrics_path}: not a medjax metrics.json ({type(e).__name__}: {e})") from None
    cell = _cell(run_dir) or {}
    run = Run(path=run_dir, model=cell.get("backbone") or os.path.basename(run_dir), dataset=dataset,
              target_metric=target, head=cell.get("head", "?"), freeze=cell.get("freeze", "?"),
              params_m=cell.get("params_m"), val=_target(target, m.get("val")), test=_target(target, m.get("test")))
    if not cell:
        run.notes.append(f"no {CELL_FILE}: named by its folder")
    if cell.get("dataset") not in (None, dataset):
        run.notes.append(f"{CELL_FILE} says dataset {cell['dataset']}, metrics.json says {dataset}")
    if m.get("test") is None:
        run.notes.append("no test split result")
    return run


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


def model_order(runs: list[Run]) -> list[str]:
    """The study's rows in its order, then our other backbones by parameter count."""
    ours = {r.model: r.params_m for r in runs}
    extra = sorted((m for m in ours if m not in STUDY), key=lambda m: (_key(ours[m]) if ours[m] else math.inf, m))
    return list(STUDY) + extra


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


def markdown(runs: list[Run]) -> str:
    cols = columns_for(runs)
    order = model_order(runs)
    lines = ["# Results vs the study", "",
             "Target metric on the test split: ours, then the study's in parentheses (Mansoori et al., arXiv "
             "2505.19779, read off its figure, about ±0.002). Parameters in millions: ours (the converted backbone "
             "without head) / the study's. — : not run (or undefined).", ""]
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
            label = f"{model} ({_fmt(ours_p, 1)} / {study_p if study_p else '—'})"
            cells = []
            for dataset, _, _ in cols:
                r, s = mine.get(dataset), study_v.get(dataset)
                text = _fmt(r.test if r else None)
                if r and setting == BEST:
                    text += f" [{r.setting}]"
                if s is not None:
                    text += f" ({s:.3f})"
                cells.append(text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    notes = [f"- {r.path}: {n}" for r in runs for n in r.notes]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def write_results_csv(runs: list[Run], path: str):
    cols = columns_for(runs)
    header = ["setting", "model", "params_m", "study_params_m"]
    for _, title, _ in cols:
        header += [title, f"{title} (study)", f"{title} setting"]
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
                    row += ["" if r is None or r.test is None else round(r.test, 6),
                            study_v.get(dataset, ""), r.setting if r else ""]
                w.writerow(row)


def write_runs_csv(runs: list[Run], path: str):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "params_m", "dataset", "head", "freeze", "target_metric", "val", "test", "study", "path"])
        for r in sorted(runs, key=lambda r: (r.model, r.dataset, r.setting)):
            w.writerow([r.model, r.params_m, r.dataset, r.head, r.freeze, r.target_metric, r.val, r.test,
                        STUDY.get(r.model, (None, {}))[1].get(r.dataset, ""), r.path])


# ------------------------------------------------------------------------------------------------- figures


def plot_dataset(runs: list[Run], dataset: str, title: str, path: str):
    """Test target metric vs parameters (log x): the study's points in grey, ours one marker per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sx, sy, names = [], [], []
    for name, (p, values) in STUDY.items():
        if dataset in values:
            sx.append(p)
            sy.append(values[dataset])
            names.append(name)
    if sx:
        ax.scatter(sx, sy, c="0.6", marker="o", s=30, label="study", zorder=2)
        for x, y, n in zip(sx, sy, names):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color="0.45")
    markers = iter("s^Dvp*hX")
    mine = [r for r in runs if r.dataset == dataset and r.test is not None and r.params_m]
    for setting in sorted({r.setting for r in mine}):
        pts = sorted((r.params_m, r.test, r.model) for r in mine if r.setting == setting)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=next(markers, "o"), s=36, zorder=3,
                   label=f"ours: {setting}")
        for x, y, n in pts:
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(3, -8), fontsize=6)
    ax.set_xscale("log")
    xs = sx + [r.params_m for r in mine]
    if xs:
        ax.set_xticks([t for t in (10, 20, 50, 100, 200, 500, 1000, 2000) if min(xs) / 2 <= t <= max(xs) * 2])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("backbone parameters (M, log scale)")
    ax.set_ylabel(title)
    ax.set_title(f"{dataset}: {title} (test) vs parameters")
    ax.grid(True, which="both", alpha=0.3)
    if not (sx or mine):
        ax.text(0.5, 0.5, "no run with a known parameter count", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- entry


def report(paths, output: str) -> dict:
    """Reads the runs under `paths`, writes the tables and figures to `output`; returns {kind: path(s)}."""
    runs = dedupe([read_run(p) for p in find_metrics(paths)])
    if not runs:
        raise SystemExit(f"error: no {METRICS_FILE} under {', '.join(paths)}")
    os.makedirs(output, exist_ok=True)
    written = {"markdown": os.path.join(output, "results.md"), "csv": os.path.join(output, "results.csv"),
               "runs": os.path.join(output, "runs.csv"), "figures": []}
    with open(written["markdown"], "w") as f:
        f.write(markdown(runs))
    write_results_csv(runs, written["csv"])
    write_runs_csv(runs, written["runs"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("warning: matplotlib is not installed, so no figures (pip install matplotlib)", file=sys.stderr)
        return {**written, "num_runs": len(runs)}
    for dataset, title, _ in columns_for(runs):
        if any(r.dataset == dataset for r in runs):
            path = os.path.join(output, f"{dataset}.png")
            plot_dataset(runs, dataset, title, path)
            written["figures"].append(path)
    written["num_runs"] = len(runs)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run work directories, or folders above them")
    parser.add_argument("--output", required=True, help="where results.md, results.csv, runs.csv and PNGs go")
    args = parser.parse_args(argv)
    written = report(args.runs, args.output)
    print(f"{written['num_runs']} runs -> {written['markdown']}, {written['csv']}, {written['runs']}, "
          f"{len(written['figures'])} figure(s): {' '.join(written['figures'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
