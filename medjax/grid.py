"""python -m medjax.grid list|run|cell: the cells of the study's benchmark grid (configs/grid.py), listed or run.

    python -m medjax.grid list [--filter model=dinov2_*,dataset=chexpert]
    python -m medjax.grid run --filter model=dinov2_b,head=linear [--dry-run] [--workdir-root runs] [-- --config.x=y]
    python -m medjax.grid cell model=dinov2_b,dataset=chexpert,head=linear,freeze=frozen --workdir DIR

`list` prints one cell per line with its config argument. `run` runs `python -m medjax.main` for each selected cell,
one after the other, in `{workdir-root}/{model}/{dataset}/{head}_{freeze}`; a cell whose work directory already
holds metrics.json is skipped, an unfinished one resumes from its checkpoint. Before a cell runs, its identity is
written to `grid_cell.json` in its work directory (what `python -m medjax.report` reads); `cell` writes that file
alone, for runs started another way (the launch scripts). A filter is `key=pattern[|pattern...]` items joined by
commas; patterns are shell-style (`dinov2_*`), keys are model, dataset, head, freeze.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys

CELL_FILE = "grid_cell.json"
METRICS_FILE = "metrics.json"
DEFAULT_GRID = "configs/grid.py"


def load_grid(path: str | None = None):
    """The grid config module, loaded by path as `--config=configs/grid.py:...` loads it (configs/ is not a package
    that gets installed). Relative paths are tried from the working directory, then from the repository root."""
    path = path or DEFAULT_GRID
    candidates = [path] if os.path.isabs(path) else [path, os.path.join(_repo_root(), path)]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise SystemExit(f"error: grid config {path!r} not found (looked in {', '.join(candidates)}); run from the "
                         "medjax checkout or pass --grid PATH")
    spec = importlib.util.spec_from_file_location("medjax_grid_config", found)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    cmd = [python, "-m", "medjax.main", f"--config={grid_path}:{arg}", f"--workdir={workdir}", *overrides]
    return cmd + (["--distributed"] if distributed else [])


def write_cell_file(workdir: str, config, command=None) -> str:
    """`grid_cell.json` in the work directory: the cell, its config argument and the full config (JSON)."""
    os.makedirs(workdir, exist_ok=True)
    record = {"cell": config.grid_cell.to_dict(), "config": json.loads(config.to_json_best_effort()),
              "command": command}
    path = os.path.join(workdir, CELL_FILE)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # every host of a pod may write it to a shared folder
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    return path


def apply_overrides(config, overrides):
    """--config.a.b=value overrides as config_flags applies them (for the config stored in grid_cell.json)."""
    import ast

    for item in overrides:
        key, _, value = item[len("--config."):].partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        *path, node = key.split(".")
        target = config
        for part in path:
            target = target[part]
        try:
            target[node] = value
        except (TypeError, KeyError):
            pass  # the run itself reports a bad override; the record keeps the default
    return config


def run_cells(grid, cells, workdir_root: str, grid_path: str, overrides=(), dry_run=False, distributed=False,
              runner=subprocess.run, out=sys.stdout) -> int:
    """Runs (or prints) `python -m medjax.main` for each cell in turn; returns the number of failed cells."""
    failed, skipped = [], 0
    for i, cell in enumerate(cells, 1):
        arg = grid.cell_arg(cell)
        workdir = cell_workdir(workdir_root, cell)
        shown = main_command(grid_path, arg, workdir, overrides, distributed)
        if os.path.exists(os.path.join(workdir, METRICS_FILE)):
            skipped += 1
            print(f"# [{i}/{len(cells)}] skip {arg}: {workdir}/{METRICS_FILE} exists", file=out)
            continue
        if dry_run:
            print(shlex.join(shown), file=out)
            continue
        print(f"# [{i}/{len(cells)}] {shlex.join(shown)}", file=out, flush=True)
        write_cell_file(workdir, apply_overrides(grid.get_config(arg), overrides), shown)
        proc = runner(main_command(grid_path, arg, workdir, overrides, distributed, python=sys.executable))
        if proc.returncode != 0:
            failed.append(arg)
            print(f"# [{i}/{len(cells)}] FAILED ({proc.returncode}): {arg}", file=out, flush=True)
    todo = len(cells) - skipped
    verb = "would run" if dry_run else "ran"
    print(f"# {len(cells)} cells: {skipped} already done, {verb} {todo}"
          + (f", {len(failed)} failed: {' '.join(failed)}" if failed else ""), file=out)
    return len(failed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.grid", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default=DEFAULT_GRID, help="the grid config file (default: configs/grid.py)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="print the cells, one per line with the config argument")
    p_list.add_argument("--filter", help="key=pattern[|pattern],... with keys model, dataset, head, freeze")
    p_run = sub.add_parser("run", help="run (or print with --dry-run) python -m medjax.main for each selected cell",
                           epilog="Arguments after `--` (--config.x=y overrides) go to every run.")
    p_run.add_argument("--filter", help="key=pattern[|pattern],... with keys model, dataset, head, freeze")
    p_run.add_argument("--all", action="store_true", help="run every cell of the grid (instead of --filter)")
    p_run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p_run.add_argument("--workdir-root", default="runs", help="cells run in ROOT/model/dataset/head_freeze")
    p_run.add_argument("--distributed", action="store_true", help="pass --distributed to medjax.main (multi-host)")
    p_cell = sub.add_parser("cell", help=f"write {CELL_FILE} for one cell into its work directory")
    p_cell.add_argument("arg", help="the config argument, e.g. model=dinov2_b,dataset=chexpert,head=linear,freeze=full")
    p_cell.add_argument("--workdir", required=True)

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if "--" in argv:
        argv, overrides = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"arguments after -- must be --config.x=y overrides, got {bad[0]!r}")

    grid = load_grid(args.grid)
    if args.command == "cell":
        try:
            config = grid.get_config(args.arg)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        print(write_cell_file(args.workdir, apply_overrides(config, overrides)))
        return 0

    chosen = select(grid.cells(), parse_filter(args.filter, grid.AXES))
    if args.command == "list":
        for cell in chosen:
            print(f"{cell['model']:<9} {cell['dataset']:<10} {cell['head']:<9} {cell['freeze']:<6} "
                  f"{args.grid}:{grid.cell_arg(cell)}")
        print(f"# {len(chosen)} cells", file=sys.stderr)
        return 0
    if not args.filter and not args.all:
        parser.error("run: give --filter (e.g. --filter model=dinov2_b,dataset=chexpert) or --all")
    return 1 if run_cells(grid, chosen, args.workdir_root, args.grid, overrides, args.dry_run,
                          args.distributed) else 0


if __name__ == "__main__":
    sys.exit(main())
