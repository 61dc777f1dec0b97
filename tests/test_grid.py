"""The benchmark grid: configs/grid.py has every cell of the study, each cell's config builds with the recipe and every
key the trainer reads, and `python -m medjax.grid` lists, prints and runs cells (skipping finished ones)."""

import functools
import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

import converters
from medjax import data, models, report, schema
from medjax import grid as grid_cli
from medjax.testing import ROOT, run_cli

GRID_PATH = os.path.join(ROOT, "configs", "grid.py")
grid = grid_cli.load_grid(GRID_PATH)

MODELS = {  # the brief: the study's backbones plus CLIP-B/16 and DINOv2-S/g
    "vmamba_s", "vmamba_b", "sam2_b+", "sam2_l", "mae_b", "mae_l", "mae_h", "coca_b", "coca_l", "dinov2_b",
    "dinov2_l", "aimv2_l", "aimv2_h", "clip_b16", "dinov2_s", "dinov2_g"}
DATASETS = {"chexpert", "ddsm", "isic2019", "aptos2019"}
WARMUP = {"chexpert": (1000, 0), "isic2019": (1000, 0), "ddsm": (None, 5), "aptos2019": (None, 5)}  # (steps, epochs)


def _flat_keys(config, prefix=""):
    keys = set()
    for k, v in config.items():
        if hasattr(v, "items"):
            keys |= _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def _reference_keys():
    """The keys of the hand-written config the trainer is known to run (configs/dinov2_chexpert.py)."""
    import importlib.util

    path = os.path.join(ROOT, "configs", "dinov2_chexpert.py")
    spec = importlib.util.spec_from_file_location("dinov2_chexpert", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _flat_keys(module.get_config())


GLIOMA = {"vgg16", "resnet50", "densenet121", "dinov2_s_lc", "dinov2_b_lc", "dinov2_l_lc"}
GLIOMA_DATASETS = {"chest_xray_pneumonia", "ichallenge_amd", "ham10000", "isic2018"}
RADIOLOGY = {"dinov2_s", "dinov2_b", "dinov2_l", "dinov2_g", "resnet152", "vgg19", "densenet201", "vit_l16_in21k",
             "msn_l", "vit_mae_l", "clip_l14", "openclip_h14", "sam_l", "biomedclip"}
RADIOLOGY_DATASETS = {"nih_chestxray14", "chexpert", "brain_tumor_figshare"}


def _study(name):
    return [c for c in grid.cells() if c["study"] == name]


def test_grid_has_every_cell_once():
    cells = grid.cells()
    keys = {(c["model"], c["dataset"], c["head"], c["freeze"]) for c in cells}
    assert len(cells) == len(keys) == 16 * 4 * 2 * 2 + 6 * 4 * 2 + 14 * 3 + 5 * 4 * 2 * 2  # + the next generation
    main = {(c["model"], c["dataset"], c["head"], c["freeze"]) for c in _study("mansoori")}
    assert len(main) == 16 * 4 * 2 * 2
    assert {k[0] for k in main} == MODELS and {k[1] for k in main} == DATASETS
    assert {k[2] for k in main} == {"linear", "attention"} and {k[3] for k in main} == {"frozen", "full"}
    # every backbone of the study's table is in the grid, under the name the report uses for the study's numbers
    study_names = {v[0] for v in grid.BACKBONES.values() if v[4]}
    assert study_names == set(report.STUDY)


def test_the_companion_studies_tables_are_in_the_grid():
    """Issue 14 item 6: the glioma study's table (3 CNNs with a linear head, DINOv2 S/B/L `_lc` with the MLP head,
    frozen and full, on its public datasets) and the radiology study's linear probes (DINOv2 beside its baselines)."""
    glioma = _study("glioma")
    assert {c["model"] for c in glioma} == GLIOMA and {c["dataset"] for c in glioma} == GLIOMA_DATASETS
    assert len(glioma) == 6 * 4 * 2 and {c["freeze"] for c in glioma} == {"frozen", "full"}
    assert all(c["head"] == ("mlp" if c["model"].endswith("_lc") else "linear") for c in glioma)
    radiology = _study("radiology")
    assert {c["model"] for c in radiology} == RADIOLOGY and {c["dataset"] for c in radiology} == RADIOLOGY_DATASETS
    assert len(radiology) == 14 * 3 and all((c["head"], c["freeze"]) == ("probe", "frozen") for c in radiology)
    kinds = {c["model"]: grid.model_info(c["model"]).kind for c in glioma + radiology}
    assert {m for m, k in kinds.items() if k == "foundation"} == {"dinov2_s_lc", "dinov2_b_lc", "dinov2_l_lc",
                                                                 "dinov2_s", "dinov2_b", "dinov2_l", "dinov2_g"}


@pytest.mark.parametrize("key", sorted(GLIOMA | RADIOLOGY))
def test_companion_models_convert_from_their_variants(key):
    """Each model's folder is what `python -m converters --model VARIANT [--linear-head]` writes, its family the
    converter's, its parameter count medjax's count of the converted backbone (with the linear classifier)."""
    import dataclasses

    from medjax import models

    m = grid.model_info(key)
    family, kwargs = models.VARIANTS[m.variant]
    config = models.FAMILIES[family].converter.parse_config(kwargs)
    if m.linear_head:
        assert key.endswith("_lc") and m.linear_head == f"{m.variant}_linear_head.pth"
        config = dataclasses.replace(config, lc_layers=1)
    assert config.family == m.family
    assert round(models.count_params(models.param_shapes(config)) / 1e6, 2) == m.params_m, key


@pytest.mark.parametrize("dataset", sorted(GLIOMA_DATASETS))
def test_glioma_cells_carry_the_studys_protocol(dataset):
    for cell in [c for c in _study("glioma") if c["dataset"] == dataset]:
        c = grid.get_config(grid.cell_arg(cell))
        schema.validate(c)
        o = c.optim
        assert (o.name, o.lr, o.schedule, o.clip, o.weight_decay) == ("adam", 1e-4, "constant", 0.0, 0.0)
        assert (c.batch_size, c.epochs, c.seed, c.image_size, c.normalization) == (32, 100, 1, 224, "imagenet")
        assert c.train_augment is False and c.selection_metric == "accuracy" and c.bootstrap.resamples == 5000
        m = grid.model_info(cell["model"])
        assert c.model.head == cell["head"] and c.model.freeze == cell["freeze"] and c.model.family == m.family
        assert c.model.pretrained == f"{c.weights_dir}/{m.folder}"
        assert c.data_root == f"{c.data_dir}/{grid.GLIOMA_DATASETS[dataset]}" and dataset in data.READERS
        assert c.grid_cell.study == "glioma" and c.grid_cell.kind == m.kind
        assert c.grid_cell.convert.endswith(f"--model {m.variant}" + (
            f" --linear-head {m.linear_head}" if m.linear_head else ""))
        json.loads(c.to_json_best_effort())


def test_the_hand_written_glioma_config_is_the_grid_cell():
    import importlib.util

    spec = importlib.util.spec_from_file_location("glioma_pneumonia", os.path.join(ROOT, "configs",
                                                                                   "glioma_pneumonia.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mine = module.get_config()
    cell = grid.get_config("model=dinov2_b_lc,dataset=chest_xray_pneumonia,freeze=frozen")
    def get(config, dotted):
        return functools.reduce(lambda node, part: node[part], dotted.split("."), config)

    grid_only = ("grid_cell.", "weights_dir", "data_dir")  # where the grid records its cell and folders
    for key in {k for k in _flat_keys(mine) - {"data_root", "model.pretrained"} if not k.startswith(grid_only)}:
        assert get(mine, key) == get(cell, key), key
    schema.validate(mine)


def test_radiology_cells_are_linear_probes():
    for cell in _study("radiology"):
        c = grid.get_config(grid.cell_arg(cell))
        schema.validate(c)
        m = grid.model_info(cell["model"])
        cnn = m.family in ("resnet", "densenet", "vgg")
        assert c.probe.blocks == ((1,) if cnn else (1, 4)) and c.probe.avgpool == ((False,) if cnn else (False, True))
        assert c.probe.lrs == (1e-3, 5e-3, 1e-2, 5e-2) and (c.probe.epochs, c.probe.batch_size) == (10, 128)
        assert c.image_size == (1024 if cell["model"] == "sam_l" else 224) and c.normalization == "imagenet"
        assert set(schema.data_options(c)) <= set(data.OPTIONS[cell["dataset"]])
    assert schema.data_options(grid.get_config("model=vgg19,dataset=nih_chestxray14")) == {
        "no_finding_class": True, "val_rule": "last"}  # the study's 15 columns and its last 10,002 val images
    assert schema.data_options(grid.get_config("model=vgg19,dataset=chexpert,head=probe")) == {
        "uncertain": "zeros", "frontal_only": True}


def test_default_head_is_the_cells_own():
    assert grid.parse_arg("model=dinov2_b,dataset=chexpert")["head"] == "linear"  # the reference study's first
    assert grid.parse_arg("model=dinov2_b_lc,dataset=ham10000")["head"] == "mlp"
    assert grid.parse_arg("model=sam_l,dataset=chexpert")["head"] == "probe"
    with pytest.raises(ValueError, match="not a cell of the grid; model=resnet50 runs with dataset=chest_xray"):
        grid.get_config("model=resnet50,dataset=chexpert")


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_cell_config_builds_with_the_recipe(dataset):
    reference = _reference_keys()
    cells = [c for c in _study("mansoori") if c["dataset"] == dataset]
    assert len(cells) == 64
    for cell in cells:
        c = grid.get_config(grid.cell_arg(cell))
        missing = {k for k in reference - _flat_keys(c) if not k.startswith("data_options.")}
        assert not missing, (cell, missing)  # every key the trainer reads in the reference config
        options = set(data.OPTIONS[dataset])
        assert set(schema.data_options(c)) <= options, cell  # the reader accepts every data option set
        name, variant, family, params_m, _ = grid.BACKBONES[cell["model"]]
        assert models.VARIANTS[variant][0] == family == c.model.family, cell
        assert c.model.pretrained == f"{c.weights_dir}/{variant}"
        assert c.model.head == cell["head"] and c.model.freeze == cell["freeze"]
        assert c.model.attention_head.deit_params == (
            f"{c.weights_dir}/deit_base_patch16_224" if cell["head"] == "attention" else "")
        assert c.dataset == dataset and dataset in data.READERS
        assert c.data_root == f"{c.data_dir}/{grid.DATASETS[dataset][0]}"
        assert c.model.grayscale == "red"  # applies to the 1-channel sets (CheXpert, DDSM): the reference's red filter
        assert c.image_size == 224 and c.batch_size == 64 and c.epochs == 100 and c.compute_dtype == "bfloat16"
        o = c.optim
        assert (o.lr, o.weight_decay, o.b1, o.b2, o.eps, o.clip, o.schedule) == (
            1e-4, 1e-5, 0.9, 0.999, 1e-8, 1.0, "reference")
        assert (o.get("warmup_steps"), o.warmup_epochs) == WARMUP[dataset]
        assert o.get("layer_decay") is None and c.total_steps == 0 and c.fake_data == 0
        assert c.grid_cell.arg == grid.cell_arg(cell) and c.grid_cell.backbone == name
        assert c.grid_cell.params_m == params_m
        json.loads(c.to_json_best_effort())  # what `grid run` records in grid_cell.json


def test_trainer_warmup_rule_resolves_per_dataset():
    """The trainer takes optim.warmup_steps when set, else warmup_epochs x steps per epoch (medjax/train.py)."""
    steps_per_epoch = 37
    for dataset, (steps, epochs) in WARMUP.items():
        o = grid.get_config(f"model=dinov2_b,dataset={dataset}").optim
        warmup = o.warmup_steps if o.get("warmup_steps") is not None else int(o.warmup_epochs * steps_per_epoch)
        assert warmup == (steps if steps is not None else epochs * steps_per_epoch)


def test_params_in_the_table_match_the_converted_backbones():
    from medjax import models

    for key in ("dinov2_s", "mae_b", "clip_b16", "aimv2_l"):
        _, variant, family, params_m, _ = grid.BACKBONES[key]
        config = models.FAMILIES[family].converter.parse_config(models.VARIANTS[variant][1])
        assert round(models.count_params(models.param_shapes(config)) / 1e6, 2) == params_m, key


def _parse(argv):
    values = flags.FlagValues()
    argv = ["prog", *argv]
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=False, sys_argv=argv)
    values(argv)
    return values.config


def test_config_flags_argument_and_location_overrides(monkeypatch):
    c = _parse([f"--config={GRID_PATH}:model=sam2_b+,dataset=ddsm,head=attention,freeze=full",
                "--config.weights_dir=/w", "--config.data_dir=/d"])
    assert c.model.pretrained == "/w/sam2.1_hiera_b+" and c.model.attention_head.deit_params == \
        "/w/deit_base_patch16_224"
    assert c.data_root == "/d/ddsm" and c.model.freeze == "full" and c.optim.get("warmup_steps") is None
    c = _parse([f"--config={GRID_PATH}:model=dinov2_b,dataset=aptos2019", "--config.data_root=/x",
                "--config.optim.warmup_steps=7"])
    assert c.data_root == "/x" and c.optim.warmup_steps == 7 and c.model.head == "linear"
    monkeypatch.setenv("MEDJAX_WEIGHTS", "/env/w")
    monkeypatch.setenv("MEDJAX_DATA", "/env/d")
    c = grid.get_config("model=mae_h,dataset=isic2019")
    assert c.model.pretrained == "/env/w/mae_vit_huge_patch14" and c.data_root == "/env/d/isic-2019"


@pytest.mark.parametrize("arg, message", [
    (None, "needs a cell"), ("model=dinov2_x,dataset=chexpert", "choices: vmamba_s"),
    ("model=dinov2_b", "names no dataset"), ("model=dinov2_b,dataset=chexpert,lr=1", "bad item")])
def test_bad_cell_argument_names_the_choices(arg, message):
    with pytest.raises(ValueError, match=message):
        grid.get_config(arg)


def test_list_cli():
    proc = run_cli("medjax.grid", "list")
    lines = proc.stdout.splitlines()
    assert len(lines) == 426 and "# 426 cells" in proc.stderr
    assert "configs/grid.py:model=dinov2_b,dataset=chexpert,head=linear,freeze=frozen" in proc.stdout
    proc = run_cli("medjax.grid", "list", "--filter", "model=dinov2_*|sam2_b+,dataset=ddsm,head=attention")
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 * 2
    assert all(" ddsm " in line and "head=attention" in line for line in lines)
    proc = run_cli("medjax.grid", "list", "--filter", "study=glioma,model=resnet50")
    lines = proc.stdout.splitlines()
    assert len(lines) == 8 and all(line.startswith("glioma ") and "head=linear" in line for line in lines)
    proc = run_cli("medjax.grid", "list", "--filter", "study=radiology,dataset=chexpert")
    assert len(proc.stdout.splitlines()) == 14 and "model=biomedclip,dataset=chexpert,head=probe" in proc.stdout
    bad = run_cli("medjax.grid", "list", "--filter", "model=resnet5", check=False)
    assert bad.returncode != 0 and "matches nothing" in bad.stderr


def test_run_dry_run_prints_commands_and_skips_finished_cells(tmp_path):
    done = grid_cli.cell_workdir(str(tmp_path), {"model": "mae_b", "dataset": "chexpert", "head": "linear",
                                                 "freeze": "full"})
    os.makedirs(done)
    open(os.path.join(done, "metrics.json"), "w").write("{}")
    proc = run_cli("medjax.grid", "run", "--filter", "model=mae_b,dataset=chexpert", "--dry-run",
                   "--workdir-root", str(tmp_path), "--", "--config.epochs=1")
    commands = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == 3
    assert commands[0] == (f"python -m medjax.main --config=configs/grid.py:model=mae_b,dataset=chexpert,head=linear,"
                           f"freeze=frozen --workdir={tmp_path}/mae_b/chexpert/linear_frozen --config.epochs=1")
    assert "skip model=mae_b,dataset=chexpert,head=linear,freeze=full" in proc.stdout
    assert "1 already done, would run 3" in proc.stdout
    assert not os.path.exists(os.path.join(tmp_path, "mae_b", "chexpert", "linear_frozen"))  # nothing written
    assert run_cli("medjax.grid", "run", check=False).returncode != 0  # neither --filter nor --all


def test_run_writes_the_cell_file_and_runs_each_cell_once(tmp_path):
    calls = []

    class Done:
        returncode = 0

    def runner(cmd):
        calls.append(cmd)
        workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
        open(os.path.join(workdir, "metrics.json"), "w").write("{}")
        return Done()

    cells = grid_cli.select(grid.cells(), grid_cli.parse_filter("model=coca_b,dataset=isic2019,freeze=full",
                                                                grid.AXES))
    overrides = ["--config.weights_dir=/w", "--config.epochs=3"]
    log = open(tmp_path / "log.txt", "w")
    assert grid_cli.run_cells(grid, cells, str(tmp_path), "configs/grid.py", overrides, runner=runner, out=log) == 0
    assert len(calls) == 2 and calls[0][1:4] == ["-m", "medjax.main",
                                               "--config=configs/grid.py:model=coca_b,dataset=isic2019,head=linear,"
                                               "freeze=full"]
    record = json.load(open(tmp_path / "coca_b" / "isic2019" / "attention_full" / "grid_cell.json"))
    assert record["cell"]["backbone"] == "CoCa-B" and record["cell"]["head"] == "attention"
    assert record["config"]["epochs"] == 3 and record["config"]["model"]["pretrained"] == "/w/coca_vit_b32"
    assert grid_cli.run_cells(grid, cells, str(tmp_path), "configs/grid.py", overrides, runner=runner, out=log) == 0
    assert len(calls) == 2  # finished cells are skipped


def test_cell_cli_writes_the_cell_file(tmp_path):
    run_cli("medjax.grid", "cell", "model=vmamba_s,dataset=aptos2019,head=attention,freeze=frozen",
            "--workdir", str(tmp_path / "w"), "--", "--config.data_dir=/d")
    record = json.load(open(tmp_path / "w" / "grid_cell.json"))
    assert record["cell"]["backbone"] == "VMamba-S" and record["cell"]["params_m"] == 49.38
    assert record["config"]["data_root"] == "/d/aptos2019"


def test_probe_cells_run_the_linear_probe_protocol(tmp_path):
    """`grid run` dispatches a head=probe cell to `python -m medjax.grid probe`, which writes metrics.json and the
    test predictions with patient-resampled intervals (the Figshare slices carry patient ids)."""
    import numpy as np

    from medjax import bootstrap, metrics
    from medjax.protocols import linear_probe
    from medjax.testing import fixture_path

    weights = tmp_path / "w"
    converters.convert(fixture_path("resnet", "checkpoint.pth"), str(weights / "resnet152"), "resnet",
                       fixture_path("resnet", "config.json"))  # a tiny torchvision ResNet in resnet152's folder
    overrides = [f"--config.weights_dir={weights}", f"--config.data_dir={tmp_path / 'd'}", "--config.fake_data=90",
                 "--config.image_size=32", "--config.probe.epochs=2", "--config.bootstrap.resamples=100"]
    root = tmp_path / "runs"
    dry = run_cli("medjax.grid", "run", "--filter", "model=resnet152,dataset=brain_tumor_figshare", "--dry-run",
                  "--workdir-root", str(root), "--", *overrides)
    assert (f"python -m medjax.grid --grid configs/grid.py probe model=resnet152,dataset=brain_tumor_figshare,"
            f"head=probe,freeze=frozen --workdir {root}/resnet152/brain_tumor_figshare/probe_frozen --") in dry.stdout
    run_cli("medjax.grid", "run", "--filter", "model=resnet152,dataset=brain_tumor_figshare",
            "--workdir-root", str(root), "--", *overrides)
    workdir = root / "resnet152" / "brain_tumor_figshare" / "probe_frozen"
    m = json.load(open(workdir / "metrics.json"))
    assert m["protocol"] == "linear_probe" and m["retrained_on"] == "train+val"
    assert len(m["grid"]) == 4 and all(g["n_last_blocks"] == 1 and not g["avgpool"] for g in m["grid"])
    cell = json.load(open(workdir / "grid_cell.json"))["cell"]
    assert (cell["study"], cell["kind"], cell["backbone"]) == ("radiology", "baseline", "ResNet-152")
    pred = bootstrap.read_predictions(str(workdir / bootstrap.PREDICTIONS_FILE))
    assert metrics.compute_metrics(m["task"], pred["probs"], pred["labels"], pred["class_names"]) == {
        k: v for k, v in m["test"].items() if k != "num_examples"}
    head = dict(np.load(workdir / "probe_head.npz"))
    test = np.load(next(p for p in (workdir / "features").iterdir() if "_test_" in p.name))
    feats = type("F", (), {"cls": test["cls"], "patch_mean": test["patch_mean"]})
    probs = linear_probe.predict_heads(head, linear_probe.full_input(feats), m["task"])[0]
    assert np.array_equal(probs, pred["probs"])  # the stored predictions are the retrained head's on the test set
    assert m["test_bootstrap"]["unit"] == "patient" and m["test_bootstrap"]["resamples"] == 100
    again = run_cli("medjax.grid", "run", "--filter", "model=resnet152,dataset=brain_tumor_figshare",
                    "--workdir-root", str(root), "--", *overrides)
    assert "1 already done" in again.stdout
    bad = run_cli("medjax.grid", "probe", "model=resnet152,dataset=brain_tumor_figshare", "--workdir",
                  str(tmp_path / "x"), "--", "--config.probe.epoch=2", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: unknown config field 'probe.epoch'; did you mean probe.epochs?")
    bad = run_cli("medjax.grid", "probe", "model=resnet152,dataset=brain_tumor_figshare", "--workdir",
                  str(tmp_path / "y"), "--", f"--config.data_dir={tmp_path / 'nowhere'}", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nowhere" in bad.stderr


def test_a_glioma_cell_trains_with_the_studys_protocol(tmp_path):
    """DINOv2 `_lc` (the fixture, converted with --linear-head) with the MLP head on its 1000 ImageNet logits, frozen,
    picked by validation accuracy, through `grid run` and the trainer."""
    from medjax.testing import fixture_path

    converters.convert(fixture_path("dinov2_lc", "checkpoint.pth"), str(tmp_path / "w" / "dinov2_vits14_lc"),
                       "dinov2", fixture_path("dinov2_lc", "config.json"),
                       linear_head=fixture_path("dinov2_lc", "linear_head.pth"))
    proc = run_cli("medjax.grid", "run", "--filter", "model=dinov2_s_lc,dataset=ichallenge_amd,freeze=frozen",
                   "--workdir-root", str(tmp_path / "runs"), "--", f"--config.weights_dir={tmp_path / 'w'}",
                   f"--config.data_dir={tmp_path / 'd'}", "--config.fake_data=60", "--config.epochs=2",
                   "--config.batch_size=8", "--config.image_size=28", "--config.progress_bar=False",
                   "--config.bootstrap.resamples=50")
    assert "1 cells: 0 already done, ran 1" in proc.stdout
    workdir = tmp_path / "runs" / "dinov2_s_lc" / "ichallenge_amd" / "mlp_frozen"
    m = json.load(open(workdir / "metrics.json"))
    assert m["selection_metric"] == "accuracy" and [set(h) for h in m["history"]] == [{"step", "epoch", "accuracy"}] * 2
    assert {"precision_weighted", "recall_weighted", "f1_weighted"} <= set(m["test_bootstrap"]["metrics"])
    assert m["test_bootstrap"]["resamples"] == 50 and m["test_bootstrap"]["unit"] == "image"  # AMD: no patient ids
    run_config = json.load(open(workdir / "run_config.json"))
    assert (run_config["optim.name"], run_config["train_augment"], run_config["model.head"]) == ("adam", False, "mlp")


def test_distributed_runs_leave_probe_cells_to_one_host(tmp_path):
    calls = []

    class Done:
        returncode = 0

    cells = grid_cli.select(grid.cells(), grid_cli.parse_filter("model=dinov2_s,dataset=chexpert", grid.FILTER_AXES))
    log = open(tmp_path / "log.txt", "w")
    assert grid_cli.run_cells(grid, cells, str(tmp_path), "configs/grid.py", distributed=True,
                              runner=lambda cmd: calls.append(cmd) or Done(), out=log) == 0
    log.close()
    assert len(calls) == 4 and all("--distributed" in c and "medjax.main" in c for c in calls)
    text = open(tmp_path / "log.txt").read()
    assert "left out model=dinov2_s,dataset=chexpert,head=probe" in text and "1 probe cell(s) left" in text
