"""Issue 23, second hostile round: no overwrites, verified prepared metadata, every bad value one line, OS errors as
one line, killed prepare workers, folder walks and symlinks (docs/reliability_inputs.md). One test per class; each
fails on the code before the fix."""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import uuid

import numpy as np
import pytest

from medjax import data, errors, export, models, predict, pretrained, schema, trained
from medjax import main as main_lib
from medjax.data import DataError, fake, prepare, prepared
from medjax.data import __main__ as data_cli
from medjax.testing import ROOT, error_line, run_cli, write_labels_csv, write_png


def _error_line(proc):  # a CLI may warn before its error line here
    return error_line(proc, alone=False)


# ------------------------------------------------------------------------------ 6: prepared metadata, stale copy

@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("hardening_prepared")
    raw = fake.write("aptos2019", str(base / "raw"), 12, seed=1, size=16)["root"]
    out = prepare.prepare("aptos2019", raw, str(base / "prepared"), workers=1, progress=False)["output"]
    return raw, out


def test_edited_prepared_metadata_is_refused(small_prepared, tmp_path):
    _, out = small_prepared
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    path = os.path.join(copy, prepared.METADATA)
    meta = json.load(open(path))
    row = meta["splits"]["train"][0]
    row[1] = (row[1] + 1) % len(meta["class_names"])  # one label edited
    json.dump(meta, open(path, "w"))
    with pytest.raises(DataError, match="medjax_prepared.json: edited or damaged"):
        data.get_dataset("aptos2019", copy)


def test_prepare_over_a_changed_source_says_the_copy_is_stale(small_prepared, tmp_path):
    raw, out = (str(tmp_path / "raw"), str(tmp_path / "prepared"))
    shutil.copytree(small_prepared[0], raw)
    shutil.copytree(small_prepared[1], out)  # copy2 keeps the files' times: the same source
    assert prepare.prepare("aptos2019", raw, out, progress=False)["written"] is False
    labels = os.path.join(raw, "train_1.csv")
    rows = list(csv.reader(open(labels, newline="")))
    rows[1][1] = str((int(rows[1][1]) + 1) % 5)  # a relabelled row
    csv.writer(open(labels, "w", newline="")).writerows(rows)
    with pytest.raises(DataError, match=r"a stale prepared copy: .* \(1 relabelled or moved to another split\)"):
        prepare.prepare("aptos2019", raw, out, progress=False)


# --------------------------------------------------------------------------------- 7, 8, 9, 18: no overwrites

def test_export_refuses_a_folder_it_did_not_write_and_replaces_an_export_only_atomically(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "params.safetensors").write_bytes(b"another model")
    line = _error_line(run_cli("medjax.export", "--workdir", str(tmp_path / "run"), "--output", str(busy),
                               check=False))
    assert "not empty and not a medjax export" in line
    assert (busy / "params.safetensors").read_bytes() == b"another model"
    old = tmp_path / "old"
    old.mkdir()
    (old / "medjax.json").write_text(json.dumps({export.EXPORT_KEY: {"run_config": {}}}))
    with pytest.raises(trained.PredictError, match="holds an earlier export; pass --overwrite"):
        export.check_output(str(old), overwrite=False)
    export.check_output(str(old), overwrite=True)
    with pytest.raises(OSError):  # a re-export that fails (a full disk) leaves the old export as it was
        with export.staging(str(old)) as tmp:
            open(os.path.join(tmp, "medjax.json"), "w").write("half")
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(tmp, "params.safetensors"))
    assert json.loads((old / "medjax.json").read_text()) == {export.EXPORT_KEY: {"run_config": {}}}
    assert sorted(os.listdir(tmp_path)) == ["busy", "old"]  # no temporary folder left
    with export.staging(str(old)) as tmp:
        open(os.path.join(tmp, "medjax.json"), "w").write("{}")
    assert (old / "medjax.json").read_text() == "{}" and sorted(os.listdir(tmp_path)) == ["busy", "old"]


def test_fake_refuses_an_existing_dataset(tmp_path):
    root = str(tmp_path / "mine")
    write_labels_csv(root, [["a.png", "x"]])
    with pytest.raises(DataError, match=r"mine: not empty \(labels.csv\); .* never over existing files"):
        fake.write("csv", root, 8)
    assert open(os.path.join(root, "labels.csv")).read() == "image,label\na.png,x\n"
    assert data_cli.main(["fake", "--dataset", "aptos2019", "--root", root, "--num", "4"]) == 2
    assert sorted(os.listdir(root)) == ["labels.csv"] and sorted(os.listdir(tmp_path)) == ["mine"]


KILLED_DEMO = """
import os, signal, sys
from medjax import schema
from medjax import main
from medjax.data import fake
calls = [0]
save = fake._save
def dying_save(*a, **k):
    calls[0] += 1
    if calls[0] == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # killed while writing the synthetic data
    return save(*a, **k)
fake._save = dying_save
main.prepare(schema.make({"dataset": "aptos2019", "fake_data": 12}), sys.argv[1])
"""


def test_demo_killed_while_writing_its_data_restarts(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", KILLED_DEMO, workdir], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    config = schema.make({"dataset": "aptos2019", "fake_data": 12})
    main_lib.prepare(config, workdir)  # the restart writes the data (before: "train_1.csv: file not found")
    assert sum(len(v) for v in data.get_dataset("aptos2019", config.data_root).splits.values()) == 12


def test_prepare_output_inside_a_folder_dataset_is_refused(tmp_path):
    root = str(tmp_path / "folder")
    for k, name in enumerate(("cats", "dogs")):
        for i in range(3):
            write_png(os.path.join(root, name, f"{i}.png"), 50 + 40 * k + i)
    with pytest.raises(DataError, match="is inside the raw dataset"):
        prepare.prepare("folder", root, os.path.join(root, "prepared"), progress=False)
    assert sorted(os.listdir(root)) == ["cats", "dogs"]  # no class "prepared" added
    assert data.get_dataset("folder", root, val_fraction=0.0, test_fraction=0.0).class_names == ["cats", "dogs"]


# ------------------------------------------------------------------------------- 10: converted folder metadata

def _tiny_vit_folder(folder):
    import jax

    from medjax import models
    from medjax.models.vit.model import ViTConfig

    config = ViTConfig(family="dinov2", width=8, depth=1, num_heads=2, patch_size=4, pos_grid=(2, 2), mlp_hidden=16)
    shapes = models.variable_shapes(config)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    pretrained.save(str(folder), variables, {"family": "dinov2", "architecture": config.to_dict()})
    return str(folder)


@pytest.mark.parametrize("case, expected", [
    ("depth", r"architecture field depth=1000000: expected integers in \[1, 256\]"),
    ("width", r"architecture field width=-8: expected integers in \[1, 16384\]"),
    ("no_digests", "no tensor digests recorded"),
    ("int8", r"dtype I8 != expected F32"),
    ("float64", r"dtype F64 != expected F32"),
])
def test_tampered_converted_folder_is_refused_before_allocation(tmp_path, case, expected):
    from safetensors.numpy import load_file, save_file

    folder = _tiny_vit_folder(tmp_path / "params")
    meta_path, params_path = os.path.join(folder, "medjax.json"), os.path.join(folder, "params.safetensors")
    meta = json.load(open(meta_path))
    if case == "depth":
        meta["architecture"]["depth"] = 10 ** 6  # before: 8 GB and 11 minutes
    elif case == "width":
        meta["architecture"]["width"] = -8
    elif case == "no_digests":
        del meta["digests"]
    else:  # a tensor stored in another dtype, its digest recomputed: only the dtype check can see it
        flat = load_file(params_path)
        key = sorted(flat)[0]
        flat[key] = (flat[key] * 10).astype(np.int8 if case == "int8" else np.float64)
        save_file(flat, params_path)
        meta["digests"][key] = pretrained.tensor_digest(flat[key])
    json.dump(meta, open(meta_path, "w"))
    start = time.perf_counter()
    with pytest.raises(pretrained.PretrainedError, match=expected):
        models.load_pretrained(folder)
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------- 11-13: config values

@pytest.mark.parametrize("override, expected", [
    ({"bootstrap.confidence": 2.0}, r"bootstrap.confidence=2.0: expected a number in \(0, 1\)"),
    ({"bootstrap.resamples": -1}, "bootstrap.resamples=-1: expected a number >= 0"),
    ({"seed": -1}, "seed=-1: expected a number >= 0"),
    ({"model.lora.rank": 0}, "model.lora.rank=0: expected a number >= 1"),
    ({"batch_size": 0}, "batch_size=0: expected a number >= 1"),
    ({"log_every": 0}, "log_every=0: expected a number >= 1"),
    ({"image_size": 0}, "image_size=0: expected a number >= 1"),
    ({"image_size": 13, "model.architecture": {"patch_size": 14}},
     "image_size=13: the model's patches are 14 px; expected at least 14"),
    ({"mesh.data": 0}, "mesh.data=0: expected -1 .* or a positive size"),
    ({"mesh.fsdp": 0}, "mesh.fsdp=0: expected -1"),
    ({"prefetch": -1}, "prefetch=-1: expected a number >= 0"),
    ({"sharding_rules": ((".*", "shard"),)}, r"sharding_rules\[0\]=\('.\*', 'shard'\): expected .* fsdp, replicate"),
    ({"sharding_rules": (("(", "fsdp"),)}, r"sharding_rules\[0\]: regex '\(' does not compile"),
    ({"model.mlp_hidden": 0}, "model.mlp_hidden=0: expected a number >= 1"),
])
def test_config_values_outside_their_ranges_are_one_line(override, expected):
    with pytest.raises(schema.ConfigError, match=f"config field {expected}"):
        schema.validate(schema.make(override))


def test_every_declared_range_names_a_declared_field():
    config = schema.make()
    for dotted in schema.RANGES:
        node = config
        for part in dotted.split("."):
            node = node[part]  # a KeyError here: a range for a field that does not exist
    schema.validate(config)  # the defaults are in range


def test_main_refuses_bad_values_work_directories_and_config_files_before_writing(tmp_path):
    demo = os.path.join(ROOT, "configs", "demo.py")
    workdir = tmp_path / "run"
    line = _error_line(run_cli("medjax.main", f"--config={demo}", f"--workdir={workdir}", "--config.seed=-1",
                               check=False))
    assert line == "error: config field seed=-1: expected a number >= 0" and not workdir.exists()
    (tmp_path / "file").write_text("x")
    line = _error_line(run_cli("medjax.main", f"--config={demo}", f"--workdir={tmp_path / 'file'}", check=False))
    assert "--workdir" in line and "exists and is not a folder" in line
    line = _error_line(run_cli("medjax.main", f"--config={tmp_path / 'missing.py'}", f"--workdir={workdir}",
                               check=False))
    assert "missing.py: file not found; expected a config file" in line and not workdir.exists()


def test_describe_refuses_a_negative_seed(tmp_path, capsys):
    assert data_cli.main(["describe", "--dataset", "aptos2019", "--root", str(tmp_path), "--option",
                          "seed=-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: dataset 'aptos2019' option seed=-1: expected a number >= 0"


# ------------------------------------------------------------------------------------ 14: disk full, OS errors

CLI_MODULES = ("medjax.predict", "medjax.explain", "medjax.export", "medjax.embed", "medjax.report", "medjax.grid",
               "medjax.protocols.__main__", "medjax.data.__main__", "medjax.main", "converters.__main__")


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_cli_main_is_wrapped(module):
    import importlib

    main = importlib.import_module(module).main
    assert getattr(main, "__wrapped__", None) is not None, f"{module}.main is not wrapped by errors.cli_main"


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/preds.csv"),
     "error: /data/out/preds.csv: No space left on device; free some space and run the same command again"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"),
     "error: /data/out: Permission denied; check the permissions"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/out"),
     "error: /data/out: Is a directory; expected a file, not a folder"),
    (DataError("labels.csv line 3: bad\nlabel"), "error: labels.csv line 3: bad label"),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file "/r/ckpt/": Failed '
                'writing: "/r/ckpt/d/2c7b": Failed to write 146943 bytes to file 7: No space left on device '
                "[os_error_code='28']"),  # orbax's checkpoint writer (tensorstore) on a full disk
     "error: /r/ckpt/d/2c7b: No space left on device; free some space and run the same command again"),
])
def test_cli_main_turns_user_and_os_errors_into_one_line(error, line, capsys):
    def failing(argv=None):
        raise error

    assert errors.cli_main(failing)([]) == 2
    assert capsys.readouterr().err == line + "\n"


def test_a_full_disk_leaves_no_temporary_predictions(tmp_path, monkeypatch):
    out = tmp_path / "preds.csv"
    out.write_text("old\n")

    class FullDisk:
        def writerow(self, row):
            pass

        def writerows(self, rows):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predict.csv, "writer", lambda f: FullDisk())
    with pytest.raises(OSError):
        predict.write_csv(str(out), ["a"], [[1]])
    assert os.listdir(tmp_path) == ["preds.csv"] and out.read_text() == "old\n"  # no preds.csv.tmpPID


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs a tmpfs mount (root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_is_one_line_in_the_data_cli(tiny_disk, tmp_path):
    line = _error_line(run_cli("medjax.data", "fake", "--dataset", "aptos2019", "--root", str(tiny_disk / "aptos"),
                               "--num", "200", "--size", "64", check=False))
    assert "No space left on device" in line and os.listdir(tiny_disk) == []  # no half dataset, no temporary folder
    raw = fake.write("aptos2019", str(tmp_path / "raw"), 40, seed=0, size=64)["root"]
    line = _error_line(run_cli("medjax.data", "prepare", "--dataset", "aptos2019", "--root", raw, "--output",
                               str(tiny_disk / "prepared"), "--workers", "1", check=False))
    assert "No space left on device" in line
    leftovers = [f for d, _, files in os.walk(tiny_disk) for f in files if ".tmp" in f]
    assert leftovers == []


# ---------------------------------------------------------------------------------- 17: killed prepare workers

KILLED_PREPARE = """
import sys
from medjax.data import prepare
prepare.prepare("aptos2019", sys.argv[1], sys.argv[2], workers=2, chunk_size=2, progress=False)
"""


def _marked_processes(mark: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"MEDJAX_TEST_MARK={mark}".encode() in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_prepare_leaves_no_worker_processes(tmp_path):
    raw = fake.write("aptos2019", str(tmp_path / "raw"), 16, seed=0, size=16)["root"]
    mark = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": ROOT, "MEDJAX_TEST_MARK": mark, prepare.KILL_ENV: "chunk:1"}
    with open(tmp_path / "stderr", "w") as err:  # files, not pipes: a surviving worker would hold a pipe open
        proc = subprocess.run([sys.executable, "-c", KILLED_PREPARE, raw, str(tmp_path / "out")], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-2000:]
    deadline = time.time() + 15
    while _marked_processes(mark) and time.time() < deadline:
        time.sleep(0.2)
    alive = _marked_processes(mark)
    for pid in alive:  # the workers this test started, if the fix fails
        os.kill(pid, signal.SIGKILL)
    assert alive == []


# ------------------------------------------------------------------------ 19, 20, 23: walks, CSV cells, symlinks

def test_a_symlink_loop_in_a_predict_folder_predicts_each_image_once(tmp_path):
    folder = tmp_path / "images"
    write_png(str(folder / "a.png"))
    os.symlink(folder, folder / "loop")
    os.symlink(folder / "a.png", folder / "same.png")
    model = types.SimpleNamespace(class_names=["x", "y"], task="multiclass")
    assert [r.path for r in predict.image_records([str(folder)], model)] == [str(folder / "a.png")]


def test_a_folder_dataset_lists_each_real_file_once(tmp_path):
    root = tmp_path / "root"
    for name in ("cats", "dogs"):
        write_png(str(root / name / "a.png"))
    os.symlink(root / "cats" / "a.png", root / "cats" / "b.png")  # the same file twice in one class
    ds = data.get_dataset("folder", str(root), val_fraction=0.0, test_fraction=0.0)
    assert sorted(os.path.relpath(r.path, root) for r in ds.splits["train"]) == ["cats/a.png", "dogs/a.png"]


def test_a_nul_byte_in_a_csv_path_is_one_line(tmp_path):
    root = str(tmp_path / "own")
    write_png(os.path.join(root, "a.png"))
    write_labels_csv(root, [["a.png", "x"], ["b\0.png", "y"]])
    with pytest.raises(DataError, match=r"labels.csv line 3: column 'image' holds a NUL byte"):
        data.get_dataset("csv", root, val_fraction=0.0, test_fraction=0.0)


def test_an_image_listed_twice_with_two_labels_is_refused_and_an_identical_repeat_used_once(tmp_path):
    root = str(tmp_path / "own")
    for name in ("a", "b", "c"):
        write_png(os.path.join(root, f"{name}.png"))
    write_labels_csv(root, [["a.png", "x"], ["b.png", "y"], ["./a.png", "y"]])
    with pytest.raises(DataError, match=r"labels.csv line 4: image .*a.png is listed again with another label, "
                                        r"patient or split than at .*labels.csv line 2"):
        data.get_dataset("csv", root, val_fraction=0.0, test_fraction=0.0)
    write_labels_csv(root, [["a.png", "x"], ["b.png", "y"], ["c.png", "y"], ["a.png", "x"]])
    ds = data.get_dataset("csv", root, val_fraction=0.0, test_fraction=0.0)
    assert len(ds.splits["train"]) == 3
    assert [(os.path.basename(p), why) for p, _, why in ds.excluded] == [
        ("a.png", f"listed again (first at {os.path.join(root, 'labels.csv')} line 2); used once")]
    rows = tmp_path / "p.csv"
    rows.write_text("path,label\nown/a.png,x\nown/a.png,y\n")
    with pytest.raises(trained.PredictError, match="listed again with another label"):
        predict.csv_records(str(rows), ["x", "y"], "multiclass")


def test_symlinks_leading_out_of_the_root_are_refused_unless_allowed(tmp_path):
    outside = tmp_path / "outside"
    write_png(str(outside / "secret.png"))
    root = str(tmp_path / "root")
    write_png(os.path.join(root, "a.png"))
    write_png(os.path.join(root, "inner", "b.png"))
    os.symlink(outside / "secret.png", os.path.join(root, "link.png"))  # a file link leading out
    os.symlink(os.path.join(root, "inner"), os.path.join(root, "alias"))  # a folder link that stays inside: fine
    write_labels_csv(root, [["a.png", "x"], ["alias/b.png", "y"], ["link.png", "y"]])
    with pytest.raises(DataError, match=r"labels.csv line 4: image .*link.png leads through a symlink to "
                                        r".*outside/secret.png, outside the dataset root"):
        data.get_dataset("csv", root)
    ds = data.get_dataset("csv", root, val_fraction=0.0, test_fraction=0.0, allow_outside_root=True)
    assert len(ds.splits["train"]) == 3
    write_labels_csv(root, [["a.png", "x"], ["alias/b.png", "y"]])
    assert len(data.get_dataset("csv", root, val_fraction=0.0, test_fraction=0.0).splits["train"]) == 2
