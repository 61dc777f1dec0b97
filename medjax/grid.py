"""python -m medjax.grid list|run|cell|probe|plan: the cells of the benchmark grid (configs/grid.py), listed or run.

    python -m medjax.grid list [--filter model=dinov2_*,dataset=chexpert] [--filter study=glioma]
    python -m medjax.grid run --filter model=dinov2_b,head=linear [--dry-run] [--workdir-root runs] [-- --config.x=y]
    python -m medjax.grid cell model=dinov2_b,dataset=chexpert,head=linear,freeze=frozen --workdir DIR
    python -m medjax.grid probe model=resnet152,dataset=chexpert,head=probe,freeze=frozen --workdir DIR
    python -m medjax.grid fetch [--filter model=dinov2_b] [--weights-dir DIR]
    python -m medjax.grid plan --topology v5e:2x4 [--mfu 0.4] [--filter study=mansoori]  # chip-hours

`list` prints one cell per line with its study and config argument. `run` runs each selected cell, one after the
other, in `{workdir-root}/{model}/{dataset}/{head}_{freeze}`: `python -m medjax.main` for trained cells, `python -m
medjax.grid probe` for the radiology study's linear probes (head `probe`); a cell whose work directory already
holds metrics.json is skipped (unless its grid_cell.json marks it failed), an unfinished one resumes from its
checkpoint (a probe from its cached features). Each cell runs in its own process group: SIGTERM / Ctrl-C to the grid
go to the cell's run, which saves and stops, then the grid stops with one line (exit 143 / 130); if the grid dies,
the cell's run gets SIGTERM. A cell that fails is marked `"status": "failed"` in its grid_cell.json and run again
by the next `grid run`.
Before a cell runs, its identity is written to `grid_cell.json` in its work directory (what `python -m
medjax.report` reads); `cell` writes that file alone, for runs started another way (the launch scripts). A filter is
`key=pattern[|pattern...]` items joined by commas; patterns are shell-style (`dinov2_*`), keys are model, dataset,
head, freeze and study (mansoori, glioma, radiology).

`fetch` downloads, verifies and converts the official weights the selected cells need (`medjax.weights`: the
registry names behind the cells' folders, the DeiT-B body for attention cells), says their total size first, and
links each cached folder into the cells' `weights_dir` (`{weights_dir}/{folder}`) where nothing is there yet.

`probe` runs the linear-probe protocol (medjax.protocols: frozen features cached in the work directory, the head
grid trained at once, selection on validation, retrain on train + val, test once) for one cell and writes
metrics.json and test_predictions.npz as the trainer does, bootstrap intervals included. Bad input ends with one
`error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import fnmatch
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys

import numpy as np

from medjax import bootstrap, data, metrics, rundir, schema, studies
from medjax.data import fake
from medjax.errors import UserError, atomic_write, cli_main
from medjax.protocols import features, linear_probe
from medjax.weights import fetch as weights
from medjax.weights import registry

CELL_FILE = "grid_cell.json"
METRICS_FILE = rundir.METRICS
DEFAULT_GRID = "configs/grid.py"
INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # a cell's run stopped by a signal (saved, resumable)


class GridInterrupted(Exception):
    """`grid run` was stopped by SIGTERM / SIGINT while a cell ran; the cell's run saved and stopped with it."""

    def __init__(self, signum: int, arg: str):
        self.signum, self.arg = signum, arg
        super().__init__(f"grid run stopped ({signal.Signals(signum).name}) during cell {arg}; its run saved its step "
                         "and stopped; run the same command to resume")


def load_grid(path: str | None = None):
    """The grid's tables and cells: `medjax.studies` for medjax's own grid (`grid`, `configs/grid.py`), or a grid
    file of the user's by path (a module with the same names)."""
    resolved = schema.recipe_path(path or DEFAULT_GRID)
    if os.path.samefile(resolved, os.path.join(schema.recipes_dir(), "grid.py")):
        return studies
    spec = importlib.util.spec_from_file_location("medjax_grid_config", resolved)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_filter(text: str | None, axes: dict) -> dict:
    """'model=dinov2_*|mae_b,head=linear' -> {'model': ['dinov2_*', 'mae_b'], 'head': ['linear']}; a pattern that
    matches no value of its axis is an error (a typo would otherwise select nothing, silently)."""
    selected: dict[str, list[str]] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in axes:
            raise SystemExit(f"error: bad filter item {item!r}; expected key=pattern with key in {', '.join(axes)}")
        patterns = [p.strip() for p in value.split("|") if p.strip()]
        for p in patterns:
            if not any(fnmatch.fnmatchcase(v, p) for v in axes[key]):
                raise SystemExit(f"error: filter {key}={p!r} matches nothing; {key} is one of {', '.join(axes[key])}")
        selected.setdefault(key, []).extend(patterns)
    return selected


def select(cells: list[dict], selected: dict) -> list[dict]:
    return [c for c in cells
            if all(any(fnmatch.fnmatchcase(c[k], p) for p in pats) for k, pats in selected.items())]


def cell_workdir(root: str, cell: dict) -> str:
    return os.path.join(root, cell["model"], cell["dataset"], f"{cell['head']}_{cell['freeze']}")


def main_command(grid_path: str, arg: str, workdir: str, overrides=(), distributed=False,
                 python: str = "python") -> list[str]:
    if "head=probe" in arg.split(","):  # the radiology study's linear probe: the protocol, on one host
        return [python, "-m", "medjax.grid", "--grid", grid_path, "probe", arg, "--workdir", workdir,
                *(["--", *overrides] if overrides else [])]
    cmd = [python, "-m", "medjax.main", f"--config={grid_path}:{arg}", f"--workdir={workdir}", *overrides]
    return cmd + (["--distributed"] if distributed else [])


def write_cell_file(workdir: str, config, command=None, status: dict | None = None) -> str:
    """`grid_cell.json` in the work directory: the cell, its config argument and the full config (JSON); `status`
    ({'status': 'failed', 'returncode': N}) marks a cell whose run failed."""
    os.makedirs(workdir, exist_ok=True)
    record = {"cell": config.grid_cell.to_dict(), "config": json.loads(config.to_json_best_effort()),
              "command": command, **(status or {})}
    path = os.path.join(workdir, CELL_FILE)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # every host of a pod may write it to a shared folder
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    return path


def apply_overrides(config, overrides, strict: bool = False):
    """--config.a.b=value overrides as config_flags applies them (for the config stored in grid_cell.json). Lenient
    by default (the run itself reports a bad override); strict (the probe, which is the run) raises ValueError
    naming the closest declared field."""
    for item in overrides:
        key, _, text = item[len("--config."):].partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        try:
            schema.override(config, key, value)
        except schema.ConfigError as e:
            if strict:
                raise ValueError(str(e)) from None
        except (TypeError, AttributeError) as e:
            if strict:
                raise ValueError(f"--config.{key}={value!r}: {e}") from None
    return config


# ------------------------------------------------------------------------------------------------ linear probes


def run_probe(config, workdir: str, log=None) -> dict:
    """The radiology study's linear probe for a grid cell (configs/grid.py `probe` section): features of the
    converted backbone cached in `workdir/features`, the head grid on train, the best head on validation retrained on
    train + val, tested once. Writes metrics.json (the trainer's layout, with the protocol's grid and choice) and
    test_predictions.npz with the bootstrap intervals; returns the metrics dict."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    schema.validate(config)
    if config.grid_cell.head != "probe":
        raise ValueError(f"{config.grid_cell.arg}: not a linear-probe cell (head=probe); run it with medjax.main")
    os.makedirs(workdir, exist_ok=True)
    if config.fake_data and not os.path.exists(config.data_root):
        log(f"writing {config.fake_data} synthetic {config.dataset} images to {config.data_root}")
        fake.write_once(config.dataset, config.data_root, config.fake_data, seed=config.seed)
    ds = data.get_dataset(config.dataset, config.data_root, workdir=workdir, seed=config.seed,
                          **schema.data_options(config))
    missing = [s for s in ("train", "val", "test") if s not in ds.splits]
    if missing:
        raise ValueError(f"{ds.name} at {config.data_root} has no {', '.join(missing)} split; the linear probe needs "
                         "train, val and test")
    p = config.probe
    feats, info = features.cached_features(config.model.pretrained, ds, ("train", "val", "test"), workdir,
                                           image_size=config.image_size, num_blocks=max(p.blocks),
                                           batch_size=p.extract_batch_size, normalization=config.normalization,
                                           grayscale=config.model.grayscale, worker_count=config.worker_count, log=log)
    r, probs = linear_probe.run(feats, workdir, task=ds.task, class_names=ds.class_names,
                                target_metric=ds.target_metric, max_blocks=info["num_blocks"], blocks=p.blocks,
                                avgpool=p.avgpool, lrs=p.lrs, epochs=p.epochs, batch_size=p.batch_size, seed=p.seed,
                                log=log)
    test = feats["test"]
    result = {"dataset": ds.name, "task": ds.task, "target_metric": ds.target_metric,
              "selection_metric": ds.target_metric, "protocol": "linear_probe", "selected": r["selected"],
              "grid": r["grid"], "skipped_heads": r["skipped_heads"], "retrained_on": r["retrained_on"],
              "val": {**r["val"], "num_examples": len(feats["val"])},
              "test": {**r["test"], "num_examples": len(test)},
              "features": {k: v for k, v in info.items() if k != "files"}, "head_file": r["head_file"],
              "skipped_images": ds.skipped_images}
    result["test_bootstrap"] = bootstrap.finish_test(config, ds, probs, test.labels, workdir)
    with atomic_write(os.path.join(workdir, METRICS_FILE), "w") as f:
        json.dump(result, f, indent=2, default=_json_default)
    return result


def _json_default(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x)}")


def _die_with_parent():  # in the cell's process before exec: SIGTERM when the grid dies, even by SIGKILL (Linux)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_cell_process(cmd: list) -> subprocess.CompletedProcess:
    """Runs a cell's command in its own process group (its run and the run's data workers): SIGTERM / SIGINT to the
    grid are forwarded to the group, so the run saves and stops, and the group gets SIGTERM if the grid dies."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)
    received = []

    def forward(signum, frame):
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {n: signal.signal(n, forward) for n in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = proc.wait()
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)
        if proc.poll() is None:  # an exception in the grid itself: the cell goes with it
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    result = subprocess.CompletedProcess(cmd, returncode)
    result.signal = received[0] if received else None
    return result


def run_cells(grid, cells, workdir_root: str, grid_path: str, overrides=(), dry_run=False, distributed=False,
              runner=run_cell_process, out=sys.stdout) -> int:
    """Runs (or prints) `python -m medjax.main` (a probe cell: `medjax.grid probe`) for each cell in turn; returns
    the number of failed cells. With `distributed` (every host runs this loop) probe cells are left out: the probe
    runs on one host, so run them without --distributed."""
    failed, skipped, single_host = [], 0, 0
    for i, cell in enumerate(cells, 1):
        arg = grid.cell_arg(cell)
        workdir = cell_workdir(workdir_root, cell)
        shown = main_command(grid_path, arg, workdir, overrides, distributed)
        if os.path.exists(os.path.join(workdir, METRICS_FILE)) and not _failed(workdir):
            skipped += 1
            print(f"# [{i}/{len(cells)}] skip {arg}: {workdir}/{METRICS_FILE} exists", file=out)
            continue
        if distributed and cell.get("head") == "probe":
            single_host += 1
            print(f"# [{i}/{len(cells)}] left out {arg}: a linear probe runs on one host; run it without "
                  "--distributed", file=out)
            continue
        if dry_run:
            print(shlex.join(shown), file=out)
            continue
        print(f"# [{i}/{len(cells)}] {shlex.join(shown)}", file=out, flush=True)
        config = apply_overrides(grid.get_config(arg), overrides)
        write_cell_file(workdir, config, shown)
        proc = runner(main_command(grid_path, arg, workdir, overrides, distributed, python=sys.executable))
        stopped = getattr(proc, "signal", None) or (proc.returncode - 128 if proc.returncode in INTERRUPTED else None)
        if stopped:  # the run saved and stopped: resumable, neither done nor failed
            raise GridInterrupted(stopped, arg)
        if proc.returncode != 0:
            failed.append(arg)
            write_cell_file(workdir, config, shown, {"status": "failed", "returncode": proc.returncode})
            print(f"# [{i}/{len(cells)}] FAILED ({proc.returncode}): {arg}", file=out, flush=True)
    todo = len(cells) - skipped - single_host
    verb = "would run" if dry_run else "ran"
    print(f"# {len(cells)} cells: {skipped} already done, {verb} {todo}"
          + (f", {single_host} probe cell(s) left for a single-host run" if single_host else "")
          + (f", {len(failed)} failed: {' '.join(failed)}" if failed else ""), file=out)
    return len(failed)


def _failed(workdir: str) -> bool:
    """The cell's last run failed (grid_cell.json says so): its metrics.json, if any, is no result to skip on."""
    try:
        with open(os.path.join(workdir, CELL_FILE)) as f:
            return json.load(f).get("status") == "failed"
    except (OSError, ValueError, AttributeError):
        return False


def cell_weights(grid, cells: list[dict]) -> dict[str, str]:
    """{folder under weights_dir: registry name} of what the cells read (the DeiT-B body for attention heads)."""
    folders = {}
    for cell in cells:
        model = grid.model_info(cell["model"])
        folders[model.folder] = registry.name_for(model.folder)
        if cell["head"] == "attention" and cell.get("study", "mansoori") == "mansoori":
            folders[grid.DEIT_VARIANT] = registry.name_for(grid.DEIT_VARIANT)
    return folders


def fetch_cells(grid, cells: list[dict], weights_dir: str | None) -> int:
    folders = cell_weights(grid, cells)
    unknown = sorted(f for f, n in folders.items() if n is None)
    if unknown:
        print(f"error: no official source is registered for {', '.join(unknown)}; convert those by hand "
              "(python -m converters CHECKPOINT DIR --model VARIANT)", file=sys.stderr)
        return 2
    names = sorted(set(folders.values()))
    todo = [n for n in names if weights.cached(n) is None]
    total = sum(registry.get(n).size for n in todo)
    print(f"{len(cells)} cells need {len(names)} checkpoints; {len(todo)} to fetch, about {total / 1e9:,.2f} GB",
          flush=True)
    target = weights_dir if weights_dir is not None else str(grid.get_config(grid.cell_arg(cells[0])).weights_dir) \
        if cells else None
    try:
        for folder, name in folders.items():
            path = weights.fetch(name)
            link = os.path.join(target, folder) if target else None
            if link and not os.path.lexists(link):
                os.makedirs(target, exist_ok=True)
                os.symlink(path, link)
            print(link if link else path)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@cli_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.grid", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default=DEFAULT_GRID, help="the grid config file (default: configs/grid.py)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="print the cells, one per line with the config argument")
    p_list.add_argument("--filter", help="key=pattern[|pattern],... with keys model, dataset, head, freeze, study")
    p_run = sub.add_parser("run", help="run (or print with --dry-run) python -m medjax.main for each selected cell",
                           epilog="Arguments after `--` (--config.x=y overrides) go to every run.")
    p_run.add_argument("--filter", help="key=pattern[|pattern],... with keys model, dataset, head, freeze, study")
    p_run.add_argument("--all", action="store_true", help="run every cell of the grid (instead of --filter)")
    p_run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p_run.add_argument("--workdir-root", default="runs", help="cells run in ROOT/model/dataset/head_freeze")
    p_run.add_argument("--distributed", action="store_true", help="pass --distributed to medjax.main (multi-host)")
    p_probe = sub.add_parser("probe", help="run the linear-probe protocol of one head=probe cell (radiology study)",
                             epilog="Arguments after `--` (--config.x=y overrides) apply to the cell's config.")
    p_probe.add_argument("arg", help="the config argument, e.g. model=resnet152,dataset=chexpert,head=probe,"
                                     "freeze=frozen")
    p_probe.add_argument("--workdir", required=True, help="features, splits, metrics.json and predictions go here")
    p_plan = sub.add_parser("plan", help="the selected cells' cost in chip-hours at a stated MFU (medjax.plan)")
    p_plan.add_argument("--filter", help="key=pattern[|pattern],... with keys model, dataset, head, freeze, study")
    p_plan.add_argument("--topology", required=True, help="v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, h100:8, ...")
    p_plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p_plan.add_argument("--images", action="append", help="DATASET=TRAIN,VAL,TEST image counts (repeatable)")
    p_plan.add_argument("--json", action="store_true", help="print only the JSON line")
    p_plan.add_argument("--cache", help="a JSON file of the FLOPs counted so far (read, and written as it goes)")
    p_cell = sub.add_parser("cell", help=f"write {CELL_FILE} for one cell into its work directory")
    p_cell.add_argument("arg", help="the config argument, e.g. model=dinov2_b,dataset=chexpert,head=linear,freeze=full")
    p_cell.add_argument("--workdir", required=True)

    p_fetch = sub.add_parser("fetch", help="fetch the official weights the selected cells need (total size first)")
    p_fetch.add_argument("--filter", help="key=pattern[|pattern],... (default: every cell)")
    p_fetch.add_argument("--weights-dir", help="link the converted folders here (default: the grid's weights_dir)")

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if "--" in argv:
        argv, overrides = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"arguments after -- must be --config.x=y overrides, got {bad[0]!r}")

    grid = load_grid(args.grid)
    axes = getattr(grid, "FILTER_AXES", grid.AXES)
    if args.command == "probe":
        try:
            config = apply_overrides(grid.get_config(args.arg), overrides, strict=True)
            write_cell_file(args.workdir, config, [sys.argv[0], *sys.argv[1:]])
            result = run_probe(config, args.workdir)
        except (ValueError, OSError) as e:  # DataError, ConfigError, PretrainedError, ... are ValueErrors
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2

        value = metrics.target_metric(result["target_metric"], result["test"])
        interval = (result.get("test_bootstrap") or {}).get("metrics", {}).get(
            metrics.target_key(result["target_metric"], result["task"]))
        print(f"test {result['target_metric']} (head {result['selected']['head']}): "
              + (bootstrap.fmt_interval(interval, 4) if interval else f"{value}")
              + f"; metrics written to {os.path.join(args.workdir, METRICS_FILE)}")
        return 0
    if args.command == "cell":
        try:
            config = grid.get_config(args.arg)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        print(write_cell_file(args.workdir, apply_overrides(config, overrides)))
        return 0

    chosen = select(grid.cells(), parse_filter(args.filter, axes))
    if args.command == "fetch":
        return fetch_cells(grid, chosen, args.weights_dir)
    if args.command == "plan":
        from medjax import plan  # jax and every model family: seconds that list / run / cell do not need

        return plan.grid_main(grid, chosen, args.topology, args.mfu, args.images, args.json, args.cache)
    if args.command == "list":
        for cell in chosen:
            print(f"{cell.get('study', ''):<9} {cell['model']:<13} {cell['dataset']:<20} {cell['head']:<9} "
                  f"{cell['freeze']:<6} {args.grid}:{grid.cell_arg(cell)}")
        print(f"# {len(chosen)} cells", file=sys.stderr)
        return 0
    if not args.filter and not args.all:
        parser.error("run: give --filter (e.g. --filter model=dinov2_b,dataset=chexpert) or --all")
    try:
        return 1 if run_cells(grid, chosen, args.workdir_root, args.grid, overrides, args.dry_run,
                              args.distributed) else 0
    except GridInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # between cells: nothing was running
        print("grid run interrupted between cells; run the same command to go on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
