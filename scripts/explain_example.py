"""Regenerates the picture of docs/using_the_model.md: `python -m medjax.explain` on the demo run.

    python scripts/explain_example.py [--workdir RUN] [--output docs/use_the_model.png]

Trains the demo (`configs/demo.py`, about 30 s on 2 CPU cores) into a temporary work directory unless --workdir names
a finished demo run, then explains the test image in which the model finds a true finding (other than No Finding)
most confidently, with the family's default method (attention rollout for the demo's DINOv2), and writes the PNG.
Deterministic: the same code gives the same picture.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a finished run of configs/demo.py (default: train one)")
    p.add_argument("--output", default=os.path.join(ROOT, "docs", "use_the_model.png"))
    args = p.parse_args()
    workdir = args.workdir
    if workdir is None:
        workdir = os.path.join(tempfile.mkdtemp(prefix="medjax_demo_"), "run")
        subprocess.run([sys.executable, "-m", "medjax.main", "--config=configs/demo.py", f"--workdir={workdir}",
                        "--config.progress_bar=False"], cwd=ROOT, check=True)

    from medjax import explain, predict

    model = predict.load_model(workdir)
    records, _ = predict.dataset_records(model, model.config.dataset, model.config.data_root, "test")
    # the test image the model finds a true finding (other than "No Finding") in most confidently
    probs, ok, _ = predict.predict(model, records)
    findings = [c for c, n in enumerate(model.class_names) if n != "No Finding"]
    confidence = [max((probs[i, c] for c in findings if r.label[c]), default=-1.0) if ok[i] else -1.0
                  for i, r in enumerate(records)]
    record = records[int(max(range(len(records)), key=confidence.__getitem__))]
    folder = tempfile.mkdtemp(prefix="medjax_explain_")
    written, _ = explain.explain_files(model, [record], folder,
                                       relative=[os.path.relpath(record.path, model.config.data_root)])
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    shutil.copyfile(written[0], args.output)
    findings = [n for n, v in zip(model.class_names, record.label) if v]
    print(f"{args.output}: {os.path.relpath(record.path, model.config.data_root)} (findings: {', '.join(findings)})")


if __name__ == "__main__":
    main()
