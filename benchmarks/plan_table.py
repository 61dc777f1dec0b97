"""The planning table of docs/plan_table.md: every study backbone at its largest size, compiled ahead of time for
TPU slices with `medjax.plan` (needs libtpu: the `tpu` extra), and the study grid's chip-hours.

    PYTHONPATH=.:LIBTPU_DIR python benchmarks/plan_table.py [--topologies v5e:2x4,v4:2x2x1,v5p:2x2x1]
        [--models dinov2_g,aimv2_h,...] [--results benchmarks/plans/plan_table.jsonl]
        [--grid-json benchmarks/plans/grid_plan_v5e.json] [--output docs/plan_table.md]

Each (model, topology) is the reference study's recipe (batch 64, bf16 compute, full fine-tuning, linear head, 224
px; SAM ViT-H at its 1,024 px) on APTOS (3 channels, 5 classes), data parallel. When it does not fit, the plan
compiles the changes one at a time (FSDP over every chip; remat, + scan where offered; both) and, if none fits,
bisects the largest global batch that fits as asked and with all the changes (`medjax.plan.suggestions`). Results
are appended to --results as JSON lines, and a rerun skips what is there (compiles of the big models take minutes
each on a small host). --grid-json: the JSON line of `python -m medjax.grid plan`, whose FLOPs give the grid's
chip-hours on each topology's chip. """

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medjax import plan  # noqa: E402
from medjax.errors import atomic_write  # noqa: E402
from medjax.schema import make  # noqa: E402

# key: (table name, converter variant, image size)
MODELS = {
    "dinov2_g": ("DINOv2-g/14", "dinov2_vitg14", 224),
    "aimv2_h": ("AIMv2-H", "aimv2_huge_patch14_224", 224),
    "sam2_l": ("SAM 2.1 Hiera-L", "sam2.1_hiera_l", 224),
    "coca_l": ("CoCa L/14", "coca_vit_l14", 224),
    "vmamba_b": ("VMamba-B", "vmamba_base", 224),
    "mae_h": ("MAE-H", "mae_vit_huge_patch14", 224),
    "sam_h": ("SAM ViT-H", "sam_vit_h", 1024),
    "openclip_h14": ("OpenCLIP-H/14", "clip_vit_huge_patch14_laion2b", 224),
    "biomedclip": ("BiomedCLIP", "biomedclip_vit_base_patch16_224", 224),
    "resnet152": ("ResNet-152", "resnet152", 224),
    "densenet201": ("DenseNet-201", "densenet201", 224),
}
SLICES = {"v5e:2x4": "v5e-8", "v4:2x2x1": "v4-8", "v5p:2x2x1": "v5p-8"}


def study_config(variant: str, image_size: int):
    c = make({"dataset": "aptos2019", "model.freeze": "full", "model.head": "linear", "compute_dtype": "bfloat16",
              "image_size": image_size, "batch_size": 64})
    return plan.resolve_backbone(c, variant)


def plan_one(key: str, topology: str, tgt) -> dict:
    name, variant, size = MODELS[key]
    config = study_config(variant, size)
    shape = plan.dataset_shape(config)
    limit = tgt.chip.hbm_bytes
    start = time.perf_counter()
    train = plan.compile_config(config, tgt, shape, eval_step=False)[0]
    row = {"model": key, "name": name, "topology": topology, "chips": len(tgt.devices), "batch_size": 64,
           "image_size": size, "per_chip_bytes": train.peak, "hbm_bytes": limit, "fits": train.peak <= limit,
           "out_of_memory": bool(train.out_of_memory), "compile_seconds": round(train.seconds, 1)}
    if not row["fits"]:
        row.update(plan.suggestions(config, tgt, shape, limit))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def best_fix(row: dict) -> dict | None:
    """The fix that fits with the fewest changes, or None."""
    fitting = [f for f in row.get("fixes", []) if f["fits"]]
    return min(fitting, key=lambda f: len(f["change"])) if fitting else None


def what_it_takes(row: dict) -> str:
    if row["fits"]:
        return "as is (data parallel)"
    if "fixes" not in row:
        return "not searched"
    if best := best_fix(row):
        change = ", ".join(f"{k}={v}" for k, v in best["change"].items())
        return f"{change} ({best['per_chip_bytes'] / plan.GiB:.1f} GiB)"
    said = f"nothing tried fits batch {row['batch_size']}; largest batch data parallel: {row['largest_batch']}"
    if "largest_batch_with" in row:
        w = row["largest_batch_with"]
        said += f"; with {', '.join(f'{k}={v}' for k, v in w['change'].items())}: {w['batch_size']}"
    return said


SHORT = {"mesh.fsdp": "FSDP", "model.remat": "remat", "model.scan": "scan", "compute_dtype": "bf16"}
README_START = "<!-- the plan table: written by benchmarks/plan_table.py from benchmarks/plans/; do not edit -->"
README_END = "<!-- end of the plan table -->"


def _short(change: dict) -> str:
    return " + ".join(SHORT[k] for k in change if k in SHORT)


def summary_cell(row: dict | None) -> str:
    """One backbone on one slice, for the README's matrix."""
    if row is None:
        return "not compiled yet"
    gib = row["per_chip_bytes"] / plan.GiB
    if row["fits"]:
        return f"{gib:.1f} GiB"
    if best := best_fix(row):
        return f"{_short(best['change'])}: {best['per_chip_bytes'] / plan.GiB:.1f} GiB"
    with_all = row.get("largest_batch_with")
    if with_all:
        return f"no; batch {with_all['batch_size']} with {_short(with_all['change'])}"
    return "no"


def render_summary(done: dict, grid: dict | None, mfu: float) -> str:
    """The README's matrix: a row per backbone, a column per slice (per-chip GiB when the study's batch 64 fits data
    parallel; the change that makes it fit; or the largest batch that fits with every change), and the grid's
    chip-hours."""
    slices = list(SLICES)
    heads = [f"{SLICES[t]} ({plan.CHIPS[plan.tpu_generation(t)].hbm_bytes / plan.GiB:.0f} GiB per chip)"
             for t in slices]
    lines = [README_START, "", "| backbone, batch 64 | " + " | ".join(heads) + " |", "|---" * (len(slices) + 1) + "|"]
    for key, (name, _, size) in MODELS.items():
        cells = [summary_cell(done.get((key, t))) for t in slices]
        lines.append(f"| {name} ({size} px) | " + " | ".join(cells) + " |")
    if grid:
        hours = {gen: plan.chip_hours(sum(c["flops"] for c in grid["cells"]), plan.CHIPS[gen], mfu)
                 for gen in ("v5e", "v4", "v5p")}
        studies = sorted({c["study"] for c in grid["cells"]})
        lines += ["", f"The study grid ({len(grid['cells'])} cells of `configs/grid.py`, studies {', '.join(studies)}) "
                      f"at MFU {mfu:g}:", ", ".join(f"{h:,.0f} {gen} chip-hours" for gen, h in hours.items()) + "."]
    return "\n".join(lines + ["", README_END])


def replace_block(path: str, block: str) -> None:
    """Puts `block` (which starts with README_START and ends with README_END) in place of the file's block."""
    text = open(path).read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        print(f"error: {path}: no block between {README_START!r} and {README_END!r}", file=sys.stderr)
        raise SystemExit(2)
    with atomic_write(path) as f:
        f.write(text[:start] + block + text[end + len(README_END):])


def render(rows: list[dict], grid: dict | None, mfu: float) -> str:
    lines = ["<!-- written by benchmarks/plan_table.py from `python -m medjax.plan` compiles; do not edit -->", "",
             "| backbone | slice | chips | per-chip GiB (data parallel) | fits | what it takes to fit |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        gib = r["per_chip_bytes"] / plan.GiB
        held = f">= {gib:.1f} (compiler refused)" if r["out_of_memory"] else f"{gib:.1f}"
        lines.append(f"| {r['name']} ({r['image_size']} px) | {SLICES.get(r['topology'], r['topology'])} | "
                     f"{r['chips']} | {held} of {r['hbm_bytes'] / plan.GiB:.0f} | {'yes' if r['fits'] else 'no'} | "
                     f"{what_it_takes(r)} |")
    if grid:
        total = sum(c["flops"] for c in grid["cells"])
        by_study: dict = {}
        for c in grid["cells"]:
            by_study[c["study"]] = by_study.get(c["study"], 0.0) + c["flops"]
        lines += ["", f"The grid cells counted ({len(grid['cells'])} cells of the studies "
                      f"{', '.join(by_study)}; `python -m medjax.grid plan`): {total:.3e} FLOPs; chip-hours at MFU "
                      f"{mfu:g}:", "",
                  "| chip | " + " | ".join(by_study) + " | total |", "|---" * (len(by_study) + 2) + "|"]
        for gen in ("v5e", "v4", "v5p"):
            chip = plan.CHIPS[gen]
            hours = [plan.chip_hours(v, chip, mfu) for v in by_study.values()]
            lines.append(f"| {chip.name} | " + " | ".join(f"{h:,.1f}" for h in hours) +
                         f" | {plan.chip_hours(total, chip, mfu):,.1f} |")
    return "\n".join(lines) + "\n"


def load_results(path: str) -> dict:
    """{(model, topology): row} of a results file (JSON lines; a later line for the same pair wins); none yet when
    the file does not exist."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                done[(row["model"], row["topology"])] = row
    return done


def ordered(done: dict) -> list[dict]:
    """The rows in the table's order: by backbone, then slice."""
    return [done[k] for k in sorted(done, key=lambda k: (list(MODELS).index(k[0]), list(SLICES).index(k[1])
                                                          if k[1] in SLICES else 99))]


def compile_row(key: str, topology: str, results: str) -> None:
    """One row in a process of its own, which appends it to `results`: the compiles of a big model take several GiB
    of host memory each and a process keeps some of it, so one process for the whole table ran out of memory (24 GiB)
    where each row alone fits. A failed row is reported in one line; the others still run."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--row", f"{key}@{topology}", "--results",
                           results], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode == 0:
        print(proc.stdout.strip().splitlines()[-1], flush=True)
        return
    why = "killed (out of host memory?)" if proc.returncode == -9 else f"exit status {proc.returncode}"
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    print(f"{key} on {topology}: {why}: {last[:300]}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topologies", default=",".join(SLICES))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "plans", "plan_table.jsonl"),
                   help="JSON lines, appended; a rerun skips what is there (the committed file: the rows so far)")
    p.add_argument("--grid-json", help="a file whose last line is `python -m medjax.grid plan`'s JSON")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "plan_table.md"))
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                   help="the file whose plan-table block gets the summary matrix ('' for none)")
    p.add_argument("--render-only", action="store_true", help="write the table from --results, compile nothing")
    p.add_argument("--row", metavar="MODEL@TOPOLOGY", help=argparse.SUPPRESS)  # one row, in the child process
    args = p.parse_args(argv)
    if args.row:
        key, topology = args.row.split("@")
        with plan.quiet_stderr():
            row = plan_one(key, topology, plan.target(topology))
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return 0
    done = load_results(args.results)
    if not args.render_only:
        for topology in args.topologies.split(","):
            for key in args.models.split(","):
                if (key, topology) not in done:
                    compile_row(key, topology, args.results)
        done = load_results(args.results)
    rows = ordered(done)
    grid = None
    if args.grid_json:
        grid = json.loads(open(args.grid_json).read().strip().splitlines()[-1])
    with open(args.output, "w") as f:
        f.write(render(rows, grid, args.mfu))
    if args.readme:
        replace_block(args.readme, render_summary(done, grid, args.mfu))
    print(f"wrote {args.output}" + (f" and the plan table of {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
