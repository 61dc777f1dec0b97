"""benchmarks/device_check.sh runs end to end with --dry-run (CPU, tiny sizes): every section reports, the table has
a figure for each model, framework and attention, and a bad argument is one error line."""

import json
import os
import re
import subprocess
import sys

from medjax.testing import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")


def test_dry_run_end_to_end(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})  # this interpreter
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert set(results) == {"env", "medjax", "pytorch", "input"}
    assert not any("error" in section for section in results.values()), results
    assert all(v > 1e6 for v in results["env"]["flops_per_image"].values())
    for attention in ("on", "off"):  # a dry run measures the first model (ViT-B/16's code path), tiny
        run = results["medjax"][f"vit_b16_{attention}"]
        assert run["images_per_s"] > 0 and run["compiles_in_steps"] == 0
    assert results["pytorch"]["vit_b16"]["images_per_s"] > 0
    assert results["input"]["images_per_s"] > 0 and results["input"]["cpu_ms_per_image"] > 0
    table = (tmp_path / "device_check.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| vit_b16 \|", line)]
    assert len(rows) == 3 and all(re.search(r"\| [\d,]+\.\d \|", row) for row in rows), table
    assert "input pipeline (prepared APTOS" in table and table.strip() in proc.stdout


def test_bad_argument_is_one_error_line():
    proc = subprocess.run(["bash", SCRIPT, "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown argument --fast") and len(proc.stderr.strip().splitlines()) == 1
