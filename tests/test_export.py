"""medjax.export: the safetensors folder is a converted backbone (+ head) that predict, medjax.embed and
model.pretrained read with the best model's outputs (the demo's ViT, a ResNet with BatchNorm statistics, LoRA
adapters merged); the StableHLO export reloaded in a fresh process without medjax matches predict."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medjax import models, predict, pretrained, trained
from medjax.testing import ROOT

FAST = ["--config.fake_data=96", "--config.epochs=2", "--config.batch_size=8", "--config.progress_bar=False"]
RUNS = {"vit": ["--config=configs/demo.py"],
        "resnet_batch_stats": ["--config=tests/bn_demo.py"],
        "vit_lora": ["--config=configs/demo.py", "--config.model.peft=lora", "--config.model.lora.rank=4",
                     "--config.optim.lr=1e-2"]}


def _cli(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            workdir, data_root = root / "run", root / "data"
            proc = _cli("medjax.main", *RUNS[name], f"--workdir={workdir}", f"--config.data_root={data_root}", *FAST)
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[name] = (workdir, data_root)
        return made[name]
    return get


def _probs(path, class_names):
    rows = list(csv.DictReader(open(path)))
    return np.array([[float(r[f"prob/{n}"]) for n in class_names] for r in rows])


def _predict(source, data_root, out):
    proc = _cli("medjax.predict", "--workdir", source, "--dataset", "chexpert", "--root", data_root, "--output", out,
                "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _test_images(model, data_root):
    """The test split as the model sees it: (N, S, S, C) normalised."""
    from medjax import data

    records, _ = predict.dataset_records(model, "chexpert", str(data_root), "test")
    dataset = data.Dataset("t", model.task, model.class_names, model.channels, "", model.mean, model.std,
                           {"t": records})
    return np.concatenate([b["image"][b["mask"]] for b in data.make_loader(
        dataset, "t", batch_size=8, image_size=model.image_size, train=False, normalization=model.normalization(),
        shard_index=0, shard_count=1)])


def _backbone_outputs(classifier_model, variables, images):
    from medjax import models

    backbone = models.build_backbone(classifier_model.backbone)
    sub = {c: v["backbone"] for c, v in variables.items() if "backbone" in v}
    return {k: np.asarray(v) for k, v in backbone.apply(sub, images).items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_safetensors_export_gives_the_best_models_outputs(runs, name, tmp_path):
    import jax

    from medjax import engine
    from medjax.schema import make

    workdir, data_root = runs(name)
    folder = tmp_path / "export"
    proc = _cli("medjax.export", "--workdir", workdir, "--output", folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config, variables, meta = models.load_pretrained(str(folder))  # a converted folder: digests and shapes checked
    assert config.in_chans == 1 and meta["export"]["class_names"][0] == "No Finding"
    assert ("batch_stats" in variables) == (name == "resnet_batch_stats")
    run = trained.load_model(str(workdir))
    names = run.class_names

    # predict reads the folder as it reads the run
    p_run = _probs(_predict(workdir, data_root, tmp_path / "run.csv"), names)
    p_export = _probs(_predict(folder, data_root, tmp_path / "export.csv"), names)
    assert np.abs(p_run - p_export).max() <= (1e-6 if name == "vit_lora" else 0.0)
    assert np.abs(p_run - 0.5).max() > 1e-3  # a trained model, not a constant

    # medjax.embed --params: the best model's backbone outputs; the exported head on them gives the probabilities
    classifier, best = run.plain()
    images = _test_images(run, data_root)
    expected = _backbone_outputs(classifier, best, images)
    np.save(tmp_path / "images.npy", np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    proc = _cli("medjax.embed", "--params", folder, "--images", tmp_path / "images.npy", "--output",
                tmp_path / "out.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    embedded = np.load(tmp_path / "out.npz")
    for key in ("linear_head_input", "attention_head_input"):
        assert np.abs(embedded[key] - expected[key]).max() <= 1e-5, key
    from safetensors.numpy import load_file

    head = load_file(folder / trained.HEAD_FILE)
    logits = embedded["linear_head_input"].astype(np.float64) @ head["kernel"] + head["bias"]
    assert np.abs(1 / (1 + np.exp(-logits)) - p_run).max() <= 1e-5

    # model.pretrained for a new run: its backbone starts as the best model's
    overrides = {"model.family": run.config.model.family, "model.pretrained": str(folder), "model.freeze": "full",
                 "image_size": run.image_size, "compute_dtype": "float32"}
    new = engine.build(make(overrides), num_classes=3, channels=1, task="multiclass", total_steps=10)
    start = jax.tree_util.tree_map(np.asarray, jax.device_get(new.variables_of(new.state)))
    flat_new = pretrained.flatten_variables({c: v["backbone"] for c, v in start.items() if "backbone" in v})
    flat_export = pretrained.flatten_variables(variables)
    assert flat_new.keys() == flat_export.keys()
    assert all(np.array_equal(flat_new[k], flat_export[k]) for k in flat_export)
    got = _backbone_outputs(new.model, start, images)
    assert np.abs(got["linear_head_input"] - expected["linear_head_input"]).max() <= 1e-6


def test_a_run_starts_from_an_exported_folder(runs, tmp_path):
    workdir, data_root = runs("vit")
    folder = tmp_path / "export"
    assert _cli("medjax.export", "--workdir", workdir, "--output", folder).returncode == 0
    proc = _cli("medjax.main", "--config=configs/demo.py", f"--workdir={tmp_path / 'next'}",
                f"--config.data_root={data_root}", *FAST, "--config.epochs=1", f"--config.model.pretrained={folder}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Converting" not in proc.stdout
    assert json.load(open(tmp_path / "next" / "run_config.json"))["model.pretrained"] == str(folder)


BLOCK_MEDJAX = """
import sys
class _NoMedjax:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('medjax', 'configs', 'converters'):
            raise ImportError('medjax is not available here: ' + name)
sys.meta_path.insert(0, _NoMedjax())
import jax, numpy as np
from safetensors.numpy import load_file
folder, images, out = sys.argv[1:]
f = jax.export.deserialize(open(folder + '/model.stablehlo', 'rb').read())
weights = load_file(folder + '/weights.safetensors')
x = np.load(images)
np.savez(out, all=np.asarray(f.call(weights, x)), three=np.asarray(f.call(weights, x[:3])),
         one=np.asarray(f.call(weights, x[5:6])))
assert not any(m.split('.')[0] == 'medjax' for m in sys.modules)
"""


def test_stablehlo_export_runs_without_medjax_and_matches_predict(runs, tmp_path):
    workdir, data_root = runs("vit")
    folder = tmp_path / "hlo"
    proc = _cli("medjax.export", "--workdir", workdir, "--output", folder, "--format", "stablehlo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.load(open(folder / "model.json"))
    assert facts["input"]["size"] == 56 and facts["input"]["mean"] == [0.503] and facts["platforms"] == \
        ["cpu", "cuda", "tpu"]
    run = trained.load_model(str(workdir))
    np.save(tmp_path / "images.npy", _test_images(run, data_root))
    expected = _probs(_predict(workdir, data_root, tmp_path / "preds.csv"), run.class_names)
    script = tmp_path / "reload.py"
    script.write_text(BLOCK_MEDJAX)
    proc = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "images.npy"),
                           str(tmp_path / "out.npz")], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    assert got["all"].shape == expected.shape == (10, 14)
    assert np.abs(got["all"] - expected).max() <= 1e-6
    assert np.abs(got["three"] - expected[:3]).max() <= 1e-6 and np.abs(got["one"] - expected[5:6]).max() <= 1e-6


def test_export_errors_are_one_line(runs, tmp_path):
    workdir, _ = runs("vit")
    proc = _cli("medjax.export", "--workdir", tmp_path, "--output", tmp_path / "x")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1
    assert str(tmp_path) in proc.stderr and "run_config.json" in proc.stderr
    (tmp_path / "file").write_text("")
    proc = _cli("medjax.export", "--workdir", workdir, "--output", tmp_path / "file")
    assert proc.returncode == 2 and "exists and is not a folder" in proc.stderr
    proc = _cli("medjax.export", "--workdir", workdir, "--output", tmp_path / "y", "--format", "stablehlo",
                "--platforms", "cpu,abacus")
    assert proc.returncode == 2 and "--platforms" in proc.stderr
    # a damaged head is named
    assert _cli("medjax.export", "--workdir", workdir, "--output", tmp_path / "z").returncode == 0
    head = tmp_path / "z" / trained.HEAD_FILE
    from safetensors.numpy import load_file, save_file

    tensors = load_file(head)
    tensors["bias"] = tensors["bias"] + 1
    save_file(tensors, head)
    proc = _cli("medjax.predict", "--workdir", tmp_path / "z", "--images", os.devnull, "--output", tmp_path / "p.csv")
    assert proc.returncode == 2 and "head.safetensors: 1 tensor(s) differ" in proc.stderr
