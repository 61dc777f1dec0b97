"""The trainer's start-up as a hostile user meets it (issue 13): every user error is one `error:` line with exit
status 2 and nothing written, and the start-up says what it is doing."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import converters
from medjax.testing import ROOT, fixture_path

FAST = ["--config.epochs=1", "--config.batch_size=8", "--config.progress_bar=False"]


def _main(workdir, *overrides, config="configs/demo.py", devices=1):
    cmd = [sys.executable, "-m", "medjax.main", f"--config={config}", f"--workdir={workdir}", *FAST, *overrides]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def _one_error_line(proc, *words):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def one_class_val(tmp_path_factory):
    """A user's CSV dataset whose fixed val split (`split`) holds one class only: the target metric is undefined
    there; `split2` is a fixed split with both classes in every part."""
    root = tmp_path_factory.mktemp("csv")
    rows = ["image,label,split,split2"]
    rng = np.random.default_rng(0)
    for i in range(24):
        split = "train" if i < 16 else ("val" if i < 20 else "test")
        label = "benign" if split == "val" else ("malignant" if i % 2 else "benign")
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        split2 = "train" if i < 12 else ("val" if i < 18 else "test")
        rows.append(f"{i}.png,{label},{split},{split2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(root)


def test_split_that_cannot_define_the_target_metric_stops_at_start_up(tmp_path, one_class_val):
    proc = _main(tmp_path / "run", "--config.dataset=csv", f"--config.data_root={one_class_val}",
                 "--config.data_options.split_column=split", "--config.fake_data=0")
    _one_error_line(proc, "val split", "benign 4", "malignant 0")
    assert not os.path.exists(tmp_path / "run" / "metrics.json")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_converted_folder_of_another_family_is_refused(tmp_path):
    converters.convert(fixture_path("dinov2", "checkpoint.pth"), str(tmp_path / "dino"), "dinov2",
                       fixture_path("dinov2", "config.json"))
    proc = _main(tmp_path / "run", "--config.model.family=clip", f"--config.model.pretrained={tmp_path / 'dino'}",
                 "--config.fake_data=64")
    _one_error_line(proc, "model.family='clip'", "'dinov2' backbone")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_batch_size_not_divisible_by_the_devices_is_one_line(tmp_path):
    proc = _main(tmp_path / "run", "--config.batch_size=6", "--config.fake_data=64", devices=4)
    _one_error_line(proc, "batch_size 6", "4 devices")


def test_missing_weights_name_the_variant_the_config_expects(tmp_path):
    proc = _main(tmp_path / "run", "--config.model.pretrained=/nonexistent/dinov2_vitb14", "--config.fake_data=64")
    _one_error_line(proc, "python -m converters CHECKPOINT /nonexistent/dinov2_vitb14 --model dinov2_vit")
    assert "--model NAME" not in proc.stderr


def test_converter_output_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    proc = subprocess.run([sys.executable, "-m", "converters", fixture_path("dinov2", "checkpoint.pth"),
                           str(tmp_path / "out"), "--model", "dinov2", "--config", fixture_path("dinov2",
                                                                                                "config.json")],
                          cwd=ROOT, capture_output=True, text=True)
    _one_error_line(proc, "exists and is not a folder")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_demo_announces_its_phases_and_keeps_its_data_in_the_workdir(tmp_path):
    proc = _main(tmp_path / "run", "--config.fake_data=64", "--config.total_steps=2", "--config.eval_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    phases = ["Writing 64 synthetic chexpert images", "Converting", "Reading chexpert", "Building dinov2 model",
              "module", "Training steps 1..2"]
    positions = [out.find(p) for p in phases]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), out
    assert str(tmp_path / "run" / "data" / "chexpert") in out  # per run, never a shared /tmp path
    assert os.path.isdir(tmp_path / "run" / "data" / "chexpert")


def test_a_start_refused_for_bad_input_records_no_config(tmp_path, one_class_val):
    """The user fixes what the error named and starts again in the same work directory: the refused start left no
    run config behind that would now refuse the corrected one."""
    workdir = tmp_path / "run"
    refused = _main(workdir, "--config.dataset=csv", f"--config.data_root={one_class_val}",
                    "--config.data_options.split_column=split", "--config.fake_data=0")
    assert refused.returncode == 2 and not (workdir / "run_config.json").exists()
    fixed = _main(workdir, "--config.dataset=csv", f"--config.data_root={one_class_val}", "--config.fake_data=0",
                  "--config.data_options.split_column=split2", "--config.total_steps=1", "--config.eval_every=1")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert (workdir / "run_config.json").exists()
