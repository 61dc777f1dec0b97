"""The helpers the parity tests share, beside the families and in tests/ (imported by the tests, never by medjax):
the checkout's paths, the fixtures' folders, both command lines on a fixture, the parity comparison and two train
steps. Imports neither pytest nor torch; the root conftest.py registers the pytest fixtures (`matmul_f32`)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from medjax import models
from medjax.convert import ConversionError, convert
from medjax.models.fixtures import perturb_ as perturb_  # the tests take them from here
from medjax.models.fixtures import without_keys as without_keys
from medjax.tree import flatten

# the checkout: medjax/testing.py -> the repository root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PARITY_TOL = 2e-5


def fixture_path(family, *names):
    return os.path.join(FIXTURES, family, *names)


def run_cli(*args, check=True):
    """Run `python -m ...` as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def convert_and_embed(tmp_path, family, checkpoint, model, config, *extra):
    """A fixture through the CLIs as a user runs them: `python -m converters` then `python -m medjax.embed` on its
    images (`checkpoint` relative to the fixture's folder, or a path). Returns (the embed outputs, the fixture's
    expected.npz, the converter's stdout)."""
    out_dir, out_npz = tmp_path / "params", tmp_path / "out.npz"
    proc = run_cli("converters", fixture_path(family, checkpoint), str(out_dir), "--model", model, "--config", config,
                   *extra)
    run_cli("medjax.embed", "--params", str(out_dir), "--images", fixture_path(family, "images.npy"),
            "--output", str(out_npz))
    return np.load(out_npz), np.load(fixture_path(family, "expected.npz")), proc.stdout


def assert_fixture_outputs(got, expected, family, skip=(), tol=PARITY_TOL) -> list:
    """Every expected array but `skip` matches the embed output within `tol` (a fixture's debug_NAME may be an
    upstream output medjax exposes as NAME, e.g. x_norm_regtokens); returns the keys compared."""
    compared = []
    for key in expected.files:
        if key in skip:
            continue
        name = key if key in got.files else key.removeprefix("debug_")
        assert name in got.files, f"{key} missing from medjax.embed output ({got.files})"
        diff = max_abs(got[name], expected[key])
        assert diff <= tol, f"{family}/{key}: max abs diff {diff:.3g}"
        compared.append(key)
    return compared


def train_two_steps(eng, size: int) -> tuple[dict, set]:
    """Two train steps of an engine on one fixed grayscale batch of 4 (classes 0, 1, 2, 1); returns the flat
    parameters before and the set of parameter paths that changed."""
    before = flatten(jax.device_get(eng.state.params))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((4, size, size, 1)), jnp.float32),
             "label": jnp.asarray([0, 1, 2, 1])}
    state = eng.state
    for _ in range(2):
        state, metrics = eng.train_step(state, batch)
        assert bool(metrics["finite"])
    after = flatten(jax.device_get(state.params))
    return before, {k for k in before if not np.array_equal(before[k], after[k])}


def convert_fixture(out, family: str, checkpoint: str, model: str | None = None) -> str:
    """A fixture's checkpoint converted with its config.json into `out` (`model` defaults to the family); returns the
    folder."""
    convert(fixture_path(family, checkpoint), str(out), model or family, fixture_path(family, "config.json"))
    return str(out)


def layer_depths(name: str, config) -> tuple:
    """A family's network order over every parameter of `config`: (the Family, the backbone-relative parameter
    paths, {path: layer index}) as partial freezing and layer-wise lr decay see it."""
    family = models.family(name)
    patterns = family.layer_patterns(config)
    paths = list(flatten(models.param_shapes(config)))
    return family, paths, {p: family.layer_of(config, p, patterns) for p in paths}


def lora_paths(family, config, paths) -> list:
    """The parameter paths that get LoRA adapters (the family's `lora_targets`)."""
    return [p for p in paths if any(re.search(r, p) for r in family.lora_targets(config))]


def conversion_error(*args, **kwargs) -> ConversionError:
    """The ConversionError `medjax.convert.convert(*args, **kwargs)` raises; fails the test if it converts."""
    try:
        convert(*args, **kwargs)
    except ConversionError as e:
        return e
    raise AssertionError(f"{args[0]} converted without an error")


def apply_converted(params_dir: str, images_nchw) -> tuple:
    """(config, variables, {output: numpy array}) of a converted folder's backbone on NCHW images (float32 matmuls,
    jitted), as the parity tests compare it with the torch model on the same images."""
    config, variables, _ = models.load_pretrained(params_dir)
    with jax.default_matmul_precision("float32"):
        out = jax.jit(models.build_backbone(config).apply)(variables, jnp.asarray(np.asarray(images_nchw)
                                                                                  .transpose(0, 2, 3, 1)))
    return config, variables, {k: np.asarray(v) for k, v in out.items()}


def transformers_fixture_outputs(out_dir, family: str) -> dict:
    """A family's public fixture in the transformers layout (model.safetensors + config.json) converted into
    `out_dir` and run on its images; checks the format and that last_hidden_state and pooler_output (the expected
    arrays) are within PARITY_TOL; returns every output."""
    meta = convert(fixture_path(family, "model.safetensors"), str(out_dir), family, fixture_path(family, "config.json"))
    assert meta["source"]["format"] == f"{family}_transformers"
    _, _, got = apply_converted(str(out_dir), np.load(fixture_path(family, "images.npy")))
    expected = np.load(fixture_path(family, "expected.npz"))
    assert sorted(expected.files) == ["last_hidden_state", "pooler_output"]
    for key in expected.files:
        assert max_abs(got[key], expected[key]) <= PARITY_TOL, key
    return got


def max_abs(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def write_png(path, value=100, size=(12, 10), mode="RGB"):
    """A small flat image at `path` (its folders made)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, (value,) * 3 if mode == "RGB" else value).save(path)


def write_labels_csv(root, rows, header=("image", "label")):
    """An own dataset's labels.csv under `root`."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])


def error_line(proc, alone=True):
    """A CLI's refusal: exit status 2, no traceback, stderr ending in one line starting with 'error: ' (the only line
    when `alone`); returns that line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert not any("Traceback" in line for line in lines), proc.stderr[-2000:]
    assert len(lines) == 1 or not alone, proc.stderr[-2000:]
    return lines[-1]
